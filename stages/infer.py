"""infer: answer every test prompt with one model (baseline or tuned), sampling as the recipe does.

    python -m stages.infer --model models/base --out data/infer/baseline.jsonl

infer.backend local samples here (continuous batching); managed starts the server infer.managed.command on --model
for this stage alone; openai sends each prompt to a server someone runs at infer.openai.baseline_url / tuned_url
(by the --out file's name). The server's log (or a line saying there was none) goes to logs/servers/infer_<name>.log.

Progress is kept in data/infer/partial/<name>-<key>.jsonl, where <key> hashes the model weights, the test set and the
infer params: an interrupted run resumes where it stopped, and a run with different inputs never reuses old replies.
The finished file is then written to --out in test-set order, and how it was produced (backend, device, CPU threads,
sampling settings with top_k off, stop tokens, replies/s, new tokens/s) to metrics/infer_<name>.json.
"""
import sys
from pathlib import Path

from ernie_dpo import devices
from ernie_dpo.common import (
    fingerprint,
    get_logger,
    labels,
    load_params,
    read_jsonl,
    stage_parser,
    write_json,
    write_jsonl,
)
from ernie_dpo.generate import answer_all
from ernie_dpo.openai_client import ServedError

log = get_logger("infer")


def main():
    ap = stage_parser(__file__, __doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    params = load_params()
    p, device = params["infer"], params["engine"]["device"]
    role = Path(args.out).stem  # baseline | tuned: picks the server with infer.backend=openai
    devices.require_device(params, "infer", local=p["backend"] == "local")  # a server brings its own device
    test_path = "data/testset/testset.jsonl"
    tests = read_jsonl(test_path)
    partial = Path("data/infer/partial") / f"{Path(args.out).stem}-{fingerprint([args.model, test_path], [p, device])}.jsonl"
    if p["backend"] == "openai":
        where = f"server {p['openai'][role + '_url']} (serving {args.model})"
    elif p["backend"] == "managed":
        where = f"a server started on {args.model} ({' '.join(map(str, p['managed']['command'][:3]))} ...)"
    else:
        where = f"model {args.model}, batch {p['batch_size']}"
    log.info("%d prompts, %s, top_p %s, temperature %s, max_dec_len %d (progress: %s)", len(tests), where, p["top_p"],
             p["temperature"], p["max_dec_len"], partial)
    try:
        records, run_info = answer_all(tests, partial, args.model, role, params, f"logs/servers/infer_{role}.log")
    except ServedError as e:
        sys.exit(f"infer: {e}")
    write_jsonl(args.out, records)
    write_json(f"metrics/infer_{role}.json", {f"infer_{role}": {**labels(params), **run_info}})
    cut = sum(r["finish_reason"] == "length" for r in records)
    log.info("wrote %s: %d replies, mean %.1f chars, %d cut at max_dec_len", args.out, len(records),
             sum(len(r["reply"]) for r in records) / len(records), cut)


if __name__ == "__main__":
    main()
