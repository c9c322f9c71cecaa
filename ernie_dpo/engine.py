"""Everything PaddleFormers-specific lives here: engine YAML, CPU/GPU settings, how it is launched, log parsing.

Stages pass plain parameters; they never build engine YAML themselves. A run's YAML is written next to its log, and
the stage logs the exact launch command (launch_command): `ernie-dpo engine train <that yaml>` on a CPU, the same
under `python -m paddle.distributed.launch --gpus ...` on GPUs. Never `paddleformers-cli train <that yaml>`: it
skips _engine_main (the pairs' token ids, the checkpoint-load and one-GPU fixes), so the engine would re-encode the
pairs its own way.

Why not `paddleformers-cli` at all: it always relaunches itself through `paddle.distributed.launch --gpus <GPUs found
by GPUtil>`; with no GPU that list is empty and the launch fails. On a CPU we therefore run the engine's own launcher
function in one process (_engine_main), exactly what the CLI would start on each device; on GPUs the launcher starts
_engine_main on each device, with the environment the CLI would set (launch_env).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

# Settings that make PaddleFormers run on a CPU (docs/engine.md).
CPU_SETTINGS = {
    "device": "cpu",
    "compute_type": "float32",  # "fp32" is rejected; bf16/fp16 need a GPU
    "amp_master_grad": False,  # otherwise a ConfigConflict error when amp is off
    "_attn_implementation": "eager",  # the default flashmask kernel is GPU-only
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


class DeviceError(RuntimeError):
    pass


def check_device(device, devices="0"):
    """Stop before any heavy work when engine.device is gpu and no usable GPU is there (named, with the way out)."""
    if device not in ("cpu", "gpu"):
        raise DeviceError(f"engine.device must be 'cpu' or 'gpu', got {device!r}")
    if device == "cpu":
        return
    import paddle

    way_out = ("Install paddlepaddle-gpu for your CUDA (`make install-gpu CUDA=cu126`, docs/gpu.md), or run the "
               "offline demo on this machine: `dvc exp run -S profile=demo` (tiny model, CPU).")
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


def inference_device(device, devices):
    """Where local inference runs: the CPU, or the FIRST GPU of engine.devices ("2,3" -> gpu:2), not always gpu:0."""
    return "cpu" if device == "cpu" else f"gpu:{str(devices).split(',')[0].strip()}"


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


def prepare_model_dir(model_dir, device):
    """Make a model directory (built, converted, copied or downloaded) loadable on `device`; returns what changed.

    PaddleFormers' RMSNorm uses the fused kernel unless the model's config says `fuse_rms_norm: false`, and that
    kernel has no CPU implementation ("The kernel 'fused_rms_norm_ext' is not registered"): on a CPU every model
    needs the flag, not only the tiny one.
    """
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    changed = {}
    if device == "cpu" and config.get("fuse_rms_norm", True):
        config["fuse_rms_norm"] = False
        changed["fuse_rms_norm"] = False
    if changed:
        path.write_text(json.dumps(config, indent=2) + "\n")
    return changed


class LayoutError(ValueError):
    pass


def weight_names(model_dir):
    """The tensor names of a model directory's safetensors files (read from their headers, nothing loaded)."""
    names = []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        names += [k for k in header if k != "__metadata__"]
    return names


def check_layout(model_dir, source=""):
    """Refuse a checkpoint in PaddlePaddle's own ERNIE layout (`baidu/ERNIE-4.5-*-Paddle`: `ernie.` names, fused
    qkv_proj / up_gate_proj, [in, out] weights). PaddleFormers 1.2 only loads the Hugging Face layout of the `-PT`
    repositories (transformers/ernie4_5/modeling.py maps `model.layers.*.q_proj.weight`; its own hub map names
    `-PT`); the `-Paddle` layout fails later with "model.embed_tokens.weight should be assigned before!"."""
    names = weight_names(model_dir)
    paddle_layout = [n for n in names if n.startswith("ernie.") or ".qkv_proj." in n or ".up_gate_proj." in n]
    if paddle_layout:
        pt = source[:-len("-Paddle")] + "-PT" if source.endswith("-Paddle") else "the matching baidu/ERNIE-4.5-*-PT"
        raise LayoutError(f"{source or model_dir} is a checkpoint in PaddlePaddle's own layout (e.g. "
                          f"{paddle_layout[0]!r}), which PaddleFormers 1.2 cannot load; use {pt} (the Hugging Face "
                          f"layout), e.g. -S model.name_or_path={pt if pt.startswith('baidu') else 'baidu/ERNIE-4.5-0.3B-PT'}")


def use_all_cpu_cores():
    """Paddle's CPU kernels use ONE thread unless told otherwise (FLAGS_paddle_num_threads defaults to 1): use every
    core this process may run on. Returns the thread count (recorded in the inference metadata)."""
    import paddle

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    paddle.base.core.set_num_threads(n)
    return n


def gpu_capability(devices="0"):
    """The lowest (major, minor) compute capability among the GPUs `devices` names (engine.devices, indices into the
    visible GPUs): one pre-Ampere card among them decides the settings of all. None without a GPU."""
    import paddle

    if not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        return None
    found = paddle.device.cuda.device_count()
    ids = [int(d) for d in str(devices).split(",") if d.strip() and int(d) < found] or [0]
    return min(tuple(paddle.device.cuda.get_device_capability(i)) for i in ids)


def device_settings(device, capability=None, devices="0"):
    """Engine YAML keys for the device; on a GPU they depend on the compute capability of every GPU trained on
    (looked up when not given; unknown, e.g. when a GPU config is written on a CPU machine: Ampere or later
    assumed)."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"engine.device must be 'cpu' or 'gpu', got {device!r}")
    if device == "cpu":
        return dict(CPU_SETTINGS)
    capability = capability or gpu_capability(devices) or (8, 0)
    return dict(GPU_SETTINGS if tuple(capability) >= (8, 0) else GPU_SETTINGS_PRE_AMPERE)


def inference_dtype(device, capability=None):
    """Weights' dtype for local inference: float32 on a CPU and on GPUs before Ampere, bfloat16 from Ampere on."""
    if device == "cpu":
        return "float32"
    return "bfloat16" if device_settings("gpu", capability)["compute_type"] == "bf16" else "float32"


def _common(model, data_path, out_dir, device, seed, max_seq_len, max_steps, warmup_steps, learning_rate,
            global_batch_size, save_steps, devices="0"):
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
        # One checkpoint format on every device: unified_checkpoint, the layout checkpoint_is_complete() reads
        # (optimizer*.index.json naming its shards). The engine's default, flex_checkpoint, resumes through fleet's
        # hybrid communicate group, which a single CPU process never creates (AttributeError: 'Fleet' object has no
        # attribute '_hcg'), and on a GPU it writes optimizer state into folders with no optimizer index, so
        # every GPU checkpoint looked incomplete and was removed: a killed GPU run restarted from step 1.
        # (checked on CPU: killed after checkpoint-5, resumed at step 6; on a GPU: not run here, no GPU was lent.)
        cfg.update({"save_strategy": "steps", "save_steps": int(save_steps), "save_total_limit": 1,
                    "save_checkpoint_format": "unified_checkpoint", "load_checkpoint_format": "unified_checkpoint"})
    else:
        cfg["save_strategy"] = "no"
    cfg.update(device_settings(device, devices=devices))
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
    `e` (devices, nnodes, tensor_parallel, sharding_parallel, sharding_stage) for more than one device.

    No lora_alpha: PaddleFormers 1.2's DPO workflow ignores it and always uses lora_alpha = 2 x lora_rank
    (cli/train/dpo/workflow.py), so a parameter for it would change nothing but the cache key. max_prompt_len is
    passed along, but its DPO dataset does not read it either: fit_pairs() enforces it before training."""
    if p["fine_tuning"] not in ("lora", "full"):
        raise ValueError(f"train.fine_tuning must be 'lora' or 'full', got {p['fine_tuning']!r}")
    cfg = _common(model, data_path, out_dir, device, p["seed"], p["max_seq_len"], p["max_steps"], p["warmup_steps"],
                  p["learning_rate"], p["global_batch_size"], p.get("save_steps", 0),
                  devices=e["devices"] if e is not None else "0")
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
        cfg.update(parallel_settings(device, e["devices"], e["nnodes"], int(p["global_batch_size"]),
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


def engine_skips(log_text):
    """Pairs the engine itself reported skipping in its log (it should be none: tokens.fit_pairs removed them first)."""
    return log_text.count("[SKIP]")


def merge_lora(base_dir, adapter_dir, out_dir, device):
    """Fold a LoRA adapter into the base weights and save a plain float32 model (+ the base's tokenizer files, copied
    as they are) to out_dir.

    Why not `paddleformers-cli export`: in PaddleFormers 1.2.0 its LoRA merge computes W + A@B correctly in Paddle's
    [in, out] layout, but the transpose back to the Hugging Face layout it saves is written as a reshape (the numpy
    view's strides are lost), so every linear weight of the exported model is scrambled and the model emits
    gibberish (measured on the tiny model: merged - base differed by up to 0.37 where the LoRA delta is <= 0.02;
    the saved tensor equals reshape(W_paddle + delta)). Here the engine's own LoRAModel applies the adapter
    (LoRAModel.from_pretrained), merges it in place (merge()), and the plain model is saved by save_pretrained,
    the same writer the training stage uses. tests/test_model.py checks merged logits == adapter logits.

    Float32 on every device: LoRALinear.merge adds in the layer's dtype, and in bf16 a delta below half a bf16 step
    of the weight vanishes (the GPU review measured 32% of weights unchanged for deltas ~1e-4). Inference casts to
    its own dtype when it loads the merged model.
    Tokenizer files are copied, not re-saved: transformers 5 (PaddleFormers' pin) re-saves `extra_special_tokens`
    as a list, which the transformers 4 of vLLM / FastDeploy servers cannot read.
    """
    import paddle
    from paddleformers.peft import LoRAModel
    from paddleformers.transformers import AutoModelForCausalLM

    paddle.set_device(device if device == "cpu" else "gpu")
    lora = LoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="float32"),
                                     str(adapter_dir))
    lora.merge()
    merged = {k: v for k, v in lora.model.state_dict().items() if ".lora_" not in k}
    plain = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="float32")
    missing, unexpected = plain.set_state_dict(merged)
    if missing or unexpected:
        raise RuntimeError(f"LoRA merge: weights missing {missing} / unexpected {unexpected}")
    plain.save_pretrained(str(out_dir))
    copy_tokenizer_files(base_dir, out_dir)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def copy_tokenizer_files(src, dst):
    """The tokenizer (and generation config) files of a model directory, byte for byte."""
    import shutil

    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            (Path(dst) / name).unlink(missing_ok=True)  # maybe a hard link into another model directory
            shutil.copy2(Path(src) / name, Path(dst) / name)


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


def console_script():
    """The `ernie-dpo` executable of this environment (installed with the package: `pip install -e .`)."""
    path = Path(sys.executable).parent / "ernie-dpo"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: install the project into this environment (`make install`, or "
                                "`pip install --no-deps -e .`)")
    return str(path)


# The launcher's own log folder: outside every DVC output (logs/train is one), so nothing it writes reaches the DVC
# cache, a remote or a checkpoint bucket; git-ignored (logs/.gitignore). The engine's output is in logs/train/engine.log.
LAUNCHER_LOGS = Path("logs/launcher")


def launch_command(command, cfg_path, device, devices="0", nnodes=1, env=None):
    """The argument list that runs `command` (train | export) on `cfg_path`.

    gpu: PaddlePaddle's distributed launcher, as paddleformers-cli builds it (one process per listed device). With
    nnodes > 1 every node runs this same command with its own RANK; MASTER_ADDR / MASTER_PORT name node 0 (the
    environment paddleformers-cli reads too).
    cpu: one process running this module, which starts the engine's launcher in-process.
    """
    if device == "gpu":
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(LAUNCHER_LOGS / command),
               "--gpus", str(devices)]
        if int(nnodes) > 1:
            env = os.environ if env is None else env
            if not env.get("MASTER_ADDR"):
                raise ValueError(f"engine.nnodes is {nnodes}: set MASTER_ADDR (node 0's address), MASTER_PORT and "
                                 "RANK (0 on node 0, 1..n-1 on the others) on every node")
            cmd += ["--master", f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '8080')}", "--nnodes", str(nnodes),
                    "--rank", str(env.get("RANK", "0"))]
        # each worker runs `ernie-dpo engine` (the installed console script: the launcher runs a non-.py script as
        # an executable), not the engine's launcher directly, for _engine_main's settings
        return cmd + ["--run_mode=collective", console_script(), "engine", command, str(cfg_path)]
    return [sys.executable, "-m", "ernie_dpo.engine", command, str(cfg_path)]


# One logged training step, e.g. "loss: 0.6931, learning_rate: 1e-05, global_step: 3, rewards/chosen: 0.01, ..."
_STEP = re.compile(r"(?:^|[\s,])(loss|\w+_loss|learning_rate|global_step|rewards/\w+|logps/\w+|train_\w+|eval_\w+(?:/\w+)?|"
                   r"interval_tokens_per_second_per_device): ?(-?[0-9.]+(?:e[-+]?\d+)?|-?nan|-?inf)")  # nan: a diverged run, kept


def parse_log_line(line):
    """A dict of the numbers on a PaddleFormers step line (training: with global_step and loss) or eval line (with
    eval_loss; the engine prints no step on it), or None for any other line."""
    if "global_step" not in line and "eval_loss" not in line:
        return None
    found = {k: float(v) for k, v in _STEP.findall(line)}
    if "eval_loss" in found:
        return found
    if "global_step" not in found or not {"loss", "train_loss"} & found.keys():
        return None
    found["global_step"] = int(found["global_step"])
    return found


# What paddleformers-cli does to the environment before it launches (paddleformers/cli/cli.py, 1.2.0): variables a
# previous or enclosing distributed job left behind would make paddle.distributed.launch join the wrong job, and
# three flags change numerics or the data loader.
STALE_LAUNCH_ENV = ("PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ID", "PADDLE_WORKERS_IP_PORT_LIST", "PADDLE_TRAINERS",
                    "PADDLE_NUM_GRADIENT_SERVERS", "PADDLE_ELASTIC_JOB_ID", "PADDLE_TRAINER_ENDPOINTS",
                    "DISTRIBUTED_TRAINER_ENDPOINTS", "FLAGS_START_PORT", "PADDLE_ELASTIC_TIMEOUT")
LAUNCH_FLAGS = {"FLAGS_set_to_1d": "False", "NVIDIA_TF32_OVERRIDE": "0", "FLAGS_dataloader_use_file_descriptor": "False"}
RUN_MARK = "ERNIE_DPO_ENGINE_RUN"  # in every engine process's environment: how run() finds them all to stop them


# Names of variables that carry credentials. The engine and the inference servers need none of them (models and data
# are local files by then), and Paddle's GPU launcher writes its whole environment into its log folder
# (backup_env.<rank>.json, envlog.<rank>, the pod log): what the engine never receives, it cannot write anywhere.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH|COOKIE|SESSION|"
                         r"CONNECTION_STRING|DATABASE_URL|(^|_)(KEY|PAT|AK|SK|PWD|DSN)$", re.IGNORECASE)
NOT_SECRET = {"TOKENIZERS_PARALLELISM", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "AISTUDIO_HUB_DISABLE_IMPLICIT_TOKEN"}
_PROXY_USER = re.compile(r"(://)[^/@\s]+@")  # http://user:password@proxy:3128 -> http://proxy:3128


def without_secrets(env):
    """env without the variables whose names say they carry a credential (SECRET_NAME, except NOT_SECRET's
    switches), and proxies without their user:password."""
    out = {k: v for k, v in env.items() if k in NOT_SECRET or not SECRET_NAME.search(k)}
    return {k: _PROXY_USER.sub(r"\1", v) if k.lower().endswith("_proxy") else v for k, v in out.items()}


def launch_env(env=None):
    """The environment the engine starts with: the CLI's (stale PADDLE_* cleared, its flags set unless the user set
    them), no credentials (without_secrets), unbuffered output, and a mark naming this run."""
    full = {k: v for k, v in without_secrets(os.environ).items() if k not in STALE_LAUNCH_ENV}
    full.update(env or {})
    for k, v in LAUNCH_FLAGS.items():
        full.setdefault(k, v)
    full.setdefault("PYTHONUNBUFFERED", "1")
    # the engine imports ernie_dpo (its hooks) from the checkout it runs in, as the stages do, not from wherever the
    # editable install points: DVC runs queued experiments in copies of the repository
    full["PYTHONPATH"] = os.pathsep.join([os.getcwd()] + [p for p in [full.get("PYTHONPATH")] if p])
    full[RUN_MARK] = uuid.uuid4().hex
    return full


def run(cmd, log_path, on_step=None, env=None, on_line=None):
    """Run the engine, tee its output to `log_path`, call on_step(dict) for each logged step (training or eval) and
    on_line(line) for every line. Raises on failure.

    Stopping: the engine runs in its own process group. If this process is stopped (Ctrl-C, SIGTERM from `dvc` or a
    scheduler) or anything here fails, the group is ended (stop_group) and then every process that carries this
    run's mark in its environment: paddle.distributed.launch starts each GPU worker in a session of its own
    (os.setsid), outside the group, and waits 30 s for them itself, so the group alone can leave workers behind
    holding GPUs and writing checkpoints. If this process is killed outright (SIGKILL), the kernel ends the launcher
    (_die_with_parent) and each worker with it (_engine_main sets the same on workers).
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = launch_env(env)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    proc = None
    try:
        with open(log_path, "a", encoding="utf-8", buffering=1) as log:  # line-buffered: `tail -f` shows each step
            # errors="replace": one undecodable byte in the engine's output must not end a training run
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                                    encoding="utf-8", errors="replace",
                                    bufsize=1, start_new_session=True, preexec_fn=_die_with_parent)
            for line in proc.stdout:
                log.write(line)
                if on_line is not None:
                    on_line(line)
                step = parse_log_line(line)
                if step is not None and on_step is not None:
                    on_step(step)
            rc = proc.wait()
    finally:
        if proc is not None and proc.poll() is None:
            stop_group(proc)
        if proc is not None:
            kill_marked(full_env[RUN_MARK])
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if rc != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
        raise RuntimeError(f"engine command failed (exit {rc}): {' '.join(cmd)}\n--- last lines of {log_path} ---\n{tail}")


def stop_group(proc, grace_s=10):
    """SIGTERM the engine's process group, then SIGKILL what is left after grace_s seconds."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def marked_pids(mark):
    """Processes of this user whose environment carries RUN_MARK=mark (Linux /proc; elsewhere none are found)."""
    needle = f"{RUN_MARK}={mark}".encode()
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if d.stat().st_uid == os.getuid() and needle in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def kill_marked(mark, grace_s=5):
    """End every process left from one engine run (workers that left the launcher's group): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in marked_pids(mark) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(p in marked_pids(mark) for p in pids):
            time.sleep(0.2)


def _die_with_parent(sig=signal.SIGTERM):
    """(Linux) `sig` to this process when its parent dies, even by SIGKILL: in the engine child (before exec) when
    the stage dies, in a GPU worker when the launcher dies. Their own sessions keep them out of a terminal's Ctrl-C,
    so this is what ends an orphan."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


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
    """`ernie-dpo engine train|export CFG` (and `python -m ernie_dpo.engine ...`): _engine_main with a --help."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("train", "export"):
        print("usage: ernie-dpo engine train|export CONFIG.yaml\n\n" + _engine_main.__doc__)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    _engine_main(argv)


if __name__ == "__main__":
    main()
