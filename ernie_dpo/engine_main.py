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
    5b. Each pair once per pass (_each_pair_once), not the last one twice.
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
    if argv[0] == "train":
        from ernie_dpo import length_probe

        length_probe.install(argv[1])  # when the train stage asked for reply-length probes (a spec beside the YAML)
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
