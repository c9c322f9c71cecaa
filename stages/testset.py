"""testset: a fixed sample of prompts (seeded) in OpenAI message format, for baseline and tuned inference, and a
validation split (testset.validation_size other prompts): what the length probes and the held-out likelihood look at
while training, so that settings are chosen on validation and the test set gives the final number once."""
import sys

from ernie_dpo.common import (
    get_logger,
    load_params,
    read_jsonl,
    stage_parser,
    write_json,
    write_jsonl,
)
from ernie_dpo.data import DataError, distinct_prompts, fit_sizes, make_testset, make_validation

log = get_logger("testset")


def main():
    stage_parser(__file__, __doc__).parse_args()
    params = load_params()
    p = params["testset"]
    records = read_jsonl("data/prepared/dpo.jsonl")
    try:
        size, validation_size, note = fit_sizes(distinct_prompts(records), p["size"], p["validation_size"])
        if note:
            log.warning("testset: %s", note)
        test = make_testset(records, size, p["seed"], p["keep_system"])
        validation = make_validation(records, test, validation_size, p["seed"], p["keep_system"])
    except DataError as e:
        sys.exit(f"testset: {e}")
    write_jsonl("data/testset/testset.jsonl", test)
    write_jsonl("data/testset/validation.jsonl", validation)
    n_multi = sum(sum(m["role"] == "user" for m in t["messages"]) > 1 for t in test)
    n_sys = sum(t["messages"][0]["role"] == "system" for t in test)
    write_json("metrics/testset.json", {"testset": {"data": params["data"]["raw_path"], "prompts": len(test),
                                                    "multi_turn_prompts": n_multi,
                                                    "prompts_with_system": n_sys,
                                                    "validation_prompts": len(validation),
                                                    "sizes_adapted_to_data": bool(note)}})
    log.info("sampled %d of %d records (seed %d, keep_system=%s): %d multi-turn, %d with a system prompt; %d other "
             "prompts for validation", len(test), len(records), p["seed"], p["keep_system"], n_multi, n_sys,
             len(validation))


if __name__ == "__main__":
    main()
