"""Write metrics/report.md (the recipe's table) and the cross-experiment bar chart from DVC's experiment data.

    python experiments/report.py                      # exp1..exp4 (the newest of each name, last 10 commits)
    python experiments/report.py --names exp2 exp4    # any experiments, in this order

Every number comes from `dvc.api.exp_show()` (what `dvc exp show` prints); nothing is recomputed here.
Writes metrics/report.md, metrics/plots/experiments.json (declared under plots: in dvc.yaml) and
metrics/plots/experiments.png.
"""
import argparse
import subprocess
import sys
from pathlib import Path

import dvc.api
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ernie_dpo.common import get_logger, write_json  # noqa: E402
from ernie_dpo.report import ReportError, bar_data, render  # noqa: E402
from ernie_dpo.series import NAMES  # noqa: E402

log = get_logger("report")


def short_sha(rev):
    r = subprocess.run(["git", "rev-parse", "--short", str(rev)], capture_output=True, text=True)
    return r.stdout.strip() or str(rev)


def plot_bars(data, model, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(data))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [d["mean_chars"] for d in data], w, label="mean")
    ax.bar([x + w / 2 for x in xs], [d["median_chars"] for d in data], w, label="median")
    ax.set_xticks(list(xs), [d["experiment"] for d in data])
    ax.set(title=f"reply length on the test set per experiment (model: {model})", ylabel="characters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", nargs="+", default=list(NAMES))
    ap.add_argument("--out", default="metrics/report.md")
    ap.add_argument("--commits", type=int, default=10, help="how many recent commits to look for experiments on")
    args = ap.parse_args()
    rows = dvc.api.exp_show(num=args.commits)
    try:
        text = render(rows, args.names, short_sha)
    except ReportError as e:
        sys.exit(f"report: {e}")
    Path(args.out).write_text(text, encoding="utf-8")
    data = bar_data(rows, args.names)
    write_json("metrics/plots/experiments.json", data)
    model = next(r["model.name_or_path"] for r in rows if r.get("Experiment") in args.names)
    plot_bars(data, model, "metrics/plots/experiments.png")
    log.info("wrote %s and metrics/plots/experiments.{json,png} (%d experiments + exp0)", args.out, len(data) - 1)
    print(text)


if __name__ == "__main__":
    main()
