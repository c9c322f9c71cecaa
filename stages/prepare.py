"""prepare: ShareGPT DPO json -> ERNIE DPO jsonl, with every dropped record counted and written with its reason."""
import sys

from ernie_dpo.common import get_logger, load_params, stage_parser, write_json, write_jsonl
from ernie_dpo.data import DataError, load_sharegpt, prepare_records

log = get_logger("prepare")


def main():
    stage_parser(__file__, __doc__).parse_args()
    params = load_params()
    raw_path = params["data"]["raw_path"]
    log.info("reading %s", raw_path)
    try:
        raw = load_sharegpt(raw_path)
    except DataError as e:
        sys.exit(f"prepare: {e}")
    kept, rejects, counts = prepare_records(raw, params["prepare"]["max_chars"])
    write_jsonl("data/prepared/dpo.jsonl", kept)
    write_jsonl("data/prepared/rejects.jsonl", rejects)
    write_json("metrics/prepare.json", {"prepare": {"records_read": counts["read"], "records_kept": counts["kept"],
                                                    "records_dropped": sum(counts["dropped"].values()),
                                                    "dropped_by_reason": counts["dropped"]}})
    log.info("read %d records, kept %d, dropped %d %s (see data/prepared/rejects.jsonl)",
             counts["read"], counts["kept"], len(rejects), counts["dropped"])


if __name__ == "__main__":
    main()
