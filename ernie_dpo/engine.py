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
import signal
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


def use_all_cpu_cores():
    """Paddle's CPU kernels use ONE thread unless told otherwise (FLAGS_paddle_num_threads defaults to 1): use every
    core this process may run on. Returns the thread count (recorded in the inference metadata)."""
    import paddle

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    paddle.base.core.set_num_threads(n)
    return n


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
    loss_type, beta, sft_loss_ratio, lora_rank, seed, max_seq_len, max_prompt_len, save_steps) and the engine.* params
    `e` (devices, nnodes, tensor_parallel, sharding_parallel, sharding_stage) for more than one device.

    No lora_alpha: PaddleFormers 1.2's DPO workflow ignores it and always uses lora_alpha = 2 x lora_rank
    (cli/train/dpo/workflow.py), so a parameter for it would change nothing but the cache key. max_prompt_len is
    passed along, but its DPO dataset does not read it either: fit_pairs() enforces it before training."""
    if p["fine_tuning"] not in ("lora", "full"):
        raise ValueError(f"train.fine_tuning must be 'lora' or 'full', got {p['fine_tuning']!r}")
    cfg = _common(model, data_path, out_dir, device, p["seed"], p["max_seq_len"], p["max_steps"], p["warmup_steps"],
                  p["learning_rate"], p["global_batch_size"], p.get("save_steps", 0))
    cfg.update({
        "stage": "DPO",
        "max_prompt_len": int(p["max_prompt_len"]),
        "loss_type": p["loss_type"],
        "beta": float(p["beta"]),
        "sft_loss_ratio": float(p.get("sft_loss_ratio", 0.0)),  # + ratio x NLL of the chosen answer (0: plain DPO)
    })
    if e is not None:
        cfg.update(parallel_settings(device, e["devices"], e["nnodes"], int(p["global_batch_size"]),
                                     int(e["tensor_parallel"]), int(e["sharding_parallel"]), e["sharding_stage"]))
    if p["fine_tuning"] == "lora":
        cfg.update({"fine_tuning": "LoRA", "lora": True, "lora_rank": int(p["lora_rank"])})
    else:
        cfg["fine_tuning"] = "full"
    return cfg


# ------------------------------------------------------------------------------------- how the engine encodes chats
# PaddleFormers' DPO dataset encodes a conversation with tokenizer.encode_chat_inputs(), which by default renders
# each user turn ON ITS OWN through the chat template ("one turn" mode). With a template that adds a default system
# prompt (SmolLM2, Qwen, ...) every later turn then gets that system prompt again, and with ERNIE's template every
# turn gets its own <|begin_of_sentence|>: the model trains on prompts that inference never shows it. The engine's
# other mode renders the conversation cumulatively and cuts it into (query, answer) pieces. The engine runs in
# that mode here (_engine_main patches the default), and inference feeds the model exactly those pieces
# (prompt_ids), so training and inference see the same prompt tokens (tests/test_smol.py checks it on a real
# tokenizer, single- and multi-turn).


def use_cumulative_chat_encoding():
    """Make the engine's default ("one turn") chat encoding the cumulative one, in this process."""
    from paddleformers.transformers.tokenizer_utils import PaddleTokenizerMixin as cls

    if not hasattr(cls, "_engine_default_one_turn"):
        cls._engine_default_one_turn = cls._encode_chat_inputs_oneturn  # kept so tests can show what it did
    cls._encode_chat_inputs_oneturn = cls._encode_chat_inputs_openai_format


def chat_turns(tokenizer, messages):
    """[[query ids, answer ids], ..., [query ids]]: the engine's cumulative encoding of OpenAI-format messages."""
    return tokenizer._encode_chat_inputs_openai_format({"messages": [dict(m) for m in messages]})


def prompt_ids(tokenizer, messages):
    """The token ids a model is asked with: the conversation up to and including the generation prompt."""
    return [i for turn in chat_turns(tokenizer, messages) for part in turn for i in part]


def pair_fit(tokenizer, rec, max_seq_len, max_prompt_len):
    """What the engine's DPO dataset does with one pair, computed with its own encoding and length rules.

    The engine (datasets/DPODataset.py) counts chosen + rejected answers (+ an eos each) + the last user turn
    against max_seq_len and SKIPS the pair if they do not fit, logging only the first five; earlier turns are then
    added newest first while they fit, the rest dropped silently. It never reads max_prompt_len; here a pair whose
    prompt (after that truncation) is longer is dropped too, so the parameter means what it says.
    Returns (status, prompt tokens, total tokens): status "fits" | "history_truncated" | "too_long" | "prompt_too_long".
    """
    from .data import to_messages  # here, not at the top: GPU workers run this file as a script

    msgs = to_messages(rec, keep_system=True)  # as the engine's erniekit reader builds them: system first
    turns = {side: chat_turns(tokenizer, msgs + [{"role": "assistant", "content": rec["response"][k][0]}])
             for k, side in enumerate(("chosen", "rejected"))}
    answers = len(turns["chosen"][-1][1]) + len(turns["rejected"][-1][1]) + 2  # + the eos the engine appends
    history = turns["chosen"][:-1]
    prompt = len(turns["chosen"][-1][0])
    if answers + prompt > max_seq_len:
        return "too_long", prompt, answers + prompt
    kept = 0
    for q, a in reversed(history):
        if answers + prompt + len(q) + len(a) > max_seq_len:
            break
        prompt += len(q) + len(a)
        kept += 1
    if prompt > max_prompt_len:
        return "prompt_too_long", prompt, answers + prompt
    return ("fits" if kept == len(history) else "history_truncated"), prompt, answers + prompt


def fit_pairs(tokenizer, records, max_seq_len, max_prompt_len):
    """(records the engine will train on, counts by status, tokens per kept pair). Nothing is dropped uncounted."""
    from tqdm import tqdm

    kept, counts, tokens = [], {"fits": 0, "history_truncated": 0, "too_long": 0, "prompt_too_long": 0}, []
    for rec in tqdm(records, desc="counting tokens per pair", unit="pair"):
        status, _, total = pair_fit(tokenizer, rec, max_seq_len, max_prompt_len)
        counts[status] += 1
        if status in ("fits", "history_truncated"):
            kept.append(rec)
            tokens.append(total)
    return kept, counts, tokens


def engine_skips(log_text):
    """Pairs the engine itself reported skipping in its log (it should be none: fit_pairs removed them first)."""
    return log_text.count("[SKIP]")


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
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(Path(cfg_path).parent / "dist_log"),
               "--gpus", str(devices)]
        if int(nnodes) > 1:
            env = os.environ if env is None else env
            if not env.get("MASTER_ADDR"):
                raise ValueError(f"engine.nnodes is {nnodes}: set MASTER_ADDR (node 0's address), MASTER_PORT and "
                                 "RANK (0 on node 0, 1..n-1 on the others) on every node")
            cmd += ["--master", f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '8080')}", "--nnodes", str(nnodes),
                    "--rank", str(env.get("RANK", "0"))]
        # each worker runs this file (not the engine's launcher directly) for _engine_main's chat-encoding setting
        return cmd + ["--run_mode=collective", str(Path(__file__).resolve()), command, str(cfg_path)]
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
    """Run the engine, tee its output to `log_path`, call on_step(dict) for each logged step. Raises on failure.

    The engine runs in its own process group (paddle.distributed.launch starts one worker per GPU under it). If this
    process is stopped (Ctrl-C, SIGTERM from `dvc` or a scheduler) or anything here fails, the whole group is ended
    before returning: no engine keeps the GPUs, or writes checkpoints that race the next run. If this process is
    killed outright (SIGKILL, nothing runs here), the kernel sends the engine SIGTERM (_die_with_parent).
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, **(env or {}))
    # The engine must import this project (for the CPU launcher) from wherever the stage runs.
    root = str(Path(__file__).resolve().parents[1])
    full_env["PYTHONPATH"] = root + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    proc = None
    try:
        with open(log_path, "a", encoding="utf-8", buffering=1) as log:  # line-buffered: `tail -f` shows each step
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                                    bufsize=1, start_new_session=True, preexec_fn=_die_with_parent)
            for line in proc.stdout:
                log.write(line)
                step = parse_log_line(line)
                if step is not None and on_step is not None:
                    on_step(step)
            rc = proc.wait()
    finally:
        if proc is not None and proc.poll() is None:
            stop_group(proc)
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


def _die_with_parent():
    """In the engine child, before exec (Linux): SIGTERM this process when the stage that started it dies, even by
    SIGKILL. Its own process group keeps it out of a terminal's Ctrl-C, so this is what ends an orphan."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


def _engine_main(argv):
    """Start the engine's launcher in this process: the CPU path of launch_command, and each GPU worker.

    1. Chat encoding: the engine's cumulative mode instead of its "one turn" default (see chat_turns), on every
       device, so training sees the prompts inference sends.
    2. Only on a CPU (one process): all cores (use_all_cpu_cores), and: full-parameter DPO wraps the model with fleet.distributed_model(), which raises
       AttributeError ('Fleet' object has no attribute '_user_defined_strategy') when fleet was never initialised.
       There, and only for that error, the model is used unwrapped: with one process there is nothing to
       distribute. LoRA DPO and SFT never reach this path.
    """
    use_cumulative_chat_encoding()
    if os.environ.get("PADDLE_TRAINERS_NUM", "1") == "1" and not os.environ.get("PADDLE_TRAINER_ENDPOINTS"):
        use_all_cpu_cores()
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
    # Run as a file (a GPU worker), Python puts ernie_dpo/ first on sys.path, where stats.py, data.py, ... would
    # shadow any library module of the same name: drop it (the project root is on PYTHONPATH, see run()).
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    _engine_main(sys.argv[1:])
