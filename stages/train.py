"""train: DPO on the training set with PaddleFormers; every logged step goes to DVCLive.

Checkpoints (train.save_steps > 0) go to checkpoints/train-<hash of base model, training set and train params>/, outside
DVC's outputs: a run killed after a checkpoint resumes from it when the stage runs again (the engine resumes from the
newest checkpoint-N in its output folder); a run with any other input starts afresh.

Before training, every pair is encoded into the token ids the engine will train on (tokens.fit_pairs: the base
model's tokenizer and chat template, targets that end as the template ends a turn). A pair longer than
train.max_seq_len, or with a prompt longer than train.max_prompt_len, is dropped and counted -- or, with
train.truncate, cut to fit (earlier turns, then the prompt from the left, then the answers from the right) and
counted. The engine is given the ids themselves (logs/train/pairs.jsonl, `token_ids`) and trains on exactly them.
More than train.max_skipped_share dropped stops the stage. After training, any "[SKIP]" in the engine log is an error:
pairs offered - pairs dropped = pairs trained, on every profile.

Outputs: models/train (LoRA adapter or full model), logs/train/pairs.jsonl, logs/train/dpo.yaml (the exact engine
config; rerun it by hand with `python -m ernie_dpo.engine train logs/train/dpo.yaml`, never with
`paddleformers-cli train`, which would re-encode the pairs its own way), logs/train/engine.log, metrics/train.json (final values), metrics/dvclive/ (per-step curves) and
metrics/plots/dpo_curves.png.
"""
import csv
import shutil
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dvclive import Live
from tqdm import tqdm

from ernie_dpo import engine, tokens
from ernie_dpo.common import fingerprint, get_logger, load_params, read_jsonl, stage_parser, write_json, write_jsonl

log = get_logger("train")
OUT, LOGS = Path("models/train"), Path("logs/train")
CURVES = ("loss", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
          "logps/chosen", "logps/rejected")


def plot_curves(live_dir, title, path):
    """loss, reward margin and reward accuracy per step, read back from DVCLive's files (a resumed run included)."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, name in zip(axes, ("loss", "rewards/margins", "rewards/accuracies")):
        tsv = Path(live_dir) / "plots/metrics" / f"{name}.tsv"
        with open(tsv, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        col = name.split("/")[-1]
        ax.plot([int(r["step"]) for r in rows], [float(r[col]) for r in rows], marker=".")
        ax.set(title=f"DPO {name}", xlabel="step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def encode_pairs(p):
    """Every pair as the token ids the engine will train on (tokens.fit_pairs); pairs that cannot be trained on are
    dropped and counted, cut pairs counted with the tokens cut. The rest, ids included, go to the engine."""
    from paddleformers.transformers import AutoTokenizer

    pairs = read_jsonl("data/trainset/train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained("models/base")
    kept, counts, cut = tokens.fit_pairs(tokenizer, pairs, p["max_seq_len"], p["max_prompt_len"], p["truncate"])
    dropped = len(pairs) - len(kept)
    log.info("%d pairs offered (max_seq_len %d, max_prompt_len %d, truncate %s): %d fit whole, %d without some "
             "earlier turns, %d cut to fit (tokens cut: prompts %d, chosen %d, rejected %d); dropped: %d longer than "
             "max_seq_len, %d with a prompt longer than max_prompt_len, %d identical once cut; training on %d. "
             "Answers end with %s", len(pairs), p["max_seq_len"], p["max_prompt_len"], p["truncate"],
             counts["fits"], counts["history_truncated"], counts["truncated"], cut["tokens_cut_prompt"],
             cut["tokens_cut_chosen"], cut["tokens_cut_rejected"], counts["too_long"], counts["prompt_too_long"],
             counts["identical_after_truncation"], len(kept),
             "the chat template's end of turn" if not cut["answer_suffix"] else f"{cut['answer_suffix']} appended")
    share = dropped / len(pairs)
    if share > p["max_skipped_share"]:
        sys.exit(f"train: {dropped} of {len(pairs)} pairs ({share:.0%}) cannot be trained on (longer than "
                 f"train.max_seq_len {p['max_seq_len']}: {counts['too_long']}; prompt longer than "
                 f"train.max_prompt_len {p['max_prompt_len']}: {counts['prompt_too_long']}; identical once cut: "
                 f"{counts['identical_after_truncation']}), more than train.max_skipped_share "
                 f"{p['max_skipped_share']}. Raise the lengths, set train.truncate=true to cut long pairs instead "
                 f"of dropping them, or raise the share to train on the rest anyway.")
    write_jsonl(LOGS / "pairs.jsonl", kept)
    return {"pairs_offered": len(pairs), "pairs_trained": len(kept), "pairs_dropped": dropped,
            "pairs_dropped_too_long": counts["too_long"], "pairs_dropped_prompt_too_long": counts["prompt_too_long"],
            "pairs_dropped_identical_after_truncation": counts["identical_after_truncation"],
            "pairs_history_truncated": counts["history_truncated"], "pairs_truncated": counts["truncated"],
            **{k: v for k, v in cut.items() if k != "answer_suffix"}}


def main():
    stage_parser(__file__, __doc__).parse_args()
    params = load_params()
    p, e, device = params["train"], params["engine"], params["engine"]["device"]
    engine.require_device(params, "train")
    if p["warmup_steps"] >= p["max_steps"]:  # valid for the engine, but the peak learning rate is never reached
        log.warning("warmup_steps (%d) >= max_steps (%d): the learning rate only ramps up, to %.0f%% of %g",
                    p["warmup_steps"], p["max_steps"], 100 * p["max_steps"] / p["warmup_steps"], p["learning_rate"])
    work = Path("checkpoints") / f"train-{fingerprint(['models/base', 'data/trainset/train.jsonl'], [p, e])}"
    resumed = sorted(work.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    for c in [c for c in resumed if not engine.checkpoint_is_complete(c)]:
        log.warning("removing %s: incomplete (the run was killed while saving it), the engine cannot resume from it", c)
        shutil.rmtree(c)
        resumed.remove(c)
    if resumed:
        log.info("resuming from %s (an earlier run with the same inputs was interrupted)", resumed[-1])
    for d in (OUT, LOGS):
        shutil.rmtree(d, ignore_errors=True)
    fit = encode_pairs(p)
    try:
        cfg = engine.dpo_config("models/base", LOGS / "pairs.jsonl", work, device, p, e)
        cfg_path = engine.write_config(cfg, LOGS / "dpo.yaml")
        cmd = engine.launch_command("train", cfg_path, device, e["devices"], e["nnodes"])
    except ValueError as err:
        sys.exit(f"train: {err}")
    if int(e["nnodes"]) > 1:
        log.info("node %s of %s; every other node runs the same launch with its own RANK: %s", cmd[cmd.index("--rank") + 1],
                 e["nnodes"], " ".join(cmd))
    log.info("DPO (%s, loss %s, beta %s): %d steps, warmup %d, global batch %d, lr %g on %s (engine log: %s)",
             p["fine_tuning"], p["loss_type"], p["beta"], p["max_steps"], p["warmup_steps"], p["global_batch_size"],
             p["learning_rate"], device, LOGS / "engine.log")
    last = {}
    start = time.time()
    with Live(dir="metrics/dvclive", dvcyaml=None, save_dvc_exp=False, report=None, resume=bool(resumed)) as live, \
            tqdm(total=p["max_steps"], desc="DPO", unit="step") as bar:
        def on_step(s):
            live.step = s["global_step"]
            for k in CURVES:
                if k in s:
                    live.log_metric(k, s[k], plot=True)
            live.next_step()
            last.update(s)
            bar.set_postfix(loss=f"{s['loss']:.3f}", margin=f"{s.get('rewards/margins', 0):.2f}")
            bar.update(s["global_step"] - bar.n)
        engine.run(cmd, LOGS / "engine.log", on_step)
    if not last:
        sys.exit(f"train: the engine logged no training step; see {LOGS / 'engine.log'}")
    skipped = engine.engine_skips((LOGS / "engine.log").read_text(encoding="utf-8", errors="replace"))
    if skipped:
        sys.exit(f"train: the engine skipped {skipped} pair(s) that the length count said fit (see '[SKIP]' in "
                 f"{LOGS / 'engine.log'}): pairs trained would not be pairs reported")
    # the finished model (not the checkpoints) becomes the DVC output; the work folder is no longer needed
    OUT.mkdir(parents=True)
    for f in work.iterdir():
        if not f.name.startswith("checkpoint-"):
            f.rename(OUT / f.name)
    shutil.rmtree(work)
    final = {k.replace("/", "_"): round(v, 5) for k, v in last.items() if k in CURVES or k == "global_step"}
    final["seconds"] = round(time.time() - start, 1)
    final.update(fit)
    final["examples_seen"] = int(last["global_step"]) * int(p["global_batch_size"])
    final["epochs"] = round(final["examples_seen"] / fit["pairs_trained"], 2)
    write_json("metrics/train.json", {"dpo": final})  # "dpo", not "train": params own train.*
    plot_curves("metrics/dvclive", f"{params['model']['name_or_path']}: {p['fine_tuning']}, {p['max_steps']} steps, "
                f"warmup {p['warmup_steps']}, batch {p['global_batch_size']}", "metrics/plots/dpo_curves.png")
    log.info("done: step %d, loss %.4f, reward margin %.3f, accuracy %.2f (%.0f s)", last["global_step"], last["loss"],
             last.get("rewards/margins", float("nan")), last.get("rewards/accuracies", float("nan")), final["seconds"])


if __name__ == "__main__":
    main()
