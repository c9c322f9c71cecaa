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
`paddleformers-cli train`, which would re-encode the pairs its own way), logs/train/engine.log, metrics/train.json
(last-step, held-out and length-probe values), metrics/dvclive/ (per-step curves) and metrics/plots/dpo_curves.png.
"""
import csv
import math
import shutil
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from dvclive import Live
from tqdm import tqdm

# this checkout's ernie_dpo before the installed one: the editable install points at the workspace, and DVC runs
# queued experiments in copies of the repository, which must run their own code
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ernie_dpo import engine, length_probe, tokens
from ernie_dpo.common import (
    fingerprint,
    get_logger,
    labels,
    load_params,
    read_jsonl,
    sha256_of,
    stage_parser,
    write_json,
    write_jsonl,
)

log = get_logger("train")
OUT, LOGS = Path("models/train"), Path("logs/train")
CURVES = ("loss", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
          "logps/chosen", "logps/rejected")
EVAL_CURVES = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
               "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected")
PANELS = (("loss", ("loss", "eval_loss")), ("reward margin", ("rewards/margins", "eval_rewards/margins")),
          ("reward accuracy", ("rewards/accuracies", "eval_rewards/accuracies")),
          ("reply length while training (median chars)", ("length_probe/chars_median",)))


def read_curve(live_dir, name):
    tsv = Path(live_dir) / "plots/metrics" / f"{name}.tsv"
    if not tsv.is_file():
        return [], []
    with open(tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    col = name.split("/")[-1]
    return [int(r["step"]) for r in rows], [float(r[col]) for r in rows]


def plot_curves(live_dir, title, path):
    """Training and held-out (eval) loss, reward margin and reward accuracy per step, and the reply length probes,
    read back from DVCLive's files (a resumed run included)."""
    panels = [(t, names) for t, names in PANELS if any(read_curve(live_dir, n)[0] for n in names)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (title_, names) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        for name in names:
            steps, values = read_curve(live_dir, name)
            if steps:
                label = ("held-out pairs" if name.startswith("eval_") else "length probe" if "probe" in name
                         else "training")
                ax.plot(steps, values, marker="." if len(steps) < 60 else None, label=label)
        ax.set(title=title_, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def encode_pairs(p, source="data/trainset/train.jsonl", dest=LOGS / "pairs.jsonl", what="pairs", tokenizer=None):
    """Every pair as the token ids the engine will train (or evaluate) on (tokens.fit_pairs); pairs that cannot be
    used are dropped and counted, cut pairs counted with the tokens cut. The rest, ids included, go to `dest`."""
    from paddleformers.transformers import AutoTokenizer

    pairs = read_jsonl(source)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained("models/base")
    kept, counts, cut = tokens.fit_pairs(tokenizer, pairs, p["max_seq_len"], p["max_prompt_len"], p["truncate"],
                                         p["keep_chosen_end"])
    dropped = len(pairs) - len(kept)
    log.info("%d %s offered (max_seq_len %d, max_prompt_len %d, truncate %s): %d fit whole, %d without some "
             "earlier turns, %d cut to fit (tokens cut: prompts %d, chosen %d, rejected %d); dropped: %d longer than "
             "max_seq_len, %d with a prompt longer than max_prompt_len, %d identical once cut, %d whose chosen answer "
             "would be cut (keep_chosen_end); using %d. "
             "Answers end with %s", len(pairs), what, p["max_seq_len"], p["max_prompt_len"], p["truncate"],
             counts["fits"], counts["history_truncated"], counts["truncated"], cut["tokens_cut_prompt"],
             cut["tokens_cut_chosen"], cut["tokens_cut_rejected"], counts["too_long"], counts["prompt_too_long"],
             counts["identical_after_truncation"], counts["chosen_cut"], len(kept),
             "the chat template's end of turn" if not cut["answer_suffix"] else f"{cut['answer_suffix']} appended")
    share = dropped / len(pairs) if pairs else 0.0
    if share > p["max_skipped_share"]:
        sys.exit(f"train: {dropped} of {len(pairs)} {what} ({share:.0%}) cannot be used (longer than "
                 f"train.max_seq_len {p['max_seq_len']}: {counts['too_long']}; prompt longer than "
                 f"train.max_prompt_len {p['max_prompt_len']}: {counts['prompt_too_long']}; identical once cut: "
                 f"{counts['identical_after_truncation']}; chosen answer would be cut: {counts['chosen_cut']}), "
                 f"more than train.max_skipped_share "
                 f"{p['max_skipped_share']}. Raise the lengths, set train.truncate=true to cut long pairs instead "
                 f"of dropping them, or raise the share to train on the rest anyway.")
    write_jsonl(dest, kept)
    return {"pairs_offered": len(pairs), "pairs_trained": len(kept), "pairs_dropped": dropped,
            "pairs_dropped_too_long": counts["too_long"], "pairs_dropped_prompt_too_long": counts["prompt_too_long"],
            "pairs_dropped_identical_after_truncation": counts["identical_after_truncation"],
            "pairs_dropped_chosen_cut": counts["chosen_cut"],
            "pairs_history_truncated": counts["history_truncated"], "pairs_truncated": counts["truncated"],
            **{k: v for k, v in cut.items() if k != "answer_suffix"}}, kept


def write_length_probe_spec(params, eval_pairs, tokenizer):
    """The held-out prompts the length probes answer (train.length_probe_prompts of them), with their seeds."""
    from ernie_dpo.data import prompt_key, to_messages
    from ernie_dpo.decode import prompt_seed

    p, i = params["train"], params["infer"]
    # distinct prompts: held-out pairs come in whole-prompt groups, and one prompt twice would count twice
    chosen, seen = [], set()
    for r in eval_pairs:
        if prompt_key(r) not in seen and len(chosen) < p["length_probe_prompts"]:
            seen.add(prompt_key(r))
            chosen.append(r)
    msgs = [to_messages(r, keep_system=params["testset"]["keep_system"]) for r in chosen]
    stops = tokens.stop_tokens(tokenizer, "models/base", i.get("stop_tokens") or ())
    # prompts cut to their last max_prompt_len tokens, as training sees them: a 3000-token prompt would make every
    # probe (generation inside the training process) cost minutes
    length_probe.write_spec(
        LOGS / length_probe.SPEC_NAME, [tokens.prompt_ids(tokenizer, m)[-p["max_prompt_len"]:] for m in msgs],
        [prompt_seed(i["seed"], r["id"]) for r in chosen], list(stops),
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops), p["length_probe_steps"],
        p["length_probe_max_dec_len"], i["temperature"], i["top_p"], len(chosen), p["stop_if_longer"],
        p["stop_if_longer_probes"])
    return len(chosen)


def engine_inputs(params, work):
    """logs/train/: the pairs (and held-out eval pairs) as token ids, the length-probe spec and dpo.yaml --
    everything the engine reads besides models/base, with paths relative to the repository, built only from
    params.yaml and DVC-tracked inputs, so every node of a multi-node run rebuilds them byte for byte
    (`--worker-node`). Returns (launch command, pair counts of training, of eval, length-probe prompts)."""
    from paddleformers.transformers import AutoTokenizer

    p, e, device = params["train"], params["engine"], params["engine"]["device"]
    tokenizer = AutoTokenizer.from_pretrained("models/base")
    fit, _ = encode_pairs(p, tokenizer=tokenizer)
    if fit["pairs_trained"] == 0:
        sys.exit("train: no training pair is left to train on (see the counts above); raise train.max_seq_len or set "
                 "train.truncate=true")
    eval_fit, eval_pairs = encode_pairs(p, "data/trainset/eval.jsonl", LOGS / "eval_pairs.jsonl", "held-out pairs",
                                        tokenizer)
    probe_prompts = 0
    if p["length_probe_steps"] > 0:
        if not eval_pairs:
            sys.exit("train: train.length_probe_steps > 0 needs held-out prompts: set trainset.eval_pairs")
        probe_prompts = write_length_probe_spec(params, eval_pairs, tokenizer)
    try:
        cfg = engine.dpo_config("models/base", LOGS / "pairs.jsonl", work, device, p, e,
                                eval_path=LOGS / "eval_pairs.jsonl" if eval_pairs else None)
        cfg_path = engine.write_config(cfg, LOGS / "dpo.yaml")
        cmd = engine.launch_command("train", cfg_path, device, e["devices"], e["nnodes"])
    except (ValueError, FileNotFoundError) as err:  # FileNotFoundError: the ernie-dpo launcher is not installed
        sys.exit(f"train: {err}")
    log.info("engine inputs: %s", ", ".join(f"{f.name} sha256 {sha256_of(f)[:16]}" for f in sorted(LOGS.glob("*"))
                                            if f.is_file()))
    return cmd, fit, eval_fit, probe_prompts


def worker_node(args, params, work):
    """Nodes 1..n-1 of a multi-node run (`python stages/train.py --worker-node` after `dvc pull`): the same engine
    inputs as node 0, then the same launch with this node's RANK. Node 0 (the dvc stage) writes every output."""
    if int(params["engine"]["nnodes"]) < 2 and not args.print_only:
        sys.exit("train --worker-node: engine.nnodes is 1; worker nodes are for multi-node runs")
    shutil.rmtree(LOGS, ignore_errors=True)
    cmd, _, _, _ = engine_inputs(params, work)
    log.info("worker node launch: %s", " ".join(cmd))
    if args.print_only:
        print(" ".join(cmd))
        return
    engine.run(cmd, LOGS / "engine.log")


def main():
    ap = stage_parser(__file__, __doc__)
    ap.add_argument("--worker-node", action="store_true",
                    help="on nodes 1..n-1 of a multi-node run (engine.nnodes > 1, RANK set): rebuild the engine "
                         "inputs from params.yaml and `dvc pull`-ed data and join node 0's training; writes no output")
    ap.add_argument("--print-only", action="store_true", help="with --worker-node: build the inputs, print the launch")
    args = ap.parse_args()
    params = load_params()
    p, e, device = params["train"], params["engine"], params["engine"]["device"]
    engine.require_device(params, "train")
    work = Path("checkpoints") / f"train-{fingerprint(['models/base', 'data/trainset/train.jsonl'], [p, e])}"
    if args.worker_node:
        return worker_node(args, params, work)
    if p["warmup_steps"] >= p["max_steps"]:  # valid for the engine, but the peak learning rate is never reached
        log.warning("warmup_steps (%d) >= max_steps (%d): the learning rate only ramps up, to %.0f%% of %g",
                    p["warmup_steps"], p["max_steps"], 100 * p["max_steps"] / p["warmup_steps"], p["learning_rate"])
    resumed = sorted(work.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    for c in [c for c in resumed if not engine.checkpoint_is_complete(c)]:
        log.warning("removing %s: incomplete (the run was killed while saving it), the engine cannot resume from it", c)
        shutil.rmtree(c)
        resumed.remove(c)
    if resumed:
        log.info("resuming from %s (an earlier run with the same inputs was interrupted)", resumed[-1])
    for d in (OUT, LOGS):
        shutil.rmtree(d, ignore_errors=True)
    cmd, fit, eval_fit, probe_prompts = engine_inputs(params, work)
    if int(e["nnodes"]) > 1:
        log.info("node 0 of %s; on every other node, after `git checkout` of this commit and `dvc pull`, run with its "
                 "own RANK (1..%d), MASTER_ADDR=<this node> and MASTER_PORT: python stages/train.py --worker-node",
                 e["nnodes"], int(e["nnodes"]) - 1)
    log.info("launch: %s", " ".join(cmd))
    log.info("DPO (%s, loss %s, beta %s): %d steps, warmup %d, global batch %d, lr %g on %s (engine log: %s)",
             p["fine_tuning"], p["loss_type"], p["beta"], p["max_steps"], p["warmup_steps"], p["global_batch_size"],
             p["learning_rate"], device, LOGS / "engine.log")
    last, heldout, probes, stopped = {}, {}, [], {}
    start = time.time()
    with Live(dir="metrics/dvclive", dvcyaml=None, save_dvc_exp=False, report=None, resume=bool(resumed)) as live, \
            tqdm(total=p["max_steps"], desc="DPO", unit="step") as bar:
        def on_step(s):
            if "eval_loss" in s:  # the engine's eval loop on the held-out pairs (the last one is printed twice)
                if heldout.get("eval_loss") == s["eval_loss"] and heldout.get("step") == last.get("global_step"):
                    return
                live.step = s.get("global_step", last.get("global_step", 0))
                heldout["step"] = live.step
                for k in EVAL_CURVES:
                    if k in s:
                        live.log_metric(k, s[k], plot=True)
                heldout.update(s)
                return
            live.step = s["global_step"]
            for k in CURVES:
                if k in s:
                    live.log_metric(k, s[k], plot=True)
            last.update(s)
            bar.set_postfix(loss=f"{s['loss']:.3f}", margin=f"{s.get('rewards/margins', 0):.2f}",
                            **({"reply_median": probes[-1]["chars_median"]} if probes else {}))
            bar.update(s["global_step"] - bar.n)

        def on_line(line):
            found = length_probe.parse_line(line)
            if found is None:
                return
            kind, data = found
            if kind == "stopped":
                stopped.update(data)
                return
            probes.append(data)
            live.step = data["step"]
            for k in ("chars_median", "chars_mean", "cut_share"):
                live.log_metric(f"length_probe/{k}", data[k], plot=True)
            log.info("length probe at step %d: replies to %d held-out prompts: median %.0f chars, mean %.0f, "
                     "cut at %d tokens: %.0f%%", data["step"], probe_prompts, data["chars_median"],
                     data["chars_mean"], p["length_probe_max_dec_len"], 100 * data["cut_share"])

        engine.run(cmd, LOGS / "engine.log", on_step, on_line=on_line)
        live.make_summary()
    if not last:
        sys.exit(f"train: the engine logged no training step; see {LOGS / 'engine.log'}")
    if not math.isfinite(last.get("loss", 0.0)):
        sys.exit(f"train: the loss is {last['loss']} at step {last['global_step']} (the run diverged): lower "
                 f"train.learning_rate; see {LOGS / 'engine.log'}")
    skipped = engine.engine_skips((LOGS / "engine.log").read_text(encoding="utf-8", errors="replace"))
    if skipped:
        sys.exit(f"train: the engine skipped {skipped} pair(s) that the length count said fit (see '[SKIP]' in "
                 f"{LOGS / 'engine.log'}): pairs trained would not be pairs reported")
    title = (f"{params['model']['name_or_path']}: {p['fine_tuning']}, {p['max_steps']} steps, warmup "
             f"{p['warmup_steps']}, batch {p['global_batch_size']}")
    plot_curves("metrics/dvclive", title, "metrics/plots/dpo_curves.png")
    final = {**labels(params),
             "steps_done": int(last["global_step"]), "seconds": round(time.time() - start, 1), **fit,
             "examples_seen": int(last["global_step"]) * int(p["global_batch_size"])}
    final["epochs"] = round(final["examples_seen"] / fit["pairs_trained"], 2)
    final["last_step"] = {k.replace("/", "_"): round(v, 5) for k, v in last.items()
                          if k in CURVES and k != "learning_rate"}
    if heldout:
        final["heldout"] = {"pairs": eval_fit["pairs_trained"],
                            **{k[len("eval_"):].replace("/", "_"): round(v, 5) for k, v in heldout.items()
                               if k in EVAL_CURVES}}
    if probes:
        final["length_probe"] = {"prompts": probe_prompts, "probes": len(probes),
                                 "step0_chars_median": probes[0]["chars_median"],
                                 "final_chars_median": probes[-1]["chars_median"],
                                 "final_cut_share": probes[-1]["cut_share"]}
    final["stopped_early"] = bool(stopped)
    write_json("metrics/train.json", {"dpo": final})  # "dpo", not "train": params own train.*
    if stopped:
        sys.exit(f"train: STOPPED at step {stopped['step']} of {p['max_steps']}: replies to the held-out prompts grew "
                 f"(median {probes[0]['chars_median']:.0f} chars at step 0 -> {probes[-1]['chars_median']:.0f}, more "
                 f"than train.stop_if_longer={p['stop_if_longer']} above step 0 for "
                 f"{p['stop_if_longer_probes']} probes in a row). The curves are in metrics/plots/dpo_curves.png and "
                 "metrics/train.json; this run teaches the model to answer LONGER (the recipe's exp3): try "
                 "train.sft_loss_ratio, more warmup, a lower learning rate, or other pairs.")
    # the finished model (not the checkpoints) becomes the DVC output; the work folder is no longer needed
    OUT.mkdir(parents=True)
    for f in work.iterdir():
        if not f.name.startswith("checkpoint-"):
            f.rename(OUT / f.name)
    shutil.rmtree(work)
    log.info("done: step %d, loss %.4f, reward margin %.3f, accuracy %.2f (%.0f s)%s", last["global_step"],
             last["loss"], last.get("rewards/margins", float("nan")), last.get("rewards/accuracies", float("nan")),
             final["seconds"], f"; held-out reward accuracy {heldout['eval_rewards/accuracies']:.2f}"
             if "eval_rewards/accuracies" in heldout else "")


if __name__ == "__main__":
    main()
