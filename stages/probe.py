"""probe: the forgetting check. One model answers the fixed probes (same sampling as infer); the checks are scored.

    python -m stages.probe --name baseline --model models/base
    python -m stages.probe --name tuned --model models/merged    # also writes retention = tuned / baseline pass rate

Each probe is asked probes.samples times. Writes data/probes/<name>.jsonl (every reply with pass/fail) and
metrics/probes_<name>.json. Progress is resumable like infer (data/infer/partial/probes_<name>-<key>.jsonl), and
infer.backend applies here too.
"""
import sys
from pathlib import Path

from ernie_dpo import devices
from ernie_dpo.common import (
    fingerprint,
    get_logger,
    labels,
    load_params,
    read_json,
    stage_parser,
    write_json,
    write_jsonl,
)
from ernie_dpo.generate import answer_all
from ernie_dpo.openai_client import ServedError
from ernie_dpo.probes import ProbeError, expand, load_probes, retention, score

log = get_logger("probe")
PROBES = "data/probes/probes.jsonl"


def main():
    ap = stage_parser(__file__, __doc__)
    ap.add_argument("--name", required=True, choices=["baseline", "tuned"])
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    params = load_params()
    p, samples, device = params["infer"], params["probes"]["samples"], params["engine"]["device"]
    devices.require_device(params, "probe", local=p["backend"] == "local")  # a server needs no device here
    try:
        probes = load_probes(PROBES)
    except ProbeError as e:
        sys.exit(f"probe: {e}")
    asks = expand(probes, samples)
    partial = Path("data/infer/partial") / f"probes_{args.name}-{fingerprint([args.model, PROBES], [p, samples, device])}.jsonl"
    log.info("%d probes x %d samples, model %s, same sampling as infer (top_p %s, temperature %s, max_dec_len %d)",
             len(probes), samples, args.model, p["top_p"], p["temperature"], p["max_dec_len"])
    try:
        replies, _ = answer_all(asks, partial, args.model, args.name, params, f"logs/servers/probe_{args.name}.log")
    except ServedError as e:
        sys.exit(f"probe: {e}")
    metrics, rows = score(probes, replies)
    metrics = {**labels(params), **metrics}
    if args.name == "tuned":
        base = read_json("metrics/probes_baseline.json")["probes_baseline"]
        metrics["retention"] = retention(base["pass_rate"], metrics["pass_rate"])
    write_jsonl(f"data/probes/{args.name}.jsonl", rows)
    write_json(f"metrics/probes_{args.name}.json", {f"probes_{args.name}": metrics})
    log.info("%s: %d of %d probe replies pass (%.0f%%)%s; by kind: %s", args.name, metrics["passed"],
             metrics["replies"], 100 * metrics["pass_rate"],
             f", retention {metrics['retention']} of the baseline's pass rate" if "retention" in metrics else "",
             {k[len("pass_rate_"):]: v for k, v in metrics.items() if k.startswith("pass_rate_")})


if __name__ == "__main__":
    main()
