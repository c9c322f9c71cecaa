"""trainset: DPO training pairs from the records NOT in the test set or the validation split, filtered by the
recipe's length rules, and held-out eval pairs (trainset.eval_pairs) set aside from the same filtered pool: never a
test, validation or training prompt (asserted). The engine evaluates them during training (train.eval_steps); the
length probes answer the validation prompts instead (data/testset/validation.jsonl)."""
import sys

from ernie_dpo.common import (
    get_logger,
    load_params,
    read_json,
    read_jsonl,
    stage_parser,
    write_json,
    write_jsonl,
)
from ernie_dpo.data import (
    DataError,
    chosen_text,
    pool_outside,
    prompt_key,
    rejected_text,
    sample_down,
    select_pairs,
    split_eval,
)

log = get_logger("trainset")


def without_system(pairs):
    """The recipe deletes the system prompt from its training pairs: some ask for long answers on purpose, the
    opposite of what this DPO run teaches (trainset.keep_system: true keeps them)."""
    return [{k: v for k, v in r.items() if k != "system"} for r in pairs]


def assert_apart(pairs, held_out, test_ids, test_keys):
    """No training or held-out pair shares a prompt with the test or validation prompts, nor a held-out pair with
    training (the recipe's training pool overlapped its test prompts). Returns the overlap: 0."""
    overlap = sum(r["id"] in test_ids or prompt_key(r) in test_keys for r in pairs + held_out)
    assert overlap == 0, f"{overlap} training or eval pairs share a prompt with the test set"
    train_keys = {prompt_key(r) for r in pairs}
    assert not any(prompt_key(r) in train_keys for r in held_out), "an eval pair shares a prompt with training"
    return overlap


def main():
    stage_parser(__file__, __doc__).parse_args()
    params = load_params()
    p = params["trainset"]
    records = read_jsonl("data/prepared/dpo.jsonl")
    # the validation prompts are kept out exactly as the test prompts are
    test = read_jsonl("data/testset/testset.jsonl") + read_jsonl("data/testset/validation.jsonl")
    try:
        pool, test_ids, test_keys = pool_outside(records, test)
    except DataError as e:
        sys.exit(f"trainset: {e}")

    baseline_mean = None
    if p["strategy"] == "near_baseline":
        baseline_mean = read_json("metrics/baseline.json")["baseline"]["chars_mean"]
        log.info("near_baseline: reference = baseline mean reply length %.1f chars (metrics/baseline.json)", baseline_mean)
    try:
        pairs = select_pairs(pool, p["strategy"], p["min_ratio"], baseline_mean, p["baseline_tolerance"])
        passed = len(pairs)
        pairs, held_out = split_eval(pairs, p["eval_pairs"], p["seed"])
        if p["eval_pairs"] and not held_out and pairs:
            log.warning("trainset: %d passing pair(s) share one prompt: none held out for the engine's eval loop "
                        "(trainset.eval_pairs %s); the held-out curves will be missing", len(pairs), p["eval_pairs"])
        pairs = sample_down(pairs, p["size"], p["seed"])
    except DataError as e:
        sys.exit(f"trainset: {e}")

    overlap = assert_apart(pairs, held_out, test_ids, test_keys)
    if not pairs:
        loosen = "-S trainset.min_ratio=1.0" + (" -S trainset.baseline_tolerance=1.0"
                                                 if p["strategy"] == "near_baseline" else "")
        sys.exit(f"trainset: none of the {len(pool)} pool pairs passes the filter (strategy {p['strategy']}, rejected "
                 f">= {p['min_ratio']}x chosen); loosen it, e.g. {loosen}")

    with_system = sum(bool(r.get("system")) for r in pairs)
    if not p["keep_system"]:
        pairs, held_out = without_system(pairs), without_system(held_out)
    write_jsonl("data/trainset/train.jsonl", pairs)
    write_jsonl("data/trainset/eval.jsonl", held_out)
    chosen = [len(chosen_text(r)) for r in pairs]
    rejected = [len(rejected_text(r)) for r in pairs]
    metrics = {
        "data": params["data"]["raw_path"],
        "pool_pairs": len(pool),
        "excluded_as_test_prompt": len(records) - len(pool),
        "pairs_passing_filter": passed,
        "pairs": len(pairs),
        "eval_pairs_held_out": len(held_out),
        "chosen_chars_mean": round(sum(chosen) / len(chosen), 2),
        "rejected_chars_mean": round(sum(rejected) / len(rejected), 2),
        "test_overlap": overlap,
        "system_prompts_dropped": 0 if p["keep_system"] else with_system,
    }
    write_json("metrics/trainset.json", {"trainset": metrics})
    log.info("strategy %s: %d records minus %d sharing a test prompt = pool %d; %d pass the filter; %d held out for "
             "eval; kept %d (mean chosen %.1f chars, rejected %.1f chars); overlap with test set: %d; system prompts "
             "dropped: %d", p["strategy"], len(records), metrics["excluded_as_test_prompt"], len(pool), passed,
             len(held_out), len(pairs),
             metrics["chosen_chars_mean"], metrics["rejected_chars_mean"], overlap, metrics["system_prompts_dropped"])


if __name__ == "__main__":
    main()
