"""The engine process: PaddleFormers' own launcher, started here after the fixes this project needs
(`ernie-dpo engine train|export CFG`, `python -m ernie_dpo.engine_main ...`; launch.launch_command builds the call).

On a CPU the stage runs this in one process; on GPUs PaddlePaddle's launcher runs it once per GPU. Each fix is one
function below, with the engine behaviour it corrects.
"""
import json
import os
import signal
import sys

import yaml

from .devices import use_all_cpu_cores
from .launch import _die_with_parent


def _lora_evaluation_without_paddlefleet():
    """PaddleFormers 1.2's Trainer.evaluation_loop tests `is_paddlefleet_available() and isinstance(model, GPTModel)
    or (isinstance(model, LoRAModel) and isinstance(model.model, GPTModel))` (trainer/trainer.py), but imports
    GPTModel only when paddlefleet is installed (it is not: neither in the CPU nor in the GPU lock). With LoRA the
    second half runs and raises NameError: name 'GPTModel' is not defined -- at the first held-out evaluation, so
    every LoRA run with eval pairs (the cookbook's) died there. A class nothing is an instance of gives the branch
    the engine means without paddlefleet (the plain model)."""
    from paddleformers.trainer import trainer

    if not hasattr(trainer, "GPTModel"):
        trainer.GPTModel = type("GPTModelWithoutPaddlefleet", (), {})


EVAL_PASS_MARK = "ERNIE_DPO_EVAL_PASS "  # one line per pass over the held-out pairs: how many the eval loop saw


def _each_pair_once():
    """PaddleFormers 1.2's DPO dataset (DPODataset._generate_sequences, no packing) yields the last pair of every
    pass twice: after its loop, `if len(batch_sequence) > 0: yield batch_sequence` re-yields the list it yielded
    last. In the eval loop that pair then weighs double in every eval_* value (with 5 held-out pairs and eval batch
    4: [p1-p4], [p5, p5], and p5 is half of the second batch's mean); in training it is trained twice a pass.
    Here a pass yields each sequence list once (the repeat is the same object), and a pass over held-out pairs
    prints how many pairs it yielded, which the train stage checks against the held-out file."""
    from paddleformers.datasets.DPODataset import BaseDPODataSet

    original = BaseDPODataSet._generate_sequences
    if getattr(original, "_ernie_dpo", False):
        return

    def generate(self):
        last, pairs = None, 0
        for batch in original(self):
            if batch is last:
                continue
            last = batch
            pairs += len(batch)
            yield batch
        if self.is_valid:
            print(EVAL_PASS_MARK + json.dumps({"pairs": pairs}), flush=True)

    generate._ernie_dpo, generate.original = True, original
    BaseDPODataSet._generate_sequences = generate


def _fused_head_through_model_outputs():
    """With use_fused_head_and_loss_fn (engine.CPU_SETTINGS) the LM head returns (hidden states, weight, bias,
    transpose_y) and the DPO loss applies it to the scored positions only. PaddleFormers 1.2's DPO loss unpacks that
    tuple only when the model returns it bare (Llama: return_dict False); ERNIE 4.5's causal LM returns a model
    output object by default, whose .logits is the tuple, and the loss then treated the object as logits
    ("gather" on it fails). Here the tuple is taken out of such an object first."""
    from paddleformers.nn.criterion import dpo_loss

    original = dpo_loss.dpo_preprocess_inputs
    if getattr(original, "_ernie_dpo", False):
        return

    def preprocess(self, logits, labels):
        if isinstance(getattr(logits, "logits", None), tuple):
            logits = logits.logits
        return original(self, logits, labels)

    preprocess._ernie_dpo = True
    dpo_loss.dpo_preprocess_inputs = preprocess


REF_ONCE_ENV = "ERNIE_DPO_REFERENCE_ONCE"  # "1": the train stage asks for reference log-probs computed once


def environment(train):
    """What the engine process is told besides its YAML (the train stage and benchmarks/training.py alike), from the
    composed `train` params: whether to compute the reference log-probs once (train.reference_once)."""
    return {REF_ONCE_ENV: "1" if train["reference_once"] else "0"}


def _pair_key(seq):
    """A pair's identity for the reference cache: a hash of the token ids and the labels it is scored on."""
    import hashlib

    import numpy as np

    h = hashlib.blake2b(digest_size=8)
    for part in (seq.token_ids, seq.response_labels, seq.response_index):
        h.update(np.asarray(part, dtype="int64").tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def _reference_logps_once():
    """The reference model's log-probs of every training pair computed in one pass before step 1, not again at
    every step (TRL's precompute_ref_log_probs). The reference is frozen (a copy of the base model for full
    fine-tuning, the model with its adapter disabled for LoRA), so its log-probs of a pair never change; PaddleFormers
    1.2 recomputes them at each step (DPOTrainer.get_batch_metrics: one reference forward per pair per step).

    - the collator tags each batch with its pairs' keys (_pair_key, in response_indexs' order), which get_batch_metrics
      looks up; a batch with any pair not in the cache takes the engine's own path;
    - the pass walks the training and held-out records themselves (mix_datasets.data), not the datasets' iterators,
      whose shuffle state would then change the training order; in batches of the size training (evaluation) uses;
    - full fine-tuning: once every pair is cached the reference copy of the model is not needed any more, and its
      weights are freed (one model's worth of memory less for the whole run); a batch that would still need it then
      stops the run with the pair's key instead of reading freed weights. LoRA's reference is the model itself;
    - not with ref_model_update_steps (the reference then changes), reference_free, pipeline parallelism or the
      model-side criterion. Checked: losses, margins, log-probs equal to the recomputed path (tests/test_model.py).
    """
    import copy

    import numpy as np
    import paddle
    from paddleformers.cli.train.dpo import dpo_trainer, workflow

    trainer_cls = dpo_trainer.DPOTrainer
    if getattr(trainer_cls.get_batch_metrics, "_ernie_dpo", False):
        return
    original_collate = workflow.dpo_collate_fn

    def collate_with_keys(batch, *args, **kwargs):
        out = original_collate(batch, *args, **kwargs)
        out["ref_pair_keys"] = np.asarray([_pair_key(s) for seqs in batch for s in seqs], dtype="int64")
        return out

    workflow.dpo_collate_fn = collate_with_keys

    def eligible(self):
        c = self.dpo_config
        return (not self.model_with_dpo_criterion and not c.reference_free and c.ref_model_update_steps <= 0
                and getattr(self.args, "pipeline_model_parallel_size", 1) <= 1)

    def reference(self, model, dpo_inputs, labels):
        with paddle.no_grad():
            if self.dpo_config.lora:
                self.disable_lora(model)
                model.eval()
                logits = model(**dpo_inputs)
                self.enable_lora(model)
                model.train()
            else:
                logits = self.ref_model_wrapped(**dpo_inputs)
            return self.dpo_criterion(logits, labels[:2] + (None, None))

    def inputs_of(batch):
        keys = ("input_ids", "position_ids", "attention_mask", "attn_mask_start_row_indices",
                "attn_mask_startend_row_indices")
        out = {k: batch[k] for k in keys[:2]}
        for k in keys[2:]:
            if k in batch:
                return {**out, k: batch[k]}
        return out

    def sequences(ds):
        records = getattr(getattr(ds, "mix_datasets", None), "data", None)
        if records is None:
            return None
        seqs = [ds._postprocess_sequence(copy.deepcopy(example)) for example in records]
        return [s for s in seqs if s is not None]

    def precompute(self, model):
        train = sequences(self.train_dataset)
        if train is None:
            return None
        held_out = sequences(self.eval_dataset) if self.eval_dataset is not None else []
        cache, dtype = {}, None
        for seqs, size in ((train, self.args.per_device_train_batch_size),
                           (held_out or [], self.args.per_device_eval_batch_size)):  # batches as each loop forms them
            size = max(1, int(size))
            for i in range(0, len(seqs), size):
                batch = self.data_collator([[s] for s in seqs[i:i + size]])  # numpy, as the data loader gets it
                batch = self._prepare_inputs({k: paddle.to_tensor(v) if isinstance(v, np.ndarray) else v
                                              for k, v in batch.items()})
                keys = batch.pop("ref_pair_keys")
                c, r = reference(self, model, inputs_of(batch), (batch["response_labels"], batch["response_indexs"]))
                c32, r32 = c.astype("float32").numpy().ravel(), r.astype("float32").numpy().ravel()
                for k, cv, rv in zip(np.asarray(keys).ravel().tolist(), c32, r32):
                    cache[int(k)] = (float(cv), float(rv))
                dtype = c.dtype
        freed = False
        if held_out is not None and not self.dpo_config.lora and self.ref_model is not None:
            # every pair training or evaluation will see is cached: the reference copy's weights are not needed.
            # Freed in place (the engine's workflow still holds the model object until training returns).
            for t in list(self.ref_model.parameters()) + list(self.ref_model.buffers()):
                t._clear_data()
            freed = True
        print(f"ERNIE_DPO_REFERENCE_ONCE {len(cache)} pairs' reference log-probs computed once"
              + ("; the reference copy of the model freed" if freed else ""), flush=True)
        return {"values": cache, "dtype": dtype, "freed": freed}

    original_compute_loss = trainer_cls.compute_loss

    def compute_loss(self, model, inputs):
        if not hasattr(self, "_ernie_dpo_reference"):
            self._ernie_dpo_reference = precompute(self, model) if eligible(self) else None
        return original_compute_loss(self, model, inputs)

    original_metrics = trainer_cls.get_batch_metrics

    def get_batch_metrics(self, ref_model, model, batch, train_eval="train"):
        keys = batch.pop("ref_pair_keys", None)
        cache = getattr(self, "_ernie_dpo_reference", None)
        keys = [] if keys is None else np.asarray(keys).ravel().tolist()
        if not cache or not keys or not all(int(k) in cache["values"] for k in keys):
            if cache and cache["freed"]:
                missing = next(int(k) for k in keys if int(k) not in cache["values"]) if keys else None
                raise RuntimeError(f"reference_once: a {train_eval} batch holds a pair (key {missing}) that was not "
                                   "in the precomputed reference log-probs, and the reference model was freed; "
                                   "rerun with -S train.reference_once=false")
            return original_metrics(self, ref_model, model, batch, train_eval)
        if not cache.get("used"):
            cache["used"] = True
            print("ERNIE_DPO_REFERENCE_ONCE training steps read the reference log-probs from the cache", flush=True)
        values = [cache["values"][int(k)] for k in keys]
        ref_c = paddle.to_tensor(np.asarray([v[0] for v in values], dtype="float32")).astype(cache["dtype"])
        ref_r = paddle.to_tensor(np.asarray([v[1] for v in values], dtype="float32")).astype(cache["dtype"])
        labels = (batch["response_labels"], batch["response_indexs"], ref_c, ref_r)
        logits = model(**inputs_of(batch))
        policy_c, policy_r, sft_loss, dpo_loss, loss = self.dpo_criterion(logits, labels)
        self.log_metric(reference_chosen_logps=ref_c, reference_rejected_logps=ref_r, policy_chosen_logps=policy_c,
                        policy_rejected_logps=policy_r, dpo_loss=dpo_loss, sft_loss=sft_loss, train_eval=train_eval)
        return loss

    get_batch_metrics._ernie_dpo = True
    trainer_cls.compute_loss = compute_loss
    trainer_cls.get_batch_metrics = get_batch_metrics


def _engine_main(argv):
    """Start the engine's launcher in this process: the CPU path of launch_command, and each GPU worker.

    Before the engine runs (argv: train|export <config yaml>):
    1. Token ids: pairs are trained on the ids the train stage counted (tokens.install_engine_hooks), every device.
    2. The first load of the model ignores load_checkpoint_format. With `unified_checkpoint` (what resumable
       checkpoints need, see _common) PaddleFormers 1.2 loads the Hugging Face-layout weights WITHOUT converting
       ERNIE's fused layers, so qkv_proj / up_gate_proj start random, with only a "newly initialized" warning: the
       model and its reference copy train from broken weights. Resuming a checkpoint still uses the format.
    3. World size 1 (a CPU, or ONE GPU under paddle.distributed.launch, which sets PADDLE_TRAINER_ENDPOINTS even
       then): full-parameter DPO wraps the reference model with fleet.distributed_model(), which raises
       AttributeError ('Fleet' object has no attribute '_user_defined_strategy') when fleet was never initialised
       (it is only for world size > 1). There, and only for that error, the model is used unwrapped: with one
       process there is nothing to distribute.
    4. On a CPU: every core, and the cheaper RMSNorm / rotary kernels (fast_cpu).
    5. Reply-length probes while training (length_probe), when the stage wrote their spec beside the YAML.
    5b. Each pair once per pass (_each_pair_once), not the last one twice; the LM head fused with the loss for
        ERNIE's model outputs too (_fused_head_through_model_outputs).
    5c. With ERNIE_DPO_REFERENCE_ONCE=1 (train.reference_once): the reference log-probs of every training and
        held-out pair computed once before step 1 (_reference_logps_once), not at every step.
    6. A GPU worker (started by the launcher in a session of its own) dies with the launcher, as the launcher dies
       with the stage.
    """
    from ernie_dpo import tokens

    with open(argv[1], encoding="utf-8") as f:
        device = yaml.safe_load(f).get("device", "gpu")
    if "PADDLE_TRAINER_ID" in os.environ:  # a worker of paddle.distributed.launch
        _die_with_parent(signal.SIGKILL)
        if os.getppid() == 1:  # the launcher is already gone
            sys.exit("engine worker: the launcher that started this worker has exited")
    tokens.install_engine_hooks()
    _each_pair_once()
    _fused_head_through_model_outputs()
    if argv[0] == "train":
        from ernie_dpo import length_probe

        length_probe.install(argv[1])  # when the train stage asked for reply-length probes (a spec beside the YAML)
    if os.environ.get(REF_ONCE_ENV) == "1" and argv[0] == "train":
        _reference_logps_once()
    _first_load_ignores_checkpoint_format()
    _lora_evaluation_without_paddlefleet()
    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) == 1:
        _unwrapped_when_fleet_is_not_initialised()
    if device == "cpu":
        from ernie_dpo import fast_cpu

        use_all_cpu_cores()
        if os.environ.get("ERNIE_DPO_FAST_CPU", "1") != "0":  # 0: the engine's own layers (tests, benchmarks)
            fast_cpu.install()
    from paddleformers.cli.launcher import launch

    sys.argv = ["launcher"] + argv
    launch()


def _first_load_ignores_checkpoint_format():
    from paddleformers.transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        kwargs.pop("load_checkpoint_format", None)
        return original(cls, *args, **kwargs)

    AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)


def _unwrapped_when_fleet_is_not_initialised():
    from paddle.distributed import fleet

    original = fleet.distributed_model

    def distributed_model_or_self(model):
        try:
            return original(model)
        except AttributeError as e:
            if "_user_defined_strategy" not in str(e):
                raise
            return model

    fleet.distributed_model = distributed_model_or_self


def main(argv=None):
    """`ernie-dpo engine train|export CFG` (and `python -m ernie_dpo.engine_main ...`): _engine_main with a --help."""
    from . import runtime

    runtime.setup()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("train", "export"):
        print("usage: ernie-dpo engine train|export CONFIG.yaml\n\n" + _engine_main.__doc__)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    _engine_main(argv)


if __name__ == "__main__":
    main()
