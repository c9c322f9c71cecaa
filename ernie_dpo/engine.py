"""Engine YAML: every PaddleFormers training setting this project writes, and the CPU/GPU settings behind them.

Stages pass plain parameters; they never build engine YAML themselves. Where this project's values differ from
PaddleFormers 1.2's defaults because ERNIEKit (the recipe's trainer) sets them, docs/erniekit_parity.md has the row.
Starting the engine: launch.py; the engine process itself: engine_main.py; model files and the LoRA merge: weights.py.
"""
from pathlib import Path

import yaml

from .devices import gpu_capability

# Settings that make PaddleFormers run on a CPU (docs/engine.md).
CPU_SETTINGS = {
    "device": "cpu",
    "compute_type": "float32",  # "fp32" is rejected; bf16/fp16 need a GPU
    "amp_master_grad": False,  # otherwise a ConfigConflict error when amp is off
    "_attn_implementation": "eager",  # the default flashmask kernel is GPU-only
    # the DPO loss applies the LM head itself, to the scored (answer) positions only, not to every prompt and
    # padding position of the batch (benchmarks/training.py --quick --modes lora: 15.0 -> 11.9 s/step, same losses);
    # decode.lm_logits applies the head where the engine's model is used for sampling
    "use_fused_head_and_loss_fn": True,
    "use_filtered_label_loss": True,
}
GPU_SETTINGS = {  # compute capability >= 8.0 (Ampere and later): what ERNIEKit's ERNIE-4.5-0.3B DPO configs use
    "device": "gpu",
    "compute_type": "bf16",
    "fp16_opt_level": "O2",  # bf16 weights, fp32 master weights; without it the engine's default is O1 (fp32
                             # weights under autocast) and amp_master_grad is ignored
    "amp_master_grad": True,
    "_attn_implementation": "flashmask",
}
# Before Ampere (V100, T4: capability 7.x) bf16 does not run (Paddle's AMP falls back to fp32 without a word) and
# the FlashAttention-2 kernels behind flashmask refuse: float32 and PaddlePaddle's SDPA attention instead.
GPU_SETTINGS_PRE_AMPERE = {
    "device": "gpu",
    "compute_type": "float32",
    "amp_master_grad": False,
    "_attn_implementation": "sdpa",
}


def parallel_settings(device, gpus, nnodes, global_batch_size, tensor_parallel, sharding_parallel, sharding_stage):
    """Engine YAML keys for training on gpus x nnodes processes: data, sharding and tensor parallelism.

    world = GPUs per node x nodes. tensor_parallel splits each layer over that many devices; the remaining
    world / tensor_parallel ranks see different data (data parallel), and sharding_parallel of them share optimizer
    state (ZeRO-like `sharding_stage`: stage1 | stage2 | stage3). The global batch is split evenly over the
    data ranks. One device: no keys (the engine's single-process defaults).
    """
    world = int(gpus) * int(nnodes)
    if device == "cpu" and world > 1:
        raise ValueError("on a CPU the engine runs one process: keep engine.gpus 1 and engine.nnodes 1")
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


def device_settings(device, capability=None, gpus=1):
    """Engine YAML keys for the device; on a GPU they depend on the compute capability of every GPU trained on
    (looked up when not given; unknown, e.g. when a GPU config is written on a CPU machine: Ampere or later
    assumed)."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"engine.device must be 'cpu' or 'gpu', got {device!r}")
    if device == "cpu":
        return dict(CPU_SETTINGS)
    capability = capability or gpu_capability(gpus) or (8, 0)
    return dict(GPU_SETTINGS if tuple(capability) >= (8, 0) else GPU_SETTINGS_PRE_AMPERE)


def inference_dtype(device, capability=None):
    """Weights' dtype for local inference: float32 on a CPU and on GPUs before Ampere, bfloat16 from Ampere on."""
    if device == "cpu":
        return "float32"
    return "bfloat16" if device_settings("gpu", capability)["compute_type"] == "bf16" else "float32"


def _common(model, data_path, out_dir, device, seed, max_seq_len, max_steps, warmup_steps, learning_rate,
            global_batch_size, save_steps, gpus=1):
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
        # One checkpoint format on every device: unified_checkpoint, the layout weights.checkpoint_is_complete()
        # reads (optimizer*.index.json naming its shards). The engine's default, flex_checkpoint, resumes through
        # fleet's hybrid communicate group, which a single CPU process never has ('Fleet' object has no attribute
        # '_hcg'), and on a GPU it writes optimizer state without an optimizer index (tests/test_interruption.py)
        cfg.update({"save_strategy": "steps", "save_steps": int(save_steps), "save_total_limit": 1,
                    "save_checkpoint_format": "unified_checkpoint", "load_checkpoint_format": "unified_checkpoint"})
    else:
        cfg["save_strategy"] = "no"
    cfg.update(device_settings(device, gpus=gpus))
    return cfg


def sft_config(model, data_path, out_dir, device, seed, max_seq_len, max_steps, learning_rate, global_batch_size):
    """Full-parameter SFT: the tiny model's warm-up."""
    cfg = _common(model, data_path, out_dir, device, seed, max_seq_len, max_steps, max(1, max_steps // 10),
                  learning_rate, global_batch_size, save_steps=0)
    cfg.update({"stage": "SFT", "fine_tuning": "full"})
    return cfg


def dpo_config(model, data_path, out_dir, device, p, e=None, eval_path=None):
    """DPO with the train.* params `p` (max_steps, warmup_steps, global_batch_size, learning_rate, fine_tuning,
    loss_type, beta, sft_loss_ratio, lora_rank, seed, max_seq_len, max_prompt_len, save_steps) and the engine.* params
    `e` (gpus, nnodes, tensor_parallel, sharding_parallel, sharding_stage) for more than one device.

    No lora_alpha: PaddleFormers 1.2's DPO workflow ignores it and always uses lora_alpha = 2 x lora_rank
    (cli/train/dpo/workflow.py), so a parameter for it would change nothing but the cache key. max_prompt_len is
    passed along, but its DPO dataset does not read it either: fit_pairs() enforces it before training."""
    if p["fine_tuning"] not in ("lora", "full"):
        raise ValueError(f"train.fine_tuning must be 'lora' or 'full', got {p['fine_tuning']!r}")
    cfg = _common(model, data_path, out_dir, device, p["seed"], p["max_seq_len"], p["max_steps"], p["warmup_steps"],
                  p["learning_rate"], p["global_batch_size"], p.get("save_steps", 0),
                  gpus=e["gpus"] if e is not None else 1)
    cfg.update({
        "stage": "DPO",
        "max_prompt_len": int(p["max_prompt_len"]),
        "loss_type": p["loss_type"],
        "beta": float(p["beta"]),
        "sft_loss_ratio": float(p.get("sft_loss_ratio", 0.0)),  # + ratio x NLL of the chosen answer (0: plain DPO)
        # ERNIEKit's default (its DPOTrainingArguments), not PaddleFormers 1.2's (False): docs/erniekit_parity.md
        "normalize_logps": bool(p.get("normalize_logps", True)),
    })
    if eval_path is not None:
        # the engine's own eval loop on held-out pairs: eval_loss, eval_rewards/{chosen,rejected,accuracies,margins},
        # eval_logps/* every train.eval_steps steps (0: only after the last step) and at the end
        # (the engine refuses do_eval without a step strategy: 0 = every max_steps steps, i.e. at the end)
        steps = int(p.get("eval_steps", 0)) or int(p["max_steps"])
        cfg.update({"do_eval": True, "eval_dataset_type": "erniekit", "eval_dataset_path": str(eval_path),
                    "eval_dataset_prob": "1.0", "evaluation_strategy": "steps", "eval_steps": steps})
    if e is not None:
        cfg.update(parallel_settings(device, e["gpus"], e["nnodes"], int(p["global_batch_size"]),
                                     int(e["tensor_parallel"]), int(e["sharding_parallel"]), e["sharding_stage"]))
    if eval_path is not None:
        # one held-out pair per eval batch: the engine averages its eval metrics over batches, so a short last batch
        # (19 pairs at batch 8: 8, 8, 3) would weigh its pairs 8/3 times as much as the others'. At batch 1 every
        # eval_* value is the plain mean over the held-out pairs (each counted once: _each_pair_once)
        cfg["per_device_eval_batch_size"] = 1
    if p["fine_tuning"] == "lora":
        cfg.update({"fine_tuning": "LoRA", "lora": True, "lora_rank": int(p["lora_rank"])})
    else:
        cfg["fine_tuning"] = "full"
    return cfg


def write_config(cfg, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path
