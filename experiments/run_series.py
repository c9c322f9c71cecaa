"""Run the recipe's experiment series exp1-exp4 (exp0 = the baseline) as named DVC experiments, then the report.

    python experiments/run_series.py             # current profile (params.yaml), one experiment at a time
    python experiments/run_series.py --jobs 2    # two at a time (CPU: needs the RAM; one GPU: keep 1)
    python experiments/run_series.py --dry       # print the dvc commands and stop

What it does, in order:
1. `dvc repro evaluate_baseline`: prepared data, test set and baseline metrics in the workspace (no-op when done).
2. Counts the pairs of each training-set variant with the trainset stage's own code, and plans exp1-exp4
   (ernie_dpo/series.py: sizes, max_steps = one epoch, exp4 = 2 epochs with 10% warmup).
3. Removes earlier experiments with these names on this commit, queues the four with every varied key set
   (`dvc exp run --queue -n expN -S ...`) and runs the queue (`dvc exp run --run-all -j N`).
   Queued experiments run in temp folders: the workspace and its params.yaml are left as they are.
4. Checks every experiment finished, then writes metrics/report.md (experiments/report.py).
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dvc.api  # noqa: E402

from ernie_dpo.common import get_logger, load_params, read_json, read_jsonl  # noqa: E402
from ernie_dpo.data import DataError, pool_outside  # noqa: E402
from ernie_dpo.report import find  # noqa: E402
from ernie_dpo.series import NAMES, count_pairs, overrides, plan  # noqa: E402

log = get_logger("series")
DVC = [sys.executable, "-m", "dvc"]


def sh(args, check=True):
    log.info("$ %s", " ".join(args[2:] if args[:3] == DVC else args))
    r = subprocess.run(args)
    if check and r.returncode != 0:
        sys.exit(f"series: `{' '.join(args)}` failed (exit {r.returncode})")
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1, help="experiments run at the same time (one GPU: 1)")
    ap.add_argument("--dry", action="store_true", help="print the plan and the dvc commands, run nothing")
    args = ap.parse_args()
    start = time.time()

    # Uncommitted changes to conf/ would be copied into every queued experiment: refuse rather than mix them in.
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "conf", "dvc.yaml", "stages", "ernie_dpo"],
                           capture_output=True, text=True, check=True).stdout.strip()
    if dirty and not args.dry:
        sys.exit("series: commit or revert these changes first (they would enter every experiment):\n" + dirty)

    params = load_params()
    profile = params["profile_name"]
    if not args.dry:
        sh(DVC + ["repro", "evaluate_baseline"])
    try:
        pool, _, _ = pool_outside(read_jsonl("data/prepared/dpo.jsonl"), read_jsonl("data/testset/testset.jsonl"))
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"series: {e} (run `dvc repro evaluate_baseline` first)")
    baseline_mean = read_json("metrics/baseline.json")["baseline"]["len_mean"]
    counts = count_pairs(pool, baseline_mean, params["trainset"]["baseline_tolerance"])
    t = params["train"]
    experiments = plan(counts, t["global_batch_size"], t["warmup_steps"])
    log.info("profile %s: pool of %d pairs outside the test set; near-baseline %d, ratio>=1.2 %d, ratio>=2 %d; "
             "global batch %d", profile, len(pool), counts["near_baseline"], counts["ratio_1.2"], counts["ratio_2"],
             t["global_batch_size"])
    for name, p in experiments.items():
        log.info("%s: %s", name, ", ".join(f"{k}={v}" for k, v in p.items()))
    runs = [DVC + ["exp", "run", "--queue", "-n", name, "-S", f"profile={profile}", *overrides(p)]
            for name, p in experiments.items()]
    if args.dry:
        for cmd in runs:
            print("dvc " + " ".join(cmd[3:]))
        print(f"dvc exp run --run-all -j {args.jobs}")
        return

    existing = [r["Experiment"] for r in dvc.api.exp_show() if r.get("Experiment") in NAMES and r["typ"] != "baseline"]
    if existing:
        log.info("replacing earlier experiments on this commit: %s", ", ".join(existing))
        sh(DVC + ["exp", "remove", *existing])
    for cmd in runs:
        sh(cmd)
    sh(DVC + ["exp", "run", "--run-all", "-j", str(args.jobs)], check=False)

    done = find(dvc.api.exp_show(), NAMES)  # the finished ones (with tuned metrics)
    failed = [n for n in experiments if n not in done]
    for n in experiments:
        if n in done:
            log.info("%s: tuned mean %.1f / median %.1f chars (baseline %.1f / %.1f)", n, done[n]["tuned.len_mean"],
                     done[n]["tuned.len_median"], done[n]["baseline.len_mean"], done[n]["baseline.len_median"])
    if failed:
        sys.exit(f"series: {', '.join(failed)} did not finish; see `dvc queue status` and `dvc queue logs <name>`")
    log.info("series done in %.0f s", time.time() - start)
    sh([sys.executable, "experiments/report.py"])


if __name__ == "__main__":
    main()
