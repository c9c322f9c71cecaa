"""Reply length WHILE DPO trains: every train.length_probe_steps steps (and at step 0) the current policy answers K
fixed held-out prompts, and the run logs their mean / median reply length and cut share.

Why: the recipe's exp3 made replies LONGER (1145 vs 889 chars), and a user only learns that after the whole
training plus a 200 x 8192-token inference. Here the curve shows it while training runs, and
train.stop_if_longer stops a run whose replies grow (median above (1 + stop_if_longer) x step 0's for
train.stop_if_longer_probes probes in a row), with the curve saved and a clear message.

The prompts are the held-out eval pairs' (never a test or training prompt). Sampling is the recipe's (infer.top_p,
infer.temperature) with each prompt's own fixed seed (decode.prompt_seed), the same seeds at every probe: the curve
moves because the model does, not the dice. Replies are capped at train.length_probe_max_dec_len tokens (the cut
share says how many reached it).

How it runs: the train stage writes the probe spec next to the engine YAML (SPEC_NAME); the engine process
(engine._engine_main) finds it and adds LengthProbe to the engine's trainer, which prints one line per probe
(MARK + JSON); the stage turns them into a DVCLive curve. Rank 0 only on several GPUs; the stop decision is
broadcast to every rank (unverified on a GPU: none was available to this project).
"""
import json
from pathlib import Path

SPEC_NAME = "length_probe.json"
MARK = "ERNIE_DPO_LENGTH_PROBE "
STOP_MARK = "ERNIE_DPO_STOPPED_LONGER "


def write_spec(path, prompts, seeds, stop_ids, pad_id, every, max_new_tokens, temperature, top_p, batch_size,
               stop_share, stop_probes):
    """prompts: token id lists (the eval prompts, encoded as inference encodes them)."""
    spec = {"prompts": prompts, "seeds": seeds, "stop_ids": sorted(stop_ids), "pad_id": pad_id, "every": every,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "batch_size": batch_size,
            "stop_share": stop_share, "stop_probes": stop_probes}
    Path(path).write_text(json.dumps(spec) + "\n")


def summary(lengths_chars, tokens, finishes):
    import numpy as np

    return {"chars_mean": round(float(np.mean(lengths_chars)), 1),
            "chars_median": round(float(np.median(lengths_chars)), 1),
            "tokens_mean": round(float(np.mean(tokens)), 1),
            "cut_share": round(sum(f == "length" for f in finishes) / len(finishes), 3)}


def should_stop(history, share, probes):
    """history: [(step, chars_median)], the first at step 0. True when the last `probes` probes all have a median
    above (1 + share) x step 0's. share 0: never."""
    if not share or len(history) < probes + 1:
        return False
    start = history[0][1]
    return all(median > (1 + share) * start for _, median in history[-probes:])


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
            self.history = []

        def probe(self, step, model):
            lm = causal_lm(model)
            was_training = lm.training
            saved = {id(l): l.attn_implementation for l in lm.sublayers() if hasattr(l, "attn_implementation")}
            saved_cfg = lm.config._attn_implementation
            lm.eval()
            decode.use_grouped_attention(lm)  # the decode loop's KV cache needs its attention
            try:
                out = decode.generate(lm, spec["prompts"], spec["seeds"], spec["stop_ids"], spec["max_new_tokens"],
                                      spec["temperature"], spec["top_p"], spec["batch_size"], spec["pad_id"])
            finally:
                for layer in lm.sublayers():
                    if id(layer) in saved:
                        layer.attn_implementation = saved[id(layer)]
                lm.config._attn_implementation = saved_cfg
                if was_training:
                    lm.train()
            replies = [tokenizer.decode(out[i][0], skip_special_tokens=True).strip() for i in range(len(out))]
            s = {"step": step, **summary([len(r) for r in replies], [len(out[i][0]) for i in range(len(out))],
                                         [out[i][1] for i in range(len(out))])}
            print(MARK + json.dumps(s), flush=True)
            self.history.append((step, s["chars_median"]))

        def stop_everywhere(self, stop):
            """Rank 0 decides; every rank learns it (a rank that stops alone would hang the others)."""
            if paddle.distributed.get_world_size() > 1:
                flag = paddle.to_tensor([1 if stop else 0], dtype="int64")
                paddle.distributed.broadcast(flag, src=0)
                return bool(int(flag.numpy()[0]))
            return stop

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0 and state.is_world_process_zero:
                self.probe(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % spec["every"] and state.global_step != args.max_steps:
                return
            stop = False
            if state.is_world_process_zero:
                self.probe(state.global_step, model)
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
    for kind, mark in (("probe", MARK), ("stopped", STOP_MARK)):
        at = line.find(mark)
        if at >= 0:
            return kind, json.loads(line[at + len(mark):])
    return None
