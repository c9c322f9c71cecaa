"""The recipe's comparison table, built from DVC's own experiment data (rows of `dvc.api.exp_show()`).

Each row of exp_show is a flat dict: "Experiment" (name), "rev", params by their dotted key ("train.max_steps") and
metrics by theirs ("tuned.chars_mean"); metric keys are unique across files, so no key needs a file prefix.
exp0 (the base model) is not an experiment of its own: every experiment carries the same baseline metrics (the
stages before trainset do not change between them), and the report checks that they agree.
"""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from tabulate import tabulate

from .common import get_logger, write_json

log = get_logger("report")

# The original recipe's five published rows (ERNIE-4.5-0.3B, 200 prompts, mean / median reply chars), exactly as
# published: shown next to, never mixed with, ours. Its tables give steps, warmup and pair counts at global batch 1;
# the fine-tuning mode, learning rate and LoRA rank are not stated there (the cookbook profile's are this
# project's choices, docs/experiments.md). exp3 got LONGER than the baseline: that is why exp4 exists.
RECIPE = [
    ("exp0", "— (base model)", "—", 888.8, 515),
    ("exp1", "rejected within ±40% of the baseline mean and ≥ 1.2× chosen, 614 pairs", "614 steps, warmup 50", 879.5, 442),
    ("exp2", "rejected ≥ 1.2× chosen, 614 pairs", "614 steps, warmup 50", 864.7, 354),
    ("exp3", "rejected ≥ 2× chosen, 1804 pairs", "1804 steps, warmup 50", 1145.1, 412),
    ("exp4", "rejected ≥ 2× chosen, 1804 pairs", "3608 steps, warmup 360", 628.1, 331),
]
NAMES = ("exp1", "exp2", "exp3", "exp4")  # the recipe's experiments as named DVC experiments (`ernie-dpo series`)
HEADERS = ["Experiment", "Training set", "Training parameters", "↓ mean length", "↓ median length",
           "Δ mean [95% CI]", "Δ median [95% CI]", "held-out reward acc.", "probe median while training",
           "probes passed", "retention", "verdict"]


# The recipe's questions, each answered by comparing two experiments' replies to the same test prompts: (later,
# earlier, question). The recipe's answer is the sign of its own difference (RECIPE rows, later - earlier).
QUESTIONS = [
    ("exp2", "exp1", "≥ 1.2× pairs vs near-baseline pairs, same size and steps: shorter?"),
    ("exp3", "exp2", "≥ 2× pairs, one epoch, vs ≥ 1.2×: longer?"),
    ("exp3", "exp0", "≥ 2× pairs, one epoch, vs the base model: longer?"),
    ("exp4", "exp3", "≥ 2× pairs: twice the steps, 10% warmup, vs one epoch: shorter?"),
]


class ReportError(ValueError):
    pass


def _num(x):
    """A real number? exp_show gives None, NaN, or the string 'None' for a missing or null metric."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _fmt(x, nd=1):
    return f"{x:.{nd}f}" if _num(x) else "—"


def _unprefixed(row):
    """exp_show prefixes a column with its file ("params.yaml:train.learning_rate") when two files share a key on
    any listed commit (older commits may have used other metric names); give every value its plain key back,
    a parameter winning over a metric."""
    out = dict(row)
    for key, value in row.items():
        if ":" in key:
            source, plain = key.split(":", 1)
            if plain not in out or source == "params.yaml":
                out[plain] = value
    return out


def find(rows, names):
    """{name: row} for the named experiments; each row gets "baseline_rev", the commit it was run on.

    exp_show lists each commit's row followed by its experiments, newest commit first; when a name exists on several
    commits the newest one wins (so the report still finds the series after the report itself was committed).
    """
    found, commit = {}, None
    for r in rows:
        if r.get("typ") == "baseline":
            commit = r.get("rev")
        # a failed experiment still shows the git-tracked metrics of its commit: its State says it failed (a pulled
        # experiment has no State at all)
        elif (r.get("Experiment") in names and r.get("tuned.chars_mean") is not None
              and r.get("State") not in ("Failed", "Queued", "Running")):
            found.setdefault(r["Experiment"], {"baseline_rev": commit, **_unprefixed(r)})  # saved rows keep theirs
    return found


def training_set(r):
    if r["trainset.strategy"] == "near_baseline":
        rule = (f"rejected within ±{r['trainset.baseline_tolerance']:.0%} of the baseline mean "
                f"({r['baseline.chars_mean']:.1f} chars) and ≥ {r['trainset.min_ratio']:g}× chosen")
    else:
        rule = f"rejected ≥ {r['trainset.min_ratio']:g}× chosen"
    return f"{rule}, {int(r['trainset.pairs'])} pairs"


def training_params(r):
    return (f"{r['train.fine_tuning']}, {int(r['train.max_steps'])} steps, warmup {int(r['train.warmup_steps'])}, "
            f"batch {int(r['train.global_batch_size'])}, lr {r['train.learning_rate']:g}")


def verdict_cell(r):
    """stats.length_verdict on a row's delta.* (and, when a stage measured it, likelihood.*) metrics, with what
    degraded it, or a note that the row's metrics predate the quality checks."""
    from .stats import length_verdict

    def part(prefix):
        return {k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)}

    verdict, reasons = length_verdict(part("delta."), part("likelihood.") or None)
    worse = [x.split(" [")[0] for x in reasons[1:] if "not checked" not in x]  # what degraded, not what is unknown
    if verdict == "shorter but degraded":
        return f"{verdict} ({', '.join(worse)})"
    if any(x.startswith("quality not checked") for x in reasons):
        return f"{verdict} (quality not checked)"
    return verdict


def table(rows, names):
    """(table rows, problems): exp0 from the shared baseline, then one row per named experiment in order."""
    found = find(rows, names)
    problems = [f"{n}: no finished experiment of that name" for n in names if n not in found]
    if not found:
        raise ReportError("none of the experiments " + ", ".join(names) + " exists on the recent commits; "
                          "run `ernie-dpo series` first")
    baselines = {(r["baseline.chars_mean"], r["baseline.chars_median"]) for r in found.values()}
    if len(baselines) > 1:
        raise ReportError(f"the experiments do not share one baseline (baseline mean/median: {sorted(baselines)}); "
                          "they were run on different test sets or models and cannot go in one table")
    first = next(iter(found.values()))
    out = [["exp0", "— (base model, no training)", "—", _fmt(first["baseline.chars_mean"]),
            _fmt(first["baseline.chars_median"]), "—", "—", "—", "—", _fmt(first.get("probes_baseline.pass_rate"), 2),
            "—", "—"]]
    for n in names:
        if n not in found:
            out.append([n, "not run"] + ["—"] * (len(HEADERS) - 2))
            continue
        r = found[n]
        out.append([
            n, training_set(r), training_params(r), _fmt(r["tuned.chars_mean"]), _fmt(r["tuned.chars_median"]),
            f"{r['delta.chars_mean']:+.1f} [{r['delta.chars_mean_ci_low']:+.1f}, {r['delta.chars_mean_ci_high']:+.1f}]",
            f"{r['delta.chars_median']:+.1f} [{r['delta.chars_median_ci_low']:+.1f}, {r['delta.chars_median_ci_high']:+.1f}]",
            _fmt(r.get("dpo.heldout.rewards_accuracies"), 2),
            (f"{_fmt(r.get('dpo.length_probe.step0_chars_median'), 0)} → "
             f"{_fmt(r.get('dpo.length_probe.final_chars_median'), 0)}"
             if _num(r.get("dpo.length_probe.final_chars_median")) else "—"),
            _fmt(r.get("probes_tuned.pass_rate"), 2), _fmt(r.get("probes_tuned.retention"), 2), verdict_cell(r),
        ])
    return out, problems, first


def verdict(recipe_delta, low, high):
    """Does our interval agree with the recipe's direction? Only an interval that excludes 0 decides."""
    if low <= 0 <= high:
        return "undecided (interval includes 0)"
    return "replicates" if (low > 0) == (recipe_delta > 0) else "opposite of the recipe"


def compare(lengths, n_resamples, seed):
    """The recipe's QUESTIONS on per-prompt reply lengths {"exp0": baseline chars, "exp1": tuned chars, ...}, all in
    the test set's order: later - earlier with the paired bootstrap of the evaluate stage (same prompts, same
    per-prompt seeds), and whether it agrees with the recipe. Questions whose experiments are missing are skipped.

    Power, from the same resamples: "{stat}_mde80", the smallest Δ these prompts detect at 80% power (two-sided
    5%), and "{stat}_prompts_needed", how many test prompts would detect the recipe's own Δ that often
    (stats.prompts_needed: n x (MDE / |recipe Δ|)^2, rounded up); "prompts" is n."""
    from .stats import paired_delta, prompts_needed

    recipe = {r[0]: (r[3], r[4]) for r in RECIPE}
    out = []
    for later, earlier, question in QUESTIONS:
        if later not in lengths or earlier not in lengths:
            continue
        n = len(lengths[earlier])
        row = {"later": later, "earlier": earlier, "question": question, "prompts": n}
        for k, stat in enumerate(("mean", "median")):
            p = paired_delta(lengths[earlier], lengths[later], stat, n_resamples, seed)
            d, lo, hi = p["delta"], p["ci_low"], p["ci_high"]
            theirs = round(recipe[later][k] - recipe[earlier][k], 1)
            row[stat] = {"delta": round(d, 2), "ci_low": round(lo, 2), "ci_high": round(hi, 2),
                         "recipe_delta": theirs, "verdict": verdict(theirs, lo, hi)}
            row[f"{stat}_mde80"] = round(p["mde80"], 2)
            row[f"{stat}_prompts_needed"] = prompts_needed(n, p["mde80"], theirs)
        out.append(row)
    return out


def power_from_interval(c, stat, n):
    """(≈ MDE, ≈ prompts needed) for a comparison saved before the power columns existed (its per-prompt replies live
    in experiment refs, not in git): the SD of the Δ read off its 95% interval, (ci_high - ci_low) / (2 x 1.96), a
    normal approximation of the bootstrap's own SD."""
    from .stats import Z_ALPHA, Z_POWER, prompts_needed

    mde = (Z_ALPHA + Z_POWER) * (c[stat]["ci_high"] - c[stat]["ci_low"]) / (2 * 1.96)
    return mde, prompts_needed(n, mde, c[stat]["recipe_delta"]) if n else None


def render_comparisons(comparisons, n_prompts=None):
    """The questions table, and up front how many of its intervals decide anything at all. Comparisons saved before
    the power columns existed get them approximated from their intervals, marked ≈ (power_from_interval)."""
    def power(c, key, fmt):
        cells = []
        for s in ("mean", "median"):
            if c.get(f"{s}_{key}") is not None:
                cells.append(fmt(c[f"{s}_{key}"]))
            else:
                value = power_from_interval(c, s, n_prompts)[0 if key == "mde80" else 1]
                cells.append("≈ " + fmt(value) if value is not None else "—")
        return " / ".join(cells)

    body = [[f"{c['later']} − {c['earlier']}", c["question"]]
            + [f"{c[s]['delta']:+.1f} [{c[s]['ci_low']:+.1f}, {c[s]['ci_high']:+.1f}] vs {c[s]['recipe_delta']:+.1f}: "
               f"{c[s]['verdict']}" for s in ("mean", "median")]
            + [power(c, "mde80", lambda x: f"{x:.1f}"), power(c, "prompts_needed", lambda x: f"{x:d}")]
            for c in comparisons]
    decided = sum(not c[s]["verdict"].startswith("undecided") for c in comparisons for s in ("mean", "median"))
    n = next((c["prompts"] for c in comparisons if "prompts" in c), n_prompts)
    lines = ["", "The recipe's questions (Δ = the later experiment's replies − the earlier one's, same prompts, 95% "
             "paired bootstrap interval, vs the recipe's own difference on ERNIE-4.5-0.3B):", "",
             f"{decided} of {2 * len(comparisons)} intervals exclude 0; the others cannot decide their question"
             + (f" with {n} test prompts." if n else "."), "",
             tabulate(body, headers=["Comparison", "Question", "Δ mean [95% CI] vs recipe",
                                     "Δ median [95% CI] vs recipe", "detectable Δ mean / median (MDE)",
                                     "prompts for the recipe's Δ mean / median"],
                      tablefmt="github", disable_numparse=True)]
    if n:
        lines += ["", f"- detectable Δ (MDE): the smallest difference these {n} prompts find 80% of the time at the "
                  "5% level, (1.96 + 0.84) × the SD of the paired bootstrap Δ. An interval that includes 0 rules out "
                  "differences larger than about this, not a difference as such.",
                  f"- prompts for the recipe's Δ: how many test prompts would find a difference as large as the "
                  f"recipe's own (later − earlier in its table) 80% of the time, = ceil({n} × (MDE / |recipe Δ|)²), "
                  "assuming this test set's spread; more than we have means this test set could not have answered "
                  "the question at the recipe's effect size."]
    return lines


def render(rows, names, short_sha=lambda rev: str(rev)[:7], comparisons=None):
    """metrics/report.md as text; short_sha turns exp_show's revs (a branch name for HEAD) into commits."""
    body, problems, first = table(rows, names)
    commits = sorted({short_sha(r["baseline_rev"]) for r in find(rows, names).values()})
    model = first.get("model.name_or_path")
    label = {"tiny": "the tiny demo model built offline (0.5 M parameters), NOT ERNIE-4.5-0.3B",
             "smollm2-135m": "SmolLM2-135M (4-bit GGUF dequantized), NOT ERNIE"}.get(model, model)
    lines = [
        "# DPO experiments: reply length on the test set",
        "",
        f"Model: **{label}**. Data: `{first.get('data.raw_path')}`. "
        f"Test set: {int(first['baseline.replies'])} prompts; reply lengths in characters "
        f"(lower is better, ↓). Sampling: top_p {first['infer.top_p']:g}, temperature {first['infer.temperature']:g}, "
        f"max_dec_len {int(first['infer.max_dec_len'])}.",
        f"Built by `ernie-dpo report` from `dvc exp show` (experiments of commit {', '.join(commits)}); "
        "rerun it after new experiments.",
        "",
        tabulate(body, headers=HEADERS, tablefmt="github", disable_numparse=True),
        "",
        "- Δ = tuned − baseline on the same prompts, with a 95% paired bootstrap interval (prompts resampled, both "
        "replies of a drawn prompt kept together) "
        f"({int(first['evaluate.bootstrap_samples'])} resamples); an interval that excludes 0 is a real change.",
        "- held-out reward acc.: the engine's eval loop on the experiment's own held-out pairs (trainset.eval_pairs) "
        "after the last step: share of pairs whose chosen answer gets the higher reward.",
        "- probe median while training: median reply length (chars) on the validation prompts at step 0 → the last "
        "step (train.length_probe_steps; measured as the test set is, at infer.max_dec_len unless "
        "train.length_probe_max_dec_len is lower). Choose settings on it; the test-set columns confirm once.",
        "- probes passed: share of forgetting-probe replies whose check passes (name recall, facts, arithmetic, "
        "format; data/probes/probes.jsonl); retention = tuned / baseline pass rate (1.00 = nothing forgotten).",
        "- verdict: \"shorter\" only when a length interval is below 0 AND the replies are still answers: the share "
        "refusing or apologizing, the share repeating a short phrase, the empty and looping shares not up, and "
        "distinct-2 not down, each by more than 0.10 with an interval excluding 0 (and held-out chosen answers' "
        "per-token NLL not up by more than 0.1 nats when measured); otherwise \"shorter but degraded\", naming why "
        "(ernie_dpo/stats.py length_verdict). \"quality not checked\": metrics from before these checks.",
    ]
    if comparisons:
        lines += render_comparisons(comparisons, int(first["baseline.replies"]))
    if problems:
        lines += ["", "Missing:"] + [f"- {p}" for p in problems]
    lines += ["", "For comparison, the original recipe on ERNIE-4.5-0.3B (200 prompts; its numbers, not produced here):",
              "", tabulate([list(r) for r in RECIPE], headers=HEADERS[:5], tablefmt="github", disable_numparse=True),
              "", "(All five rows as published, global batch 1. exp3 came out longer than the baseline, hence exp4's "
              "two epochs and longer warmup. The recipe does not state its fine-tuning mode, learning rate or LoRA "
              "rank.)", ""]
    return "\n".join(lines)


def bar_data(rows, names):
    """Mean and median reply length per experiment, exp0 first (for the bar chart and `dvc plots`)."""
    found = find(rows, names)
    if not found:
        return []
    first = next(iter(found.values()))
    data = [{"experiment": "exp0", "mean_chars": first["baseline.chars_mean"],
             "median_chars": first["baseline.chars_median"]}]
    for n in names:
        if n in found:
            r = found[n]
            # the 95% interval of the tuned value: the baseline's value + the interval of tuned - baseline
            data.append({"experiment": n, "mean_chars": r["tuned.chars_mean"], "median_chars": r["tuned.chars_median"],
                         **{f"{s}_ci": [round(first[f"baseline.chars_{s}"] + r[f"delta.chars_{s}_ci_{e}"], 2)
                                        for e in ("low", "high")] for s in ("mean", "median")},
                         **({"heldout_reward_accuracy": r["dpo.heldout.rewards_accuracies"]}
                            if _num(r.get("dpo.heldout.rewards_accuracies")) else {})})
    return data


# ------------------------------------------------------------------------------------------ ernie-dpo report

REPORT_HELP = """Write metrics/report.md (the recipe's table) and the cross-experiment bar chart from DVC's experiment data.

    ernie-dpo report                      # exp1..exp4 (the newest of each name, last 10 commits)
    ernie-dpo report --names exp2 exp4    # any experiments, in this order

The table's numbers come from `dvc.api.exp_show()` (what `dvc exp show` prints), nothing recomputed; the
recipe's questions (exp2 - exp1, exp3 - exp2, exp3 - exp0, exp4 - exp3) are paired bootstrap intervals on the
experiments' per-prompt reply lengths (metrics/plots/reply_lengths.json in each experiment's commit).
Writes metrics/report.md, metrics/plots/experiments.json (declared under plots: in dvc.yaml) and
metrics/plots/experiments.png.
"""


def reply_lengths(rev):
    """(baseline chars, tuned chars) per test prompt of one experiment: its git-tracked
    metrics/plots/reply_lengths.json (evaluate_tuned), read from the experiment's own commit; None without it."""
    r = subprocess.run(["git", "show", f"{rev}:metrics/plots/reply_lengths.json"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    rows = json.loads(r.stdout)
    return [x["baseline_chars"] for x in rows], [x["tuned_chars"] for x in rows]


def lengths_of(found):
    """{"exp0": baseline chars, name: tuned chars, ...} for the found experiments, refusing experiments whose
    baseline replies differ (another test set or model: no paired comparison is possible)."""
    out = {}
    for name, r in found.items():
        got = reply_lengths(r["rev"])
        if got is None:  # an experiment made before evaluate_tuned wrote the file: its questions are left out
            log.warning("%s: no metrics/plots/reply_lengths.json in its commit %s; left out of the comparisons",
                        name, r["rev"])
            continue
        base, tuned = got
        if out.setdefault("exp0", base) != base:
            raise ReportError(f"{name}: its baseline replies differ from the other experiments'; cannot compare")
        out[name] = tuned
    return out


def short_sha(rev):
    r = subprocess.run(["git", "rev-parse", "--short", str(rev)], capture_output=True, text=True)
    return r.stdout.strip() or str(rev)


def plot_bars(data, model, path):
    import matplotlib.pyplot as plt  # (backend: runtime.setup(), MPLBACKEND=Agg)

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(data))
    w = 0.38
    for offset, stat in ((-w / 2, "mean"), (w / 2, "median")):
        values = [d[f"{stat}_chars"] for d in data]
        # error bars: the 95% bootstrap interval of each experiment's value (none for exp0, the reference)
        err = [[v - d[f"{stat}_ci"][0] if f"{stat}_ci" in d else 0 for v, d in zip(values, data)],
               [d[f"{stat}_ci"][1] - v if f"{stat}_ci" in d else 0 for v, d in zip(values, data)]]
        ax.bar([x + offset for x in xs], values, w, yerr=err, capsize=3, label=f"{stat} (95% interval)")
    ax.set_xticks(list(xs), [d["experiment"] for d in data])
    ax.set(title=f"reply length on the test set per experiment (model: {model})", ylabel="characters")
    acc = [(x, d["heldout_reward_accuracy"]) for x, d in zip(xs, data) if "heldout_reward_accuracy" in d]
    if acc:  # the held-out pairs' reward accuracy after training, on its own axis (0-1)
        right = ax.twinx()
        right.plot([x for x, _ in acc], [a for _, a in acc], "kD", label="held-out reward accuracy (right axis)")
        right.set(ylim=(0, 1.05), ylabel="held-out reward accuracy")
        right.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def committed(out):
    """No experiment of the series in this repository (a fresh clone: `git clone` does not bring experiment refs):
    the committed report, re-rendered from the rows it was made from, and how to get the experiments themselves."""
    saved = json.loads(out.with_suffix(".json").read_text())
    text = render(saved["rows"], saved["names"], saved["shas"].get, saved["comparisons"])
    print(text)
    print(f"\n(No experiment named {', '.join(saved['names'])} in this repository: this is the committed {out}, "
          "re-rendered from its rows. To browse the experiments themselves, fetch them from the DVC/git remote they "
          "were pushed to: `dvc exp pull origin --all-commits` (or `dvc exp list origin`), or run `ernie-dpo series`.)")


def main(argv=None):
    """`ernie-dpo report`: metrics/report.md and the bar chart from `dvc exp show`."""
    import dvc.api

    ap = argparse.ArgumentParser(prog="ernie-dpo report", description=REPORT_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", nargs="+", default=list(NAMES))
    ap.add_argument("--out", default="metrics/report.md")
    ap.add_argument("--commits", type=int, default=10, help="how many recent commits to look for experiments on")
    args = ap.parse_args(argv)
    rows = dvc.api.exp_show(num=args.commits)
    if not find(rows, args.names) and list(args.names) == list(NAMES) and Path(args.out).with_suffix(".json").is_file():
        return committed(Path(args.out))
    try:
        found = find(rows, args.names)
        shas = {r["baseline_rev"]: short_sha(r["baseline_rev"]) for r in found.values()}
        comparisons = []
        if found:  # else render() below says that none was found
            first = next(iter(found.values()))
            comparisons = compare(lengths_of(found), int(first["evaluate.bootstrap_samples"]), int(first["evaluate.seed"]))
        text = render(rows, args.names, shas.get, comparisons)
    except ReportError as e:
        sys.exit(f"report: {e}")
    Path(args.out).write_text(text, encoding="utf-8")
    # the rows the report was made from: report.md is render() of exactly these (tests/test_series.py checks it)
    write_json(Path(args.out).with_suffix(".json"), {"names": args.names, "shas": shas,
                                                     "rows": [found[n] for n in args.names if n in found],
                                                     "comparisons": comparisons})
    data = bar_data(rows, args.names)
    write_json("metrics/plots/experiments.json", data)
    model = next(found[n]["model.name_or_path"] for n in args.names if n in found)  # the rows reported, not others
    plot_bars(data, model, "metrics/plots/experiments.png")
    log.info("wrote %s and metrics/plots/experiments.{json,png} (%d experiments + exp0)", args.out, len(data) - 1)
    print(text)
