"""Reply length and held-out likelihood WHILE DPO trains: at step 0, every train.length_probe_steps steps and at the
last step, the current policy answers the validation prompts (testset.validation_size; never a test or training
prompt) and scores their chosen answers.

Why: the recipe's exp3 made replies LONGER (1145 vs 889 chars), and a user only learns that after the whole
training plus a 200 x 8192-token inference. Here the curve shows it while training runs, and
train.stop_if_longer stops a run whose replies grow, with the curve saved and a clear message.

Measured like the final evaluation, so that the two can be compared: each prompt is encoded whole exactly as the infer
stage encodes a test prompt (tokens.prompt_ids, no cut), sampled with the recipe's top_p / temperature and each
prompt's own fixed seed (decode.prompt_seed: the curve moves because the model does, not the dice), at
infer.max_dec_len new tokens unless train.length_probe_max_dec_len sets a lower cap (the cut share says how many
replies reached it). Each probe after step 0 carries the paired 95% bootstrap interval of its median minus step 0's
(same prompts, same seeds), and train.stop_if_longer only acts on probes whose interval excludes 0.

Held-out likelihood: the per-token negative log-likelihood of each validation prompt's CHOSEN answer under the policy
(nats/token). Step 0's policy is the base model, so the last probe minus step 0 says whether the tuned model still
predicts good answers it was not trained on (a model that only learned to apologise gets worse at it). It is computed
in the same forward pass that prefills the prompt for the reply (decode.prefill's `answer`): the prompt is read once.

How it runs: the train stage writes the probe spec next to the engine YAML (SPEC_NAME); the engine process
(engine_main._engine_main) finds it and adds LengthProbe to the engine's trainer, which prints one line per probe
(MARK + JSON); the stage turns them into DVCLive curves. Rank 0 only on several GPUs; the stop decision is
broadcast to every rank (unverified on a GPU: none was available to this project).
"""
import json
from pathlib import Path

SPEC_NAME = "length_probe.json"
START_NAME = "length_probe_step0.json"  # in the checkpoint folder: step 0's probe, for a resumed run
MARK = "ERNIE_DPO_LENGTH_PROBE "
STOP_MARK = "ERNIE_DPO_STOPPED_LONGER "
FAILED_MARK = "ERNIE_DPO_PROBE_FAILED "


BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED = 2000, 2025


def write_spec(path, prompts, seeds, stop_ids, pad_id, every, max_new_tokens, temperature, top_p, batch_size,
               stop_share, stop_probes, scored=(), start_file=None, bootstrap_samples=BOOTSTRAP_SAMPLES,
               bootstrap_seed=BOOTSTRAP_SEED):
    """prompts: token id lists (the validation prompts, encoded as inference encodes them); scored: [prompt ids,
    chosen answer ids] pairs whose per-token NLL each probe reports (the held-out likelihood); start_file: where
    step 0's probe is kept for a resumed run (next to the checkpoints)."""
    spec = {"prompts": prompts, "seeds": seeds, "stop_ids": sorted(stop_ids), "pad_id": pad_id, "every": every,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "batch_size": batch_size,
            "stop_share": stop_share, "stop_probes": stop_probes, "scored": [list(map(list, s)) for s in scored],
            "start_file": str(start_file) if start_file else None, "bootstrap_samples": bootstrap_samples,
            "bootstrap_seed": bootstrap_seed}
    Path(path).write_text(json.dumps(spec) + "\n")


def summary(lengths_chars, tokens, finishes):
    import numpy as np

    return {"chars_mean": round(float(np.mean(lengths_chars)), 1),
            "chars_median": round(float(np.median(lengths_chars)), 1),
            "tokens_mean": round(float(np.mean(tokens)), 1),
            "cut_share": round(sum(f == "length" for f in finishes) / len(finishes), 3)}


def versus_start(first, now, n_resamples=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED):
    """Median reply chars of this probe minus step 0's, with its paired 95% bootstrap interval (same prompts, same
    seeds: each resample keeps both replies of a prompt together, as the evaluate stage does; evaluate.* sets the
    resamples and seed)."""
    from .bootstrap import bootstrap_delta

    d, lo, hi = bootstrap_delta(first, now, "median", n_resamples, seed)
    return {"delta_chars_median": round(d, 1), "delta_chars_median_ci_low": round(lo, 1),
            "delta_chars_median_ci_high": round(hi, 1)}


def should_stop(history, share, probes):
    """history: [(step, chars_median, ci_low)], the first at step 0 (ci_low: the low end of the paired interval of
    the probe's median minus step 0's). True when the last `probes` probes all have a median above (1 + share) x
    step 0's AND an interval entirely above 0: a growth the probe cannot tell from sampling noise stops nothing.
    share 0: never."""
    if not share or len(history) < probes + 1 or history[0][0] != 0:
        return False
    start = history[0][1]
    return all(median is not None and median > (1 + share) * start and low > 0 for _, median, low in history[-probes:])


def causal_lm(model):
    """The model with .model (decoder) and .lm_head, under any wrappers (LoRAModel, fleet's distributed model)."""
    for _ in range(5):
        # a wrapper (LoRAModel) forwards unknown attributes to what it wraps, so it "has" lm_head too: the causal LM
        # is the one whose .model is the decoder, not another causal LM
        if hasattr(model, "lm_head") and hasattr(model, "model") and not hasattr(model.model, "lm_head"):
            return model
        model = getattr(model, "model", None) or getattr(model, "_layers", None)
        if model is None:
            break
    raise TypeError("length probe: cannot find the causal LM (lm_head) inside the trained model")


def make_callback(spec_path, tokenizer_dir):
    """A PaddleFormers TrainerCallback running the probes of spec_path."""
    import paddle
    from paddleformers.trainer import TrainerCallback
    from paddleformers.transformers import AutoTokenizer

    from . import decode

    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    class LengthProbe(TrainerCallback):
        def __init__(self):
            # step 0 is the reference of every later probe; it is kept next to the checkpoints (spec "start_file"),
            # so a run resumed after a kill still compares with step 0, not with its own first probe
            self.history, self.first = [], None
            start = Path(spec["start_file"]) if spec.get("start_file") else None
            if start is not None and start.is_file():
                first = json.loads(start.read_text())
                self.first = first["chars"]
                self.history.append((0, first["chars_median"], 0.0))

        def probe(self, step, model):
            lm = causal_lm(model)
            was_training = lm.training
            saved = {id(l): l.attn_implementation for l in lm.sublayers() if hasattr(l, "attn_implementation")}
            saved_cfg = lm.config._attn_implementation
            lm.eval()
            decode.use_grouped_attention(lm)  # the decode loop's KV cache needs its attention
            try:
                # a chosen answer whose prompt is the probe's own prompt is scored in that prompt's prefill (one
                # forward pass over the prompt, not two); any other on its own
                answers = {i: a for i, (prompt, a) in enumerate(spec["scored"])
                           if i < len(spec["prompts"]) and list(prompt) == list(spec["prompts"][i])}
                out, scores = decode.generate(lm, spec["prompts"], spec["seeds"], spec["stop_ids"],
                                              spec["max_new_tokens"], spec["temperature"], spec["top_p"],
                                              spec["batch_size"], spec["pad_id"], answers=answers)
                nll = []
                for i, (prompt, answer) in enumerate(spec["scored"]):
                    total, n = scores[i] if i in scores else decode.answer_logps(lm, prompt, answer)
                    nll.append(round(-total / n, 5))
            finally:
                for layer in lm.sublayers():
                    if id(layer) in saved:
                        layer.attn_implementation = saved[id(layer)]
                lm.config._attn_implementation = saved_cfg
                if was_training:
                    lm.train()
            replies = [tokenizer.decode(out[i][0], skip_special_tokens=True).strip() for i in range(len(out))]
            chars = [len(r) for r in replies]
            s = {"step": step, **summary(chars, [len(out[i][0]) for i in range(len(out))],
                                         [out[i][1] for i in range(len(out))]),
                 "chars": chars, "nll_per_token": nll}
            low = 0.0
            if step == 0:
                self.first = chars
                if spec.get("start_file"):
                    Path(spec["start_file"]).parent.mkdir(parents=True, exist_ok=True)
                    Path(spec["start_file"]).write_text(json.dumps(s) + "\n")
            elif self.first is not None:  # no step 0 (it failed): no comparison, and nothing to stop on
                s.update(versus_start(self.first, chars, spec.get("bootstrap_samples", BOOTSTRAP_SAMPLES),
                                      spec.get("bootstrap_seed", BOOTSTRAP_SEED)))
                low = s["delta_chars_median_ci_low"]
            print(MARK + json.dumps(s), flush=True)
            self.history.append((step, s["chars_median"], low))

        def stop_everywhere(self, stop):
            """Rank 0 decides; every rank learns it (a rank that stops alone would hang the others)."""
            if paddle.distributed.get_world_size() > 1:
                flag = paddle.to_tensor([1 if stop else 0], dtype="int64")
                paddle.distributed.broadcast(flag, src=0)
                return bool(int(flag.numpy()[0]))
            return stop

        def safe_probe(self, step, model):
            """A probe that fails (the project's decode loop on an engine-wrapped model, out of memory on a GPU, ...)
            is reported and skipped: a measurement must never take the training run down with it."""
            try:
                self.probe(step, model)
                return True
            except Exception as e:  # noqa: BLE001 -- any failure of the measurement, reported, never fatal
                print(FAILED_MARK + json.dumps({"step": step, "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
                if step > 0:
                    self.history.append((step, None, None))  # breaks a run of longer probes: "in a row" means it
                return False

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0 and state.is_world_process_zero:
                self.safe_probe(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % spec["every"] and state.global_step != args.max_steps:
                return
            stop = False
            if state.is_world_process_zero and self.safe_probe(state.global_step, model):
                stop = should_stop(self.history, spec["stop_share"], spec["stop_probes"])
            if self.stop_everywhere(stop):
                if state.is_world_process_zero:
                    print(STOP_MARK + json.dumps({"step": state.global_step, "history": self.history}), flush=True)
                control.should_training_stop = True

    return LengthProbe()


def install(cfg_path):
    """In the engine process: when the train stage wrote a probe spec next to the engine YAML, add the callback to
    the DPO trainer the engine's workflow builds."""
    spec_path = Path(cfg_path).with_name(SPEC_NAME)
    if not spec_path.is_file():
        return
    import yaml
    from paddleformers.cli.train.dpo import dpo_trainer

    model_dir = yaml.safe_load(Path(cfg_path).read_text())["model_name_or_path"]
    original = dpo_trainer.DPOTrainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(make_callback(spec_path, model_dir))

    dpo_trainer.DPOTrainer.__init__ = init


def parse_line(line):
    """(kind, dict) for a probe or stop line of the engine log, else None."""
    for kind, mark in (("probe", MARK), ("stopped", STOP_MARK), ("failed", FAILED_MARK)):
        at = line.find(mark)
        if at >= 0:
            return kind, json.loads(line[at + len(mark):])
    return None
