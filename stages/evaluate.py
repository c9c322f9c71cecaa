"""evaluate: the recipe's output-length numbers for one model's replies, and tuned - baseline with bootstrap CIs.

Beside length: is a reply still an answer (refusals, a short phrase repeated, distinct-2, empty and looping
replies), tuned - baseline of each with its paired interval, the smallest difference the test set could detect
(_mde80), and delta.verdict: "shorter" only when the replies got shorter AND none of those got worse.

    python -m stages.evaluate --name baseline --replies data/infer/baseline.jsonl --out metrics/baseline.json
    python -m stages.evaluate --name tuned --replies data/infer/tuned.jsonl --baseline data/infer/baseline.jsonl \
        --out metrics/tuned.json
"""
import sys
from pathlib import Path

import numpy as np

import matplotlib.pyplot as plt

from ernie_dpo.common import (
    get_logger,
    labels,
    load_params,
    read_json,
    read_jsonl,
    stage_parser,
    write_json,
)
from ernie_dpo.stats import bootstrap_delta, length_verdict, paired_delta, quality_values, reply_metrics

log = get_logger("evaluate")


def plot_lengths(b, t, model, path):
    """Overlaid histograms of reply lengths (chars), same bins for both; the legend's medians match the metrics."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(b + t, bins=30)
    ax.hist(b, bins=bins, alpha=0.6, label=f"baseline (median {np.median(b):g})", color="tab:blue")
    ax.hist(t, bins=bins, alpha=0.6, label=f"tuned (median {np.median(t):g})", color="tab:orange")
    ax.set(title=f"reply length on the test set (model: {model})", xlabel="reply length (characters)",
           ylabel="replies")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def compare(base, replies, e, likelihood):
    """metrics' delta section: tuned - baseline reply length (mean, median: paired and unpaired 95% intervals, the
    smallest difference detectable at 80% power), each quality sign, prompts shorter / longer, and the verdict."""
    b_len = [len(r["reply"]) for r in base]
    t_len = [len(r["reply"]) for r in replies]
    delta = {}
    for stat in ("mean", "median"):
        # the headline interval is paired (same prompts, same seeds: ernie_dpo/stats.py says why); the unpaired
        # one, wider, is kept beside it so nobody has to take the choice on trust
        p = paired_delta(b_len, t_len, stat, e["bootstrap_samples"], e["seed"])
        d, lo, hi = p["delta"], p["ci_low"], p["ci_high"]
        _, ulo, uhi = bootstrap_delta(b_len, t_len, stat, e["bootstrap_samples"], e["seed"], paired=False)
        delta[f"chars_{stat}"] = round(d, 2)
        delta[f"chars_{stat}_ci_low"] = round(lo, 2)
        delta[f"chars_{stat}_ci_high"] = round(hi, 2)
        delta[f"chars_{stat}_unpaired_ci_low"] = round(ulo, 2)
        delta[f"chars_{stat}_unpaired_ci_high"] = round(uhi, 2)
        delta[f"chars_{stat}_mde80"] = round(p["mde80"], 2)
        log.info("tuned - baseline %s reply length: %+.1f chars, 95%% paired bootstrap CI [%+.1f, %+.1f] "
                 "(unpaired [%+.1f, %+.1f]); %d prompts detect %.1f chars at 80%% power", stat, d, lo, hi, ulo,
                 uhi, len(b_len), p["mde80"])
    # is a shorter reply still an answer? each quality sign's mean, tuned - baseline, on the same resamples
    qb, qt = quality_values(base), quality_values(replies)
    for key in qb:
        p = paired_delta(qb[key], qt[key], "mean", e["bootstrap_samples"], e["seed"])
        delta.update({key: round(p["delta"], 4), f"{key}_ci_low": round(p["ci_low"], 4),
                      f"{key}_ci_high": round(p["ci_high"], 4), f"{key}_mde80": round(p["mde80"], 4)})
        log.info("tuned - baseline %s: %+.3f, 95%% paired bootstrap CI [%+.3f, %+.3f]; detectable: %.3f", key,
                 p["delta"], p["ci_low"], p["ci_high"], p["mde80"])
    delta["prompts_shorter"] = sum(t < b for b, t in zip(b_len, t_len))
    delta["prompts_longer"] = sum(t > b for b, t in zip(b_len, t_len))
    log.info("tuned reply shorter than the baseline's on %d of %d prompts, longer on %d",
             delta["prompts_shorter"], len(b_len), delta["prompts_longer"])
    verdict, reasons = length_verdict(delta, likelihood)
    delta["verdict"] = verdict
    log.info("verdict: %s (%s)", verdict, "; ".join(reasons))
    return delta, b_len, t_len


def main():
    ap = stage_parser(__file__, __doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--replies", required=True)
    ap.add_argument("--baseline")
    ap.add_argument("--out", required=True)
    ap.add_argument("--likelihood", help="metrics/train.json: the held-out likelihood the verdict also checks")
    args = ap.parse_args()
    params = load_params()
    e, max_dec_len = params["evaluate"], params["infer"]["max_dec_len"]
    replies = read_jsonl(args.replies)
    # "model" labels every number: the demo's come from the tiny model, never from ERNIE-4.5-0.3B
    out = {args.name: {**labels(params), **reply_metrics(replies, max_dec_len)}}
    m = out[args.name]
    log.info("%s: %d replies, mean %.1f / median %.1f chars, %.0f%% cut at max_dec_len=%d, %.0f%% empty, "
             "%.0f%% looping (a sentence repeated 3+ times)", args.name, m["replies"], m["chars_mean"],
             m["chars_median"], 100 * m["cut_at_max_dec_len_share"], max_dec_len, 100 * m["empty_share"],
             100 * m["looping_share"])
    log.info("%s: %.0f%% refusing or apologizing, %.0f%% repeating a short phrase, distinct-2 %.2f", args.name,
             100 * m["refusal_share"], 100 * m["repetitive_share"], m["distinct2_mean"])
    if args.baseline:
        base = read_jsonl(args.baseline)
        if [r["id"] for r in base] != [r["id"] for r in replies]:
            sys.exit(f"evaluate: {args.baseline} and {args.replies} do not answer the same prompts in the same order")
        # the held-out likelihood (validation prompts' chosen answers, tuned - base) is measured by the train stage
        likelihood = read_json(args.likelihood).get("likelihood") if args.likelihood else None
        if args.likelihood and not likelihood:
            log.warning("%s has no held-out likelihood (train.length_probe_steps 0?): the verdict cannot check it",
                        args.likelihood)
        out["delta"], b_len, t_len = compare(base, replies, e, likelihood)
        Path("metrics/plots").mkdir(parents=True, exist_ok=True)
        write_json("metrics/plots/reply_lengths.json",
                   [{"prompt": i, "baseline_chars": b, "tuned_chars": t} for i, (b, t) in enumerate(zip(b_len, t_len))])
        plot_lengths(b_len, t_len, params["model"]["name_or_path"], "metrics/plots/reply_lengths.png")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
