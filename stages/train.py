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
config; rerun it by hand with `python -m ernie_dpo.engine_main train logs/train/dpo.yaml`, never with
`paddleformers-cli train`, which would re-encode the pairs its own way), logs/train/engine.log, metrics/train.json
(last-step, held-out and length-probe values), metrics/dvclive/ (per-step curves) and metrics/plots/dpo_curves.png.
"""
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path


import matplotlib.pyplot as plt
from dvclive import Live
from tqdm import tqdm

from ernie_dpo import devices, engine, engine_main, launch, length_probe, tokens, weights
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
# What the engine logs per step. "loss" is the total (DPO loss + sft_loss); the engine names the DPO part after the
# loss type ("sigmoid_loss", "ipo_loss", ...), logged here as "dpo_loss"; "sft_loss" is train.sft_loss_ratio x the
# chosen answers' NLL (the term as it enters the loss; 0 when the ratio is 0).
CURVES = ("loss", "dpo_loss", "sft_loss", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
          "rewards/margins", "logps/chosen", "logps/rejected")
EVAL_CURVES = tuple("eval_" + c for c in CURVES if c != "learning_rate")
PANELS = (("total loss", ("loss", "eval_loss")), ("DPO loss", ("dpo_loss", "eval_dpo_loss")),
          ("NLL term (sft_loss)", ("sft_loss", "eval_sft_loss")),
          ("reward margin", ("rewards/margins", "eval_rewards/margins")),
          ("reward accuracy", ("rewards/accuracies", "eval_rewards/accuracies")),
          ("rewards", ("rewards/chosen", "rewards/rejected", "eval_rewards/chosen", "eval_rewards/rejected")),
          ("log-probs", ("logps/chosen", "logps/rejected", "eval_logps/chosen", "eval_logps/rejected")),
          ("reply length, validation prompts (median chars)", ("length_probe/chars_median",)),
          ("held-out NLL of chosen answers (nats/token)", ("length_probe/nll_per_token",)))


def engine_names(s, loss_type):
    """A parsed engine line with the DPO loss under one name whatever the loss type ("sigmoid_loss" -> "dpo_loss")."""
    out = dict(s)
    for prefix in ("", "eval_"):
        if f"{prefix}{loss_type}_loss" in out:
            out[f"{prefix}dpo_loss"] = out.pop(f"{prefix}{loss_type}_loss")
    return out


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
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title_, names) in zip(axes.flat, panels):
        for name in names:
            steps, values = read_curve(live_dir, name)
            if steps:
                label = ("held-out pairs" if name.startswith("eval_") else "validation prompts" if "probe" in name
                         else "training")
                if name.split("/")[-1] in ("chosen", "rejected"):
                    label += " " + name.split("/")[-1]
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


def probe_summary(probes, prompts):
    """metrics/train.json's dpo.length_probe: step 0 and the last probe on the validation prompts, the last one's
    median minus step 0's with its paired 95% interval (the same prompts and seeds), and the cap it was held to."""
    first, final = probes[0], probes[-1]
    start = "step0" if first["step"] == 0 else f"step{first['step']}"  # step 0's probe failed: say which one this is
    out = {"prompts": prompts, "probes": len(probes), f"{start}_chars_median": first["chars_median"],
           "final_chars_median": final["chars_median"], f"{start}_chars_mean": first["chars_mean"],
           "final_chars_mean": final["chars_mean"], f"{start}_cut_share": first["cut_share"],
           "final_cut_share": final["cut_share"]}
    for k in ("delta_chars_median", "delta_chars_median_ci_low", "delta_chars_median_ci_high"):
        if k in final:
            out[k] = final[k]
    return out


def heldout_likelihood(base, tuned, e):
    """Per-token NLL of the validation prompts' chosen answers, the tuned policy (last probe) minus the base model
    (step 0), with a paired 95% bootstrap interval over answers: > 0 means the tuned model predicts good answers it
    was not trained on WORSE (a model that only learned to apologise does)."""
    from ernie_dpo.bootstrap import bootstrap_delta

    d, lo, hi = bootstrap_delta(base, tuned, "mean", e["bootstrap_samples"], e["seed"])
    return {"answers": len(base), "base_nll_per_token": round(sum(base) / len(base), 4),
            "tuned_nll_per_token": round(sum(tuned) / len(tuned), 4), "delta_nll_per_token": round(d, 4),
            "delta_nll_per_token_ci_low": round(lo, 4), "delta_nll_per_token_ci_high": round(hi, 4)}


def write_length_probe_spec(params, tokenizer, work):
    """The validation prompts the length probes answer (train.length_probe_prompts of them, 0: all), encoded whole
    as the infer stage encodes a test prompt and with the same per-prompt seeds, and their chosen answers for the
    held-out likelihood. Returns how many prompts."""
    from ernie_dpo.decode import prompt_seed

    p, i = params["train"], params["infer"]
    validation = read_jsonl("data/testset/validation.jsonl")
    if p["length_probe_prompts"]:
        validation = validation[:p["length_probe_prompts"]]
    stops = tokens.stop_tokens(tokenizer, "models/base", i.get("stop_tokens") or ())
    suffix = tokens.answer_suffix(tokenizer)
    scored = []
    for r in validation:  # the chosen answer as training would encode it (never cut: no length limit here)
        pair = tokens.encode_pair(tokenizer, r["messages"], r["response"][0][0], r["response"][1][0], 10 ** 9,
                                  10 ** 9, False, suffix, True)
        scored.append([pair.prompt, pair.chosen])
    cap = p["length_probe_max_dec_len"] or i["max_dec_len"]
    length_probe.write_spec(
        LOGS / length_probe.SPEC_NAME, [tokens.prompt_ids(tokenizer, r["messages"]) for r in validation],
        [prompt_seed(i["seed"], r["id"]) for r in validation], list(stops),
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops), p["length_probe_steps"],
        cap, i["temperature"], i["top_p"], i["batch_size"], p["stop_if_longer"], p["stop_if_longer_probes"], scored,
        start_file=work / length_probe.START_NAME, bootstrap_samples=params["evaluate"]["bootstrap_samples"],
        bootstrap_seed=params["evaluate"]["seed"])
    return len(validation)


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
    probe_prompts = write_length_probe_spec(params, tokenizer, work) if p["length_probe_steps"] > 0 else 0
    try:
        cfg = engine.dpo_config("models/base", LOGS / "pairs.jsonl", work, device, p, e,
                                eval_path=LOGS / "eval_pairs.jsonl" if eval_pairs else None)
        cfg_path = engine.write_config(cfg, LOGS / "dpo.yaml")
        cmd = launch.launch_command("train", cfg_path, device, e["gpus"], e["nnodes"])
    except (ValueError, FileNotFoundError) as err:  # FileNotFoundError: the ernie-dpo launcher is not installed
        sys.exit(f"train: {err}")
    log.info("engine inputs: %s", ", ".join(f"{f.name} sha256 {sha256_of(f)[:16]}" for f in sorted(LOGS.glob("*"))
                                            if f.is_file()))
    return cmd, fit, eval_fit, probe_prompts


def worker_node(args, params, work):
    """Nodes 1..n-1 of a multi-node run (`python -m stages.train --worker-node` after `dvc pull`): the same engine
    inputs as node 0, then the same launch with this node's RANK. Node 0 (the dvc stage) writes every output."""
    if int(params["engine"]["nnodes"]) < 2 and not args.print_only:
        sys.exit("train --worker-node: engine.nnodes is 1; worker nodes are for multi-node runs")
    shutil.rmtree(LOGS, ignore_errors=True)
    cmd, _, _, _ = engine_inputs(params, work)
    log.info("worker node launch: %s", " ".join(cmd))
    if args.print_only:
        print(" ".join(cmd))
        return
    launch.run(cmd, LOGS / "engine.log", env=engine_main.environment(params["train"]))


def stale_checkpoints_removed(work):
    """The checkpoints a run can resume from (an earlier run with the same inputs was interrupted): incomplete ones
    (killed while saving) are removed; without any, step 0's probe of that run is removed too (probed again)."""
    resumed = sorted(work.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    for c in [c for c in resumed if not weights.checkpoint_is_complete(c)]:
        log.warning("removing %s: incomplete (the run was killed while saving it), the engine cannot resume from it", c)
        shutil.rmtree(c)
        resumed.remove(c)
    if resumed:
        log.info("resuming from %s (an earlier run with the same inputs was interrupted)", resumed[-1])
    else:
        (work / length_probe.START_NAME).unlink(missing_ok=True)
    return resumed


class Monitor:
    """What the engine prints, as it prints it: training steps and held-out evaluations to DVCLive and the progress
    bar, eval-pass counts, length probes (logged, or reported when one fails) and an early stop."""

    def __init__(self, live, bar, params, probe_prompts):
        self.live, self.bar, self.params, self.probe_prompts = live, bar, params, probe_prompts
        self.last, self.heldout, self.probes, self.stopped = {}, {}, [], {}
        self.eval_passes, self.probe_failures = [], []

    def on_step(self, s):
        s = engine_names(s, self.params["train"]["loss_type"])
        live = self.live
        if "eval_loss" in s:  # the engine's eval loop on the held-out pairs (the last one is printed twice)
            h = self.heldout
            if h.get("eval_loss") == s["eval_loss"] and h.get("step") == self.last.get("global_step"):
                return
            live.step = s.get("global_step", self.last.get("global_step", 0))
            self.heldout["step"] = live.step
            for k in EVAL_CURVES:
                if k in s:
                    live.log_metric(k, s[k], plot=True)
            self.heldout.update(s)
            return
        live.step = s["global_step"]
        for k in CURVES:
            if k in s:
                live.log_metric(k, s[k], plot=True)
        self.last.update(s)
        self.bar.set_postfix(loss=f"{s['loss']:.3f}", margin=f"{s.get('rewards/margins', 0):.2f}",
                             **({"reply_median": self.probes[-1]["chars_median"]} if self.probes else {}))
        self.bar.update(s["global_step"] - self.bar.n)

    def on_line(self, line):
        if engine_main.EVAL_PASS_MARK in line:  # one pass of the engine's eval loop: the pairs it saw
            self.eval_passes.append(json.loads(line.split(engine_main.EVAL_PASS_MARK, 1)[1])["pairs"])
            return
        found = length_probe.parse_line(line)
        if found is None:
            return
        kind, data = found
        if kind == "stopped":
            self.stopped.update(data)
        elif kind == "failed":  # reported, never fatal: the run goes on without that probe
            self.probe_failures.append(data)
            log.warning("length probe at step %d FAILED and was skipped (training goes on): %s", data["step"],
                        data["error"])
        else:
            self.on_probe(data)

    def on_probe(self, data):
        self.probes.append(data)
        self.live.step = data["step"]
        if data["nll_per_token"]:
            data["nll_per_token_mean"] = round(sum(data["nll_per_token"]) / len(data["nll_per_token"]), 5)
        for k in ("chars_median", "chars_mean", "cut_share", "nll_per_token_mean"):
            if k in data:
                self.live.log_metric(f"length_probe/{k.replace('_mean', '') if k.startswith('nll') else k}", data[k],
                                     plot=True)
        p = self.params["train"]
        log.info("length probe at step %d: replies to %d validation prompts: median %.0f chars%s, mean %.0f, "
                 "cut at %d tokens: %.0f%%; held-out NLL of their chosen answers %.4f nats/token",
                 data["step"], self.probe_prompts, data["chars_median"],
                 (f" ({data['delta_chars_median']:+.0f} vs step 0, 95% CI [{data['delta_chars_median_ci_low']:+.0f}"
                  f", {data['delta_chars_median_ci_high']:+.0f}])" if "delta_chars_median" in data else ""),
                 data["chars_mean"], p["length_probe_max_dec_len"] or self.params["infer"]["max_dec_len"],
                 100 * data["cut_share"], data.get("nll_per_token_mean", float("nan")))


def check_finished(last):
    """Stop the stage unless the engine trained to a finite loss on exactly the pairs counted."""
    if not last:
        sys.exit(f"train: the engine logged no training step; see {LOGS / 'engine.log'}")
    if not math.isfinite(last.get("loss", 0.0)):
        sys.exit(f"train: the loss is {last['loss']} at step {last['global_step']} (the run diverged): lower "
                 f"train.learning_rate; see {LOGS / 'engine.log'}")
    skipped = launch.engine_skips((LOGS / "engine.log").read_text(encoding="utf-8", errors="replace"))
    if skipped:
        sys.exit(f"train: the engine skipped {skipped} pair(s) that the length count said fit (see '[SKIP]' in "
                 f"{LOGS / 'engine.log'}): pairs trained would not be pairs reported")


def summary(params, m, fit, eval_fit, work, seconds):
    """metrics/train.json: the last step, the held-out pairs (each counted once per pass), the length probes and the
    held-out likelihood."""
    p = params["train"]
    last, heldout, probes = m.last, m.heldout, m.probes
    final = {**labels(params),
             "steps_done": int(last["global_step"]), "seconds": seconds, **fit,
             "examples_seen": int(last["global_step"]) * int(p["global_batch_size"])}
    final["epochs"] = round(final["examples_seen"] / fit["pairs_trained"], 2)
    final["last_step"] = {k.replace("/", "_"): round(v, 5) for k, v in last.items()
                          if k in CURVES and k != "learning_rate"}
    if heldout:
        # every held-out pair counted once per pass (engine_main._each_pair_once): what the eval loop saw, recorded and
        # checked (a pair the engine's dataset fails to process is skipped by it, with a printed warning)
        if not m.eval_passes or any(n != eval_fit["pairs_trained"] for n in m.eval_passes):
            log.warning("the engine's eval loop saw %s pairs per pass, not the %d held-out pairs of %s: its eval_* "
                        "values are over those", m.eval_passes or "an unknown number of", eval_fit["pairs_trained"],
                        LOGS / "eval_pairs.jsonl")
        final["heldout"] = {"pairs": eval_fit["pairs_trained"],
                            "pairs_evaluated": m.eval_passes[-1] if m.eval_passes else None,
                            **{k[len("eval_"):].replace("/", "_"): round(v, 5) for k, v in heldout.items()
                               if k in EVAL_CURVES}}
    out = {"dpo": final}  # "dpo", not "train": params own train.*
    start_file = work / length_probe.START_NAME  # step 0's probe, kept by the engine for a resumed run
    if probes and probes[0]["step"] != 0 and start_file.is_file():
        probes.insert(0, json.loads(start_file.read_text()))
    start_file.unlink(missing_ok=True)
    if m.probe_failures:
        final["length_probe_failures"] = len(m.probe_failures)
    if probes:
        final["length_probe"] = probe_summary(probes, m.probe_prompts)
        if len(probes) > 1 and probes[0]["step"] == 0 and probes[0]["nll_per_token"]:
            out["likelihood"] = heldout_likelihood(probes[0]["nll_per_token"], probes[-1]["nll_per_token"],
                                                   params["evaluate"])
    final["stopped_early"] = bool(m.stopped)
    return out


def stop_if_longer(p, m):
    if m.stopped:
        sys.exit(f"train: STOPPED at step {m.stopped['step']} of {p['max_steps']}: replies to the validation prompts "
                 f"grew (median {m.probes[0]['chars_median']:.0f} chars at step 0 -> "
                 f"{m.probes[-1]['chars_median']:.0f}, more than train.stop_if_longer={p['stop_if_longer']} above step 0 for "
                 f"{p['stop_if_longer_probes']} probes in a row, each with a paired 95% interval above 0). The "
                 "curves are in metrics/plots/dpo_curves.png and metrics/train.json; this run teaches the model to "
                 "answer LONGER (the recipe's exp3): try train.sft_loss_ratio, more warmup, a lower learning rate, "
                 "or other pairs.")


def publish(work):
    """The finished model (not the checkpoints) becomes the DVC output; the work folder is no longer needed."""
    OUT.mkdir(parents=True)
    for f in work.iterdir():
        if not f.name.startswith("checkpoint-"):
            f.rename(OUT / f.name)
    shutil.rmtree(work)


def main():
    ap = stage_parser(__file__, __doc__)
    ap.add_argument("--worker-node", action="store_true",
                    help="on nodes 1..n-1 of a multi-node run (engine.nnodes > 1, RANK set): rebuild the engine "
                         "inputs from params.yaml and `dvc pull`-ed data and join node 0's training; writes no output")
    ap.add_argument("--print-only", action="store_true", help="with --worker-node: build the inputs, print the launch")
    args = ap.parse_args()
    params = load_params()
    p, e, device = params["train"], params["engine"], params["engine"]["device"]
    devices.require_device(params, "train")
    work = Path("checkpoints") / f"train-{fingerprint(['models/base', 'data/trainset/train.jsonl'], [p, e])}"
    if args.worker_node:
        return worker_node(args, params, work)
    if p["warmup_steps"] >= p["max_steps"]:  # valid for the engine, but the peak learning rate is never reached
        log.warning("warmup_steps (%d) >= max_steps (%d): the learning rate only ramps up, to %.0f%% of %g",
                    p["warmup_steps"], p["max_steps"], 100 * p["max_steps"] / p["warmup_steps"], p["learning_rate"])
    resumed = stale_checkpoints_removed(work)
    for d in (OUT, LOGS):
        shutil.rmtree(d, ignore_errors=True)
    cmd, fit, eval_fit, probe_prompts = engine_inputs(params, work)
    if int(e["nnodes"]) > 1:
        log.info("node 0 of %s; on every other node, after `git checkout` of this commit and `dvc pull`, run with its "
                 "own RANK (1..%d), MASTER_ADDR=<this node> and MASTER_PORT: python -m stages.train --worker-node",
                 e["nnodes"], int(e["nnodes"]) - 1)
    log.info("launch: %s", " ".join(cmd))
    log.info("DPO (%s, loss %s, beta %s): %d steps, warmup %d, global batch %d, lr %g on %s (engine log: %s)",
             p["fine_tuning"], p["loss_type"], p["beta"], p["max_steps"], p["warmup_steps"], p["global_batch_size"],
             p["learning_rate"], device, LOGS / "engine.log")
    start = time.time()
    with Live(dir="metrics/dvclive", dvcyaml=None, save_dvc_exp=False, report=None, resume=bool(resumed)) as live, \
            tqdm(total=p["max_steps"], desc="DPO", unit="step") as bar:
        m = Monitor(live, bar, params, probe_prompts)
        launch.run(cmd, LOGS / "engine.log", m.on_step, on_line=m.on_line, env=engine_main.environment(params["train"]))
        live.make_summary()
    check_finished(m.last)
    plot_curves("metrics/dvclive", f"{params['model']['name_or_path']}: {p['fine_tuning']}, {p['max_steps']} steps, "
                f"warmup {p['warmup_steps']}, batch {p['global_batch_size']}", "metrics/plots/dpo_curves.png")
    out = summary(params, m, fit, eval_fit, work, round(time.time() - start, 1))
    write_json("metrics/train.json", out)
    stop_if_longer(p, m)
    publish(work)
    last, heldout = m.last, m.heldout
    log.info("done: step %d, loss %.4f, reward margin %.3f, accuracy %.2f (%.0f s)%s", last["global_step"],
             last["loss"], last.get("rewards/margins", float("nan")), last.get("rewards/accuracies", float("nan")),
             out["dpo"]["seconds"], f"; held-out reward accuracy {heldout['eval_rewards/accuracies']:.2f}"
             if "eval_rewards/accuracies" in heldout else "")


if __name__ == "__main__":
    main()
