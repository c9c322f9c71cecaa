"""The recipe's comparison table, built from DVC's own experiment data (rows of `dvc.api.exp_show()`).

Each row of exp_show is a flat dict: "Experiment" (name), "rev", params by their dotted key ("train.max_steps") and
metrics by theirs ("tuned.len_mean"); metric keys are unique across files, so no key needs a file prefix.
exp0 (the base model) is not an experiment of its own: every experiment carries the same baseline metrics (the
stages before trainset do not change between them), and the report checks that they agree.
"""
import math

from tabulate import tabulate

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
HEADERS = ["Experiment", "Training set", "Training parameters", "↓ mean length", "↓ median length",
           "Δ mean [95% CI]", "Δ median [95% CI]", "probes passed", "retention"]


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
        elif r.get("Experiment") in names and r.get("tuned.len_mean") is not None:
            found.setdefault(r["Experiment"], {**_unprefixed(r), "baseline_rev": commit})
    return found


def training_set(r):
    if r["trainset.strategy"] == "near_baseline":
        rule = (f"rejected within ±{r['trainset.baseline_tolerance']:.0%} of the baseline mean "
                f"({r['baseline.len_mean']:.1f} chars) and ≥ {r['trainset.min_ratio']:g}× chosen")
    else:
        rule = f"rejected ≥ {r['trainset.min_ratio']:g}× chosen"
    return f"{rule}, {int(r['trainset.pairs'])} pairs"


def training_params(r):
    return (f"{r['train.fine_tuning']}, {int(r['train.max_steps'])} steps, warmup {int(r['train.warmup_steps'])}, "
            f"batch {int(r['train.global_batch_size'])}, lr {r['train.learning_rate']:g}")


def table(rows, names):
    """(table rows, problems): exp0 from the shared baseline, then one row per named experiment in order."""
    found = find(rows, names)
    problems = [f"{n}: no finished experiment of that name" for n in names if n not in found]
    if not found:
        raise ReportError("none of the experiments " + ", ".join(names) + " exists on the recent commits; "
                          "run `python experiments/run_series.py` first")
    baselines = {(r["baseline.len_mean"], r["baseline.len_median"]) for r in found.values()}
    if len(baselines) > 1:
        raise ReportError(f"the experiments do not share one baseline (baseline mean/median: {sorted(baselines)}); "
                          "they were run on different test sets or models and cannot go in one table")
    first = next(iter(found.values()))
    out = [["exp0", "— (base model, no training)", "—", _fmt(first["baseline.len_mean"]),
            _fmt(first["baseline.len_median"]), "—", "—", _fmt(first.get("probes_baseline.pass_rate"), 2), "—"]]
    for n in names:
        if n not in found:
            out.append([n, "not run", "—", "—", "—", "—", "—", "—", "—"])
            continue
        r = found[n]
        out.append([
            n, training_set(r), training_params(r), _fmt(r["tuned.len_mean"]), _fmt(r["tuned.len_median"]),
            f"{r['delta.len_mean']:+.1f} [{r['delta.len_mean_ci_low']:+.1f}, {r['delta.len_mean_ci_high']:+.1f}]",
            f"{r['delta.len_median']:+.1f} [{r['delta.len_median_ci_low']:+.1f}, {r['delta.len_median_ci_high']:+.1f}]",
            _fmt(r.get("probes_tuned.pass_rate"), 2), _fmt(r.get("probes_tuned.retention"), 2),
        ])
    return out, problems, first


def render(rows, names, short_sha=lambda rev: str(rev)[:7]):
    """metrics/report.md as text; short_sha turns exp_show's revs (a branch name for HEAD) into commits."""
    body, problems, first = table(rows, names)
    commits = sorted({short_sha(r["baseline_rev"]) for r in find(rows, names).values()})
    model = first.get("model.name_or_path")
    label = ("the tiny demo model built offline (0.5 M parameters), NOT ERNIE-4.5-0.3B"
             if model == "tiny" else model)
    lines = [
        "# DPO experiments: reply length on the test set",
        "",
        f"Model: **{label}**. Test set: {int(first['baseline.replies'])} prompts; reply lengths in characters "
        f"(lower is better, ↓). Sampling: top_p {first['infer.top_p']:g}, temperature {first['infer.temperature']:g}, "
        f"max_dec_len {int(first['infer.max_dec_len'])}.",
        f"Built by `python experiments/report.py` from `dvc exp show` (experiments of commit {', '.join(commits)}); "
        "rerun it after new experiments.",
        "",
        tabulate(body, headers=HEADERS, tablefmt="github", disable_numparse=True),
        "",
        "- Δ = tuned − baseline on the same prompts, with a 95% bootstrap interval "
        f"({int(first['evaluate.bootstrap_samples'])} resamples); an interval that excludes 0 is a real change.",
        "- probes passed: share of forgetting-probe replies whose check passes (name recall, facts, arithmetic, "
        "format; data/probes/probes.jsonl); retention = tuned / baseline pass rate (1.00 = nothing forgotten).",
    ]
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
    data = [{"experiment": "exp0", "mean_chars": first["baseline.len_mean"], "median_chars": first["baseline.len_median"]}]
    data += [{"experiment": n, "mean_chars": found[n]["tuned.len_mean"], "median_chars": found[n]["tuned.len_median"]}
             for n in names if n in found]
    return data
