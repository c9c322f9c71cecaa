"""infer: answer every test prompt with one model (baseline or tuned), sampling as the recipe does.

    python stages/infer.py --model models/base --out data/infer/baseline.jsonl

Progress is kept in data/infer/partial/<name>-<key>.jsonl, where <key> hashes the model weights, the test set and the
infer params: an interrupted run resumes where it stopped, and a run with different inputs never reuses old replies.
The finished file is then written to --out in test-set order.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ernie_dpo.common import fingerprint, get_logger, load_params, read_jsonl, write_jsonl  # noqa: E402
from ernie_dpo.generate import generate_all  # noqa: E402

log = get_logger("infer")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    params = load_params()
    p, device = params["infer"], params["engine"]["device"]
    test_path = "data/testset/testset.jsonl"
    tests = read_jsonl(test_path)
    partial = Path("data/infer/partial") / f"{Path(args.out).stem}-{fingerprint([args.model, test_path], [p, device])}.jsonl"
    log.info("%d prompts, model %s, top_p %s, temperature %s, max_dec_len %d, batch %d (progress: %s)", len(tests),
             args.model, p["top_p"], p["temperature"], p["max_dec_len"], p["batch_size"], partial)
    records = generate_all(tests, partial, args.model, p["top_p"], p["temperature"], p["max_dec_len"],
                           p["batch_size"], p["seed"], device)
    write_jsonl(args.out, records)
    cut = sum(r["finish_reason"] == "length" for r in records)
    log.info("wrote %s: %d replies, mean %.1f chars, %d cut at max_dec_len", args.out, len(records),
             sum(len(r["reply"]) for r in records) / len(records), cut)


if __name__ == "__main__":
    main()
