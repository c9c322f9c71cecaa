"""analyze: chosen/rejected character lengths of the prepared data -> metrics, plot data and a histogram PNG."""
from pathlib import Path


import matplotlib.pyplot as plt

from ernie_dpo.common import (
    get_logger,
    labels,
    load_params,
    read_jsonl,
    stage_parser,
    write_json,
)
from ernie_dpo.data import chosen_text, rejected_text
from ernie_dpo.stats import describe

log = get_logger("analyze")


def main():
    stage_parser(__file__, __doc__).parse_args()
    bins = load_params()["analyze"]["bins"]
    records = read_jsonl("data/prepared/dpo.jsonl")
    chosen = [len(chosen_text(r)) for r in records]
    rejected = [len(rejected_text(r)) for r in records]
    ratio = [r / c for c, r in zip(chosen, rejected)]
    metrics = {**describe(chosen, "chosen_chars_"), **describe(rejected, "rejected_chars_")}
    metrics["pairs_ratio_ge_1_2"] = sum(x >= 1.2 for x in ratio)
    metrics["pairs_ratio_ge_2"] = sum(x >= 2 for x in ratio)
    write_json("metrics/data.json", {"data": {**labels(load_params()), **metrics}})
    # plot data for `dvc plots show` (one row per pair: tiny, git-tracked)
    write_json("metrics/plots/data_lengths.json",
               [{"pair": i, "chosen_chars": c, "rejected_chars": r} for i, (c, r) in enumerate(zip(chosen, rejected))])

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, lengths, name, color in ((axes[0], chosen, "chosen", "tab:green"), (axes[1], rejected, "rejected", "tab:red")):
        ax.hist(lengths, bins=bins, color=color, alpha=0.8)
        for stat, style in (("mean", "--"), ("median", ":")):
            value = metrics[f"{name}_chars_{stat}"]
            ax.axvline(value, color="k", linestyle=style, label=f"{stat} {value:.0f}")
        ax.set(title=f"{name} answers (n={len(lengths)})", xlabel="length (characters)", ylabel="pairs")
        ax.legend()
    fig.tight_layout()
    Path("metrics/plots").mkdir(parents=True, exist_ok=True)
    fig.savefig("metrics/plots/data_lengths.png", dpi=100)
    log.info("chosen: mean %.1f / median %.1f chars; rejected: mean %.1f / median %.1f chars; "
             "%d pairs with rejected >= 1.2x chosen, %d with >= 2x",
             metrics["chosen_chars_mean"], metrics["chosen_chars_median"], metrics["rejected_chars_mean"],
             metrics["rejected_chars_median"], metrics["pairs_ratio_ge_1_2"], metrics["pairs_ratio_ge_2"])


if __name__ == "__main__":
    main()
