"""Everything PaddleFormers-specific lives here: engine YAML, CPU/GPU settings, how it is launched, log parsing.

Stages pass plain parameters; they never build engine YAML themselves. A run's YAML is written next to its log, so
`paddleformers-cli train <that yaml>` (GPU) or `python -m ernie_dpo.engine train <that yaml>` (CPU) reruns it by hand.

Why not `paddleformers-cli` everywhere: the CLI always relaunches itself through `paddle.distributed.launch --gpus
<GPUs found by GPUtil>`; with no GPU that list is empty and the launch fails. On a CPU we therefore run the engine's
own launcher module in one process (this file's __main__), exactly the function the CLI would start on each device.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

# Settings that make PaddleFormers run on a CPU (see README, "How the engine runs on a CPU").
CPU_SETTINGS = {
    "device": "cpu",
    "compute_type": "float32",  # "fp32" is rejected; bf16/fp16 need a GPU
    "amp_master_grad": False,  # otherwise a ConfigConflict error when amp is off
    "_attn_implementation": "eager",  # the default flashmask kernel is GPU-only
}
GPU_SETTINGS = {
    "device": "gpu",
    "compute_type": "bf16",
    "amp_master_grad": True,
    "_attn_implementation": "flashmask",
}


class DeviceError(RuntimeError):
    pass


def check_device(device, devices="0"):
    """Stop before any heavy work when engine.device is gpu and no usable GPU is there (named, with the way out)."""
    if device not in ("cpu", "gpu"):
        raise DeviceError(f"engine.device must be 'cpu' or 'gpu', got {device!r}")
    if device == "cpu":
        return
    import paddle

    way_out = ("Install paddlepaddle-gpu for your CUDA (README: 'The real recipe on a GPU'), or run the offline demo "
               "on this machine: `dvc exp run -S profile=demo` (tiny model, CPU).")
    if not paddle.is_compiled_with_cuda():
        raise DeviceError(f"engine.device is 'gpu' (profile cookbook?) but the installed PaddlePaddle "
                          f"{paddle.__version__} is a CPU-only build. {way_out}")
    found = paddle.device.cuda.device_count()
    if found == 0:
        raise DeviceError(f"engine.device is 'gpu' but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). {way_out}")
    wanted = [int(d) for d in str(devices).split(",")]
    if max(wanted) >= found:
        raise DeviceError(f"engine.devices is {devices!r} but only {found} GPU(s) are visible (ids 0-{found - 1})")


def require_device(params, stage, local=True):
    """A stage's first line: check_device for engine.* params, ending the stage with `<stage>: <reason>` on failure.
    local=False (inference through a server) needs no device here."""
    if not local:
        return
    try:
        check_device(params["engine"]["device"], params["engine"]["devices"])
    except DeviceError as e:
        sys.exit(f"{stage}: {e}")


def parallel_settings(device, devices, nnodes, global_batch_size, tensor_parallel, sharding_parallel, sharding_stage):
    """Engine YAML keys for training on len(devices) x nnodes processes: data, sharding and tensor parallelism.

    world = devices per node x nodes. tensor_parallel splits each layer over that many devices; the remaining
    world / tensor_parallel ranks see different data (data parallel), and sharding_parallel of them share optimizer
    state (ZeRO-like `sharding_stage`: stage1 | stage2 | stage3). The global batch is split evenly over the
    data ranks. One device: no keys (the engine's single-process defaults).
    """
    per_node = len(str(devices).split(","))
    world = per_node * int(nnodes)
    if device == "cpu" and world > 1:
        raise ValueError("on a CPU the engine runs one process: keep engine.devices '0' and engine.nnodes 1")
    if world == 1 and tensor_parallel == 1 and sharding_parallel == 1:
        return {}
    if world % tensor_parallel:
        raise ValueError(f"engine.tensor_parallel {tensor_parallel} does not divide the {world} devices")
    data_ranks = world // tensor_parallel
    if data_ranks % sharding_parallel:
        raise ValueError(f"engine.sharding_parallel {sharding_parallel} does not divide the {data_ranks} data ranks "
                         f"({world} devices / tensor_parallel {tensor_parallel})")
    if global_batch_size % data_ranks:
        raise ValueError(f"train.global_batch_size {global_batch_size} is not a multiple of the {data_ranks} data "
                         f"ranks ({world} devices / tensor_parallel {tensor_parallel})")
    if sharding_stage not in ("stage1", "stage2", "stage3"):
        raise ValueError(f"engine.sharding_stage must be stage1, stage2 or stage3, got {sharding_stage!r}")
    return {
        "tensor_model_parallel_size": int(tensor_parallel),
        "sharding_parallel_size": int(sharding_parallel),
        "sharding": sharding_stage,
        "per_device_train_batch_size": global_batch_size // data_ranks,
    }


def device_settings(device):
    if device not in ("cpu", "gpu"):
        raise ValueError(f"engine.device must be 'cpu' or 'gpu', got {device!r}")
    return dict(CPU_SETTINGS if device == "cpu" else GPU_SETTINGS)


def _common(model, data_path, out_dir, device, seed, max_seq_len, max_steps, warmup_steps, learning_rate,
            global_batch_size, save_steps):
    """Keys every training run shares. per_device batch = global batch (one device, no accumulation) as in the recipe."""
    cfg = {
        "model_name_or_path": str(model),
        "train_dataset_type": "erniekit",
        "train_dataset_path": str(data_path),
        "train_dataset_prob": "1.0",
        "max_seq_len": int(max_seq_len),
        "max_steps": int(max_steps),
        "warmup_steps": int(warmup_steps),
        "learning_rate": float(learning_rate),
        "lr_scheduler_type": "cosine",
        "per_device_train_batch_size": int(global_batch_size),
        "global_batch_size": int(global_batch_size),
        "gradient_accumulation_steps": 1,
        "logging_steps": 1,
        "do_train": True,
        "do_eval": False,
        "output_dir": str(out_dir),
        "logging_dir": str(Path(out_dir) / "visualdl_logs"),
        "disable_tqdm": True,  # our stage shows one progress bar parsed from the log instead
        "seed": int(seed),
    }
    if save_steps and int(save_steps) > 0:
        cfg.update({"save_strategy": "steps", "save_steps": int(save_steps), "save_total_limit": 1})
        if device == "cpu":
            # The default flex_checkpoint format resumes through fleet's hybrid communicate group, which a single CPU
            # process never creates (AttributeError: 'Fleet' object has no attribute '_hcg'); unified_checkpoint
            # saves and resumes there (checked: killed after checkpoint-5, resumed at step 6).
            cfg.update({"save_checkpoint_format": "unified_checkpoint", "load_checkpoint_format": "unified_checkpoint"})
    else:
        cfg["save_strategy"] = "no"
    cfg.update(device_settings(device))
    return cfg


def sft_config(model, data_path, out_dir, device, seed, max_seq_len, max_steps, learning_rate, global_batch_size):
    """Full-parameter SFT: the tiny model's warm-up."""
    cfg = _common(model, data_path, out_dir, device, seed, max_seq_len, max_steps, max(1, max_steps // 10),
                  learning_rate, global_batch_size, save_steps=0)
    cfg.update({"stage": "SFT", "fine_tuning": "full"})
    return cfg


def dpo_config(model, data_path, out_dir, device, p, e=None):
    """DPO with the train.* params `p` (max_steps, warmup_steps, global_batch_size, learning_rate, fine_tuning,
    loss_type, beta, lora_rank, lora_alpha, seed, max_seq_len, max_prompt_len, save_steps) and the engine.* params
    `e` (devices, nnodes, tensor_parallel, sharding_parallel, sharding_stage) for more than one device."""
    if p["fine_tuning"] not in ("lora", "full"):
        raise ValueError(f"train.fine_tuning must be 'lora' or 'full', got {p['fine_tuning']!r}")
    cfg = _common(model, data_path, out_dir, device, p["seed"], p["max_seq_len"], p["max_steps"], p["warmup_steps"],
                  p["learning_rate"], p["global_batch_size"], p.get("save_steps", 0))
    cfg.update({
        "stage": "DPO",
        "max_prompt_len": int(p["max_prompt_len"]),
        "loss_type": p["loss_type"],
        "beta": float(p["beta"]),
    })
    if e is not None:
        cfg.update(parallel_settings(device, e["devices"], e["nnodes"], int(p["global_batch_size"]),
                                     int(e["tensor_parallel"]), int(e["sharding_parallel"]), e["sharding_stage"]))
    if p["fine_tuning"] == "lora":
        cfg.update({"fine_tuning": "LoRA", "lora": True, "lora_rank": int(p["lora_rank"]),
                    "lora_alpha": int(p["lora_alpha"])})
    else:
        cfg["fine_tuning"] = "full"
    return cfg


def merge_lora(base_dir, adapter_dir, out_dir, device):
    """Fold a LoRA adapter into the base weights and save a plain model (+ the base's tokenizer) to out_dir.

    Why not `paddleformers-cli export`: in PaddleFormers 1.2.0 its LoRA merge computes W + A@B correctly in Paddle's
    [in, out] layout, but the transpose back to the Hugging Face layout it saves is written as a reshape (the numpy
    view's strides are lost), so every linear weight of the exported model is scrambled and the model emits
    gibberish (measured on the tiny model: merged - base differed by up to 0.37 where the LoRA delta is <= 0.02;
    the saved tensor equals reshape(W_paddle + delta)). Here the engine's own LoRAModel applies the adapter
    (LoRAModel.from_pretrained), merges it in place (merge()), and the plain model is saved by save_pretrained,
    the same writer the training stage uses. tests/test_model.py checks merged logits == adapter logits.
    """
    import paddle
    from paddleformers.peft import LoRAModel
    from paddleformers.transformers import AutoModelForCausalLM, AutoTokenizer

    paddle.set_device(device)
    dtype = "float32" if device == "cpu" else "bfloat16"
    lora = LoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype), str(adapter_dir))
    lora.merge()
    merged = {k: v for k, v in lora.model.state_dict().items() if ".lora_" not in k}
    plain = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    missing, unexpected = plain.set_state_dict(merged)
    if missing or unexpected:
        raise RuntimeError(f"LoRA merge: weights missing {missing} / unexpected {unexpected}")
    plain.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))


def checkpoint_is_complete(folder):
    """Can the engine resume from this checkpoint-N folder?

    PaddleFormers 1.2 (one process) writes a checkpoint as: weights, trainer state, RNG state, optimizer, and the LR
    scheduler last. A run killed in between leaves a folder the engine still picks as the newest checkpoint and then
    fails on, every time ("Can't find a optimizer index"; seen when training was killed just after trainer_state.bin
    appeared). Complete = the scheduler state is there and every *.index.json parses and names shards that exist.
    """
    folder = Path(folder)
    if not (folder / "scheduler.pdparams").is_file() or not (folder / "trainer_state.bin").is_file():
        return False
    indexes = list(folder.glob("*.index.json"))
    if not any(i.name.startswith("optimizer") for i in indexes):
        return False
    for index in indexes:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError):
            return False
        if not all((folder / shard).is_file() for shard in shards):
            return False
    return True


def write_config(cfg, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def launch_command(command, cfg_path, device, devices="0", nnodes=1, env=None):
    """The argument list that runs `command` (train | export) on `cfg_path`.

    gpu: PaddlePaddle's distributed launcher, as paddleformers-cli builds it (one process per listed device). With
    nnodes > 1 every node runs this same command with its own RANK; MASTER_ADDR / MASTER_PORT name node 0 (the
    environment paddleformers-cli reads too).
    cpu: one process running this module, which starts the engine's launcher in-process.
    """
    if device == "gpu":
        from paddleformers.cli import launcher

        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(Path(cfg_path).parent / "dist_log"),
               "--gpus", str(devices)]
        if int(nnodes) > 1:
            env = os.environ if env is None else env
            if not env.get("MASTER_ADDR"):
                raise ValueError(f"engine.nnodes is {nnodes}: set MASTER_ADDR (node 0's address), MASTER_PORT and "
                                 "RANK (0 on node 0, 1..n-1 on the others) on every node")
            cmd += ["--master", f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '8080')}", "--nnodes", str(nnodes),
                    "--rank", str(env.get("RANK", "0"))]
        return cmd + ["--run_mode=collective", launcher.__file__, command, str(cfg_path)]
    return [sys.executable, "-m", "ernie_dpo.engine", command, str(cfg_path)]


# One logged training step, e.g. "loss: 0.6931, learning_rate: 1e-05, global_step: 3, rewards/chosen: 0.01, ..."
_STEP = re.compile(r"(?:^|[\s,])(loss|learning_rate|global_step|rewards/\w+|logps/\w+|train_\w+|"
                   r"interval_tokens_per_second_per_device): ?(-?[0-9.]+(?:e[-+]?\d+)?)")


def parse_log_line(line):
    """A dict of the numbers on a PaddleFormers step line, or None if the line is not a step log."""
    if "global_step" not in line:
        return None
    found = {k: float(v) for k, v in _STEP.findall(line)}
    if "global_step" not in found or ("loss" not in found and "train_loss" not in found):
        return None
    found["global_step"] = int(found["global_step"])
    return found


def run(cmd, log_path, on_step=None, env=None):
    """Run the engine, tee its output to `log_path`, call on_step(dict) for each logged step. Raises on failure."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, **(env or {}))
    # The engine must import this project (for the CPU launcher) from wherever the stage runs.
    root = str(Path(__file__).resolve().parents[1])
    full_env["PYTHONPATH"] = root + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "a", encoding="utf-8") as log, subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, bufsize=1
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            step = parse_log_line(line)
            if step is not None and on_step is not None:
                on_step(step)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
        raise RuntimeError(f"engine command failed (exit {rc}): {' '.join(cmd)}\n--- last lines of {log_path} ---\n{tail}")


def _single_process_cpu_main(argv):
    """Start the engine's launcher in this process (the CPU path of launch_command).

    Full-parameter DPO wraps the model with fleet.distributed_model(), which raises AttributeError
    ('Fleet' object has no attribute '_user_defined_strategy') when fleet was never initialised, as in a single
    CPU process. Only there, and only for that error, the model is used unwrapped: with one process there is
    nothing to distribute. LoRA DPO and SFT never reach this path.
    """
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
    from paddleformers.cli.launcher import launch

    sys.argv = ["launcher"] + argv
    launch()


if __name__ == "__main__":
    _single_process_cpu_main(sys.argv[1:])
