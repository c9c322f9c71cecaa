"""prepare: your preference data -> ERNIE DPO jsonl, every dropped record counted and written with its reason.

Accepted (docs/data_formats.md): ShareGPT (the recipe's own layout), TRL preference (prompt/chosen/rejected, plain or
conversational), Alpaca pairwise (instruction/input/chosen/rejected), OpenAI messages + chosen/rejected, and
ERNIEKit's DPO jsonl (src/tgt/response/sort); a JSON list or JSONL. data.format: auto detects it from the records.
The stage FAILS when fewer than prepare.min_records records survive (a wrong file or format is never an empty run).
"""
import sys

from ernie_dpo.common import (
    get_logger,
    load_params,
    stage_parser,
    write_json,
    write_jsonl,
)
from ernie_dpo.data import DataError, load_records, prepare_records

log = get_logger("prepare")


def main():
    stage_parser(__file__, __doc__).parse_args()
    params = load_params()
    raw_path, fmt = params["data"]["raw_path"], params["data"]["format"]
    log.info("reading %s (format: %s)", raw_path, fmt)
    try:
        kept, rejects, counts = prepare_records(load_records(raw_path), params["prepare"]["max_chars"], fmt)
    except DataError as e:
        sys.exit(f"prepare: {e}")
    write_jsonl("data/prepared/dpo.jsonl", kept)
    # one JSON document, never an empty file (DVC warns about every empty output): the drops with their reasons
    write_json("data/prepared/rejects.json", {"data_file": raw_path, "records_dropped": len(rejects),
                                              "dropped_by_reason": counts["dropped"], "records": rejects})
    write_json("metrics/prepare.json", {"prepare": {"data_file": raw_path, "data_format": counts["format"],
                                                    "records_read": counts["read"], "records_kept": counts["kept"],
                                                    "records_dropped": sum(counts["dropped"].values()),
                                                    "dropped_by_reason": counts["dropped"]}})
    log.info("%s (%s): read %d records, kept %d, dropped %d %s (see data/prepared/rejects.json)", raw_path,
             counts["format"], counts["read"], counts["kept"], len(rejects), counts["dropped"])
    if counts["read"] == 0:
        sys.exit(f"prepare: {raw_path} holds no records (an empty list or file). Accepted formats: "
                 "docs/data_formats.md")
    if counts["kept"] < params["prepare"]["min_records"]:
        example = f"; first drop: {rejects[0]['reason']}: {rejects[0]['detail']}" if rejects else ""
        sys.exit(f"prepare: only {counts['kept']} of {counts['read']} records of {raw_path} are usable as "
                 f"{counts['format'] or 'any known'} preference pairs (prepare.min_records is {params['prepare']['min_records']})"
                 f"{example}. Accepted formats: docs/data_formats.md; force one with -S data.format=<name>.")


if __name__ == "__main__":
    main()
