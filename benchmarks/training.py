"""DPO training speed and memory, this project's engine vs Hugging Face TRL on the same pairs (figures, not tests).

    python benchmarks/training.py --quick                                           # smoke run: 3 steps, 8 pairs
    python benchmarks/training.py --peer-python /path/to/peer-venv/bin/python        # + TRL, alternated runs
    python benchmarks/training.py --modes lora --steps 40 --repeats 3 --peer-python ...

The peer venv: python3 -m venv peer && peer/bin/pip install -r benchmarks/requirements-peer.txt (torch CPU +
transformers + TRL; never part of the main install).

Pairs: the smol profile's training pairs, built from its real file as the pipeline builds them (prepare -> test set
-> pool outside the test prompts -> the trainset filter -> held-out eval pairs set aside -> system prompts dropped ->
tokens.fit_pairs with the profile's max_seq_len / max_prompt_len / truncate), then a seeded sample of --pairs of them
(default steps x batch, cut to whole batches of the pairs there are; with fewer pairs than steps x batch they are
trained pass after pass). Both frameworks get those token ids as they are (the engine through its `token_ids` hook,
TRL through its collator's own columns: benchmarks/peer_trl.py), in the same order (the engine's shuffle is off,
each pair once per pass as engine_main._each_pair_once makes it, and TRL's sampler is sequential), so step k is the
same batch on both sides.
Settings (conf/config.yaml + conf/profile/smol.yaml, read at run time): learning rate, cosine schedule, warmup,
beta, sigmoid loss + sft_loss_ratio x chosen NLL, batch, no gradient accumulation, float32, the same CPU threads;
--modes full (every weight) and lora (rank train.lora_rank, alpha 2 x rank and PaddleFormers' Llama target modules).

Figures per framework and mode: s/step (median of the end-to-end intervals from step 3 on, all repeats pooled),
tokens per step and s per 1 000 tokens (steps 3+; step_tokens), loop s (the trainer's own train_runtime), wall s
(process start to exit: imports, model load, loop, saving the trained weights), peak RSS of the training process
through its last step (VmHWM), and loss at step 1 and at the last step; then project / TRL ratios.
Tokens: "processed" = rows x padded width of the forward pass each framework runs (the engine: one row per pair,
prompt + chosen + rejected packed, padded to the batch's longest pair; TRL: prompt + chosen and prompt + rejected
as two rows, padded to the batch's longest row), "pair" = prompt + chosen + rejected tokens (the same on both
sides). Packing is the engine's design, so s/step is the user's figure; s per 1 000 processed tokens compares the
two forward/backward implementations on equal work.
Reference log-probs: computed once before training on both sides (train.reference_once; TRL's
precompute_ref_log_probs), unless --reference-once off (then both recompute them at every step).
Step 1 is the same batch and weights on both sides with the same loss formula
(benchmarks/peer_trl.py), so the two step-1 losses differ only by the two forward passes' numerics (measured at
max_seq_len 768: 2.6218 vs 2.6125, PaddleFormers' summed log-probs 0.1-0.9% below transformers' on the same ids).

Cost: a step takes one to two minutes on 2 cores and a run 10-16 GB of RAM (both frameworks, max_seq_len 768), so
the default (2 modes x 2 frameworks x 2 repeats x 20 steps) runs for hours: run it on a machine doing nothing else.
"""
import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]  # ernie_dpo itself comes from the install (pip install -e .)

# PaddleFormers 1.2's DPO LoRA targets for a Llama model (cli/utils/llm_utils.get_lora_target_modules: q/k/v/o,
# gate/up/down, and fused qkv / gate_up layers SmolLM2 does not have), as PEFT module names
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smol_settings():
    """The smol profile's parameters: conf/config.yaml with conf/profile/smol.yaml on top (as Hydra composes them)."""
    def merge(a, b):
        return {k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                for k, v in {**a, **b}.items()}

    return merge(yaml.safe_load((ROOT / "conf/config.yaml").read_text()),
                 yaml.safe_load((ROOT / "conf/profile/smol.yaml").read_text()))


def training_pairs(params, tokenizer):
    """The train stage's pairs (stages/prepare, testset, trainset, train.encode_pairs) with their token ids."""
    from ernie_dpo import tokens
    from ernie_dpo.data import (
        load_records,
        make_testset,
        make_validation,
        pool_outside,
        prepare_records,
        sample_down,
        select_pairs,
        split_eval,
    )

    d, t, tr = params["data"], params["trainset"], params["train"]
    records, _, _ = prepare_records(load_records(ROOT / d["raw_path"]), params["prepare"]["max_chars"], d["format"])
    tests = make_testset(records, params["testset"]["size"], params["testset"]["seed"], params["testset"]["keep_system"])
    tests += make_validation(records, tests, params["testset"]["validation_size"], params["testset"]["seed"],
                             params["testset"]["keep_system"])
    pool, _, _ = pool_outside(records, tests)
    pairs = select_pairs(pool, "ratio", t["min_ratio"])  # near_baseline would need the baseline stage's replies
    pairs, _ = split_eval(pairs, t["eval_pairs"], t["seed"])
    pairs = sample_down(pairs, t["size"], t["seed"])
    if not t["keep_system"]:
        pairs = [{k: v for k, v in r.items() if k != "system"} for r in pairs]
    kept, _, _ = tokens.fit_pairs(tokenizer, pairs, tr["max_seq_len"], tr["max_prompt_len"], tr["truncate"],
                                  tr["keep_chosen_end"])
    return kept


def cpu_name():
    """The CPU's model name (Linux /proc/cpuinfo), to say which machine the figures come from."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def vm_hwm_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def child_pids():
    """Processes whose parent is this one (Linux /proc)."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2:].split()[1]) == os.getpid():
            found.append(int(d.name))
    return found


def project(model_dir, pairs, mode, tr, steps, work):
    """One training run through the engine, exactly as the train stage launches it; figures from its log lines."""
    from ernie_dpo import engine, launch
    from ernie_dpo.common import write_jsonl

    write_jsonl(work / "pairs.jsonl", pairs)
    cfg = engine.dpo_config(model_dir, work / "pairs.jsonl", work / "out", "cpu",
                            {**tr, "fine_tuning": mode, "max_steps": steps, "save_steps": 0})
    cfg["random_shuffle"] = False  # file order, like TRL's sequential sampler: step k is the same batch on both sides
    cmd = launch.launch_command("train", engine.write_config(cfg, work / "dpo.yaml"), "cpu")
    got = {"step_end": [], "losses": [], "peak_kb": 0, "train_runtime": None, "trainable": None}
    pid = []

    def on_line(line):
        if not pid:
            pid.extend(child_pids())  # the engine: one process on a CPU (launch.run started it)
        found = re.search(r"Number of trainable parameters = ([\d,]+)", line)
        if found:
            got["trainable"] = int(found.group(1).replace(",", ""))
        found = re.search(r"train_runtime: ([\d.]+)", line)  # the summary line after the loop (no global_step)
        if found:
            got["train_runtime"] = float(found.group(1))

    def on_step(s):
        if "loss" in s and "eval_loss" not in s:
            got["step_end"].append(time.time())
            got["losses"].append(s["loss"])
            if s["global_step"] == steps:  # the high-water mark through the last step, as TRL's side reads it
                got["peak_kb"] = max(vm_hwm_kb(p) for p in pid)

    start = time.time()
    from ernie_dpo import engine_main

    launch.run(cmd, work / "train.log", on_step, on_line=on_line, env=engine_main.environment(tr))  # as the stage
    got["seconds"] = time.time() - start
    return got


def peer(python, model_dir, pairs, mode, tr, steps, threads, work):
    """One training run through TRL in the peer venv (benchmarks/peer_trl.py)."""
    spec = work / "spec.json"
    spec.write_text(json.dumps({
        "model": str(Path(model_dir).resolve()), "out": str(work / "out"), "mode": mode, "steps": steps, "threads": threads,
        "pairs": [p["token_ids"] for p in pairs], "batch": int(tr["global_batch_size"]),
        "learning_rate": float(tr["learning_rate"]), "warmup_steps": int(tr["warmup_steps"]),
        "beta": float(tr["beta"]), "sft_loss_ratio": float(tr["sft_loss_ratio"]), "seed": int(tr["seed"]),
        "lora_rank": int(tr["lora_rank"]), "lora_alpha": 2 * int(tr["lora_rank"]), "lora_targets": LORA_TARGETS,
        "precompute_ref": tr["reference_once"]}))
    start = time.time()
    # the allocator settings this project's processes give themselves (runtime._keep_freed_memory: freed memory kept,
    # not faulted in again), for torch too, through glibc's environment variables: the same conditions on both sides
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
    r = subprocess.run([python, str(ROOT / "benchmarks/peer_trl.py"), str(spec)], capture_output=True, text=True,
                       env=env)
    (work / "train.log").write_text(r.stderr + r.stdout)  # stdout: TRL's per-step metrics, then the figures
    if r.returncode != 0:
        raise RuntimeError(f"TRL peer failed:\n{r.stderr[-3000:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    got["seconds"] = time.time() - start
    return got


def step_seconds(run):
    """End-to-end time of steps 3..N (interval between the ends of step k-1 and k): steps 1-2 warm up."""
    t = run["step_end"]
    return [t[k] - t[k - 1] for k in range(2, len(t))]


def step_tokens(pairs, batch, steps, side):
    """[(processed, pair tokens)] of each step: batches of `batch` pairs in file order, pass after pass (both
    sides read the pairs sequentially; --pairs is a multiple of the batch, so every batch is full)."""
    out = []
    for k in range(steps):
        rows = [pairs[(k * batch + i) % len(pairs)]["token_ids"] for i in range(batch)]
        pair_tokens = [len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]) for r in rows]
        if side == "project":  # one packed row per pair
            processed = len(rows) * max(pair_tokens)
        else:  # two rows per pair
            widths = [len(r["prompt"]) + len(r[a]) for r in rows for a in ("chosen", "rejected")]
            processed = len(widths) * max(widths)
        out.append((processed, sum(pair_tokens)))
    return out


def summary(runs, tokens):
    per_step = [s for r in runs for s in step_seconds(r)]
    counted = tokens[2:]  # steps 3..N, as step_seconds
    seconds = sum(sum(step_seconds(r)) for r in runs) / len(runs)
    return {"step": statistics.median(per_step) if per_step else float("nan"),
            "processed": sum(p for p, _ in counted) / len(counted),
            "pair_tokens": sum(t for _, t in counted) / len(counted),
            "s_per_1k": 1000 * seconds / sum(p for p, _ in counted),
            "s_per_1k_pair": 1000 * seconds / sum(t for _, t in counted),
            "step_intervals": per_step,
            "loop": [r["train_runtime"] for r in runs], "wall": [r["seconds"] for r in runs],
            "peak": max(r["peak_kb"] for r in runs) / 1024 / 1024, "first": runs[0]["losses"][0],
            "last": runs[0]["losses"][-1], "steps": len(runs[0]["losses"]), "trainable": runs[0]["trainable"]}


def main():
    from ernie_dpo import runtime

    runtime.setup()  # as the stages: MKL's fast path on AMD CPUs, quiet imports
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, help="pairs trained on (default: steps x batch, every pair once, or as "
                    "many of the profile's pairs as fill whole batches)")
    ap.add_argument("--json", help="also write the figures (and every step interval) to this json file")
    ap.add_argument("--repeats", type=int, default=2, help="runs per framework and mode, alternated")
    ap.add_argument("--threads", type=int, help="CPU cores for both frameworks (default: every core of this process)")
    ap.add_argument("--peer-python", help="interpreter of a venv with benchmarks/requirements-peer.txt")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 8 pairs, 1 repeat")
    ap.add_argument("--reference-once", choices=["on", "off"],
                    help="this project's train.reference_once (default: the smol profile's value)")
    ap.add_argument("--cache", default=str(ROOT / ".bench_cache"), help="where the converted SmolLM2 is kept")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.pairs, args.repeats = 3, 8, 1
    if args.threads:  # both children inherit the affinity: the engine uses every core it may run on, TRL is told
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    threads = len(os.sched_getaffinity(0))
    from paddleformers.transformers import AutoTokenizer
    from tabulate import tabulate

    from generation import smol_dir  # benchmarks/ is this script's own directory (as in profile_decode.py)

    from ernie_dpo.data import sample_down

    params = smol_settings()
    tr = params["train"]
    if args.reference_once:
        tr["reference_once"] = args.reference_once == "on"
    model_dir = smol_dir(args.cache)
    kept = training_pairs(params, AutoTokenizer.from_pretrained(str(model_dir)))
    batch = int(tr["global_batch_size"])
    n = min(args.pairs or args.steps * batch, len(kept))
    pairs = sample_down(kept, n - n % batch if n >= batch else n, 2025)  # whole batches: every step is `batch` pairs
    lens = sorted(sum(map(len, p["token_ids"].values())) for p in pairs)
    print(f"SmolLM2-135M (4-bit GGUF dequantized, fp32), {params['data']['raw_path']}: {len(pairs)} of the smol "
          f"profile's {len(kept)} training pairs, prompt+chosen+rejected {lens[0]}-{lens[-1]} tokens (median "
          f"{lens[len(lens) // 2]}); {args.steps} steps, batch {tr['global_batch_size']}, lr {tr['learning_rate']} "
          f"cosine, warmup {tr['warmup_steps']}, beta {tr['beta']}, sigmoid + {tr['sft_loss_ratio']} x chosen NLL, "
          f"float32, {threads} threads", flush=True)

    # a benchmark must never be the reason another job dies: when memory runs out, the kernel ends these runs first
    # (both trainers' children inherit it; a full run of either framework can take 10+ GB at max_seq_len 768)
    Path("/proc/self/oom_score_adj").write_text("1000")
    runs, logs = {}, Path(args.cache) / "training_logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        for r in range(args.repeats):
            for mode in args.modes:
                for side in ["project"] + (["TRL"] if args.peer_python else []):  # alternated, never at once
                    work = Path(tmp) / f"{side}-{mode}-{r + 1}"
                    work.mkdir()
                    print(f"run {r + 1}/{args.repeats}: {side}, {mode} ...", flush=True)
                    if side == "project":
                        got = project(model_dir, pairs, mode, tr, args.steps, work)
                    else:
                        got = peer(args.peer_python, model_dir, pairs, mode, tr, args.steps, threads, work)
                    shutil.copy(work / "train.log", logs / f"{work.name}.log")
                    shutil.rmtree(work)  # the trained weights (0.5 GB for a full run)
                    runs.setdefault((mode, side), []).append(got)

    rows, report = [], {}
    for mode in args.modes:
        figures = {side: summary(runs[(mode, side)], step_tokens(pairs, batch, args.steps, side))
                   for side in ("project", "TRL") if (mode, side) in runs}
        report[mode] = figures
        for side, f in figures.items():
            name = ("this project (PaddleFormers engine)" if side == "project" else "TRL DPOTrainer + torch")
            rows.append([mode, name, f"{f['step']:.2f}", f"{f['processed']:.0f}", f"{f['s_per_1k']:.2f}",
                         f"{f['s_per_1k_pair']:.2f}", " / ".join(f"{x:.1f}" for x in f["loop"]),
                         " / ".join(f"{x:.0f}" for x in f["wall"]), f"{f['peak']:.2f}", f"{f['first']:.4f}",
                         f"{f['last']:.4f}", f["steps"], f"{f['trainable']:,}"])
        if len(figures) == 2:
            p, t = figures["project"], figures["TRL"]
            ratios = {"s_per_step": p["step"] / t["step"], "processed": p["processed"] / t["processed"],
                      "s_per_1k": p["s_per_1k"] / t["s_per_1k"],
                      "s_per_1k_pair": p["s_per_1k_pair"] / t["s_per_1k_pair"],
                      "loop": statistics.median(p["loop"]) / statistics.median(t["loop"]),
                      "wall": statistics.median(p["wall"]) / statistics.median(t["wall"]),
                      "peak": p["peak"] / t["peak"]}
            report[mode]["ratio"] = {k: round(v, 3) for k, v in ratios.items()}
            rows.append([mode, "ratio project / TRL"] + [f"{ratios[k]:.2f}x" for k in
                                                         ("s_per_step", "processed", "s_per_1k", "s_per_1k_pair",
                                                          "loop", "wall", "peak")] + ["", "", "", ""])
    versions = f"paddlepaddle {version('paddlepaddle')}, paddleformers {version('paddleformers')}"
    peer_runs = [r for (_, side), rs in runs.items() if side == "TRL" for r in rs]
    if peer_runs:
        versions += ", " + ", ".join(f"{k} {v}" for k, v in peer_runs[0]["versions"].items())
    print(f"\nmachine: {cpu_name()} ({platform.machine()}), {threads} threads for both frameworks, "
          f"Python {platform.python_version()}; "
          f"{versions}")
    print(tabulate(rows, headers=["mode", "framework", "s/step (median, step 3+)", "tokens processed/step",
                                  "s/1k processed tokens", "s/1k pair tokens", "loop s", "wall s", "peak RSS GB",
                                  "loss step 1", "loss last", "steps", "trainable params"]))
    print(f"logs of each run: {logs}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": {"cpu": cpu_name(), "threads": threads, "python": platform.python_version()},
            "versions": versions, "pairs": len(pairs), "steps": args.steps, "repeats": args.repeats,
            "batch": batch, "reference_once": tr["reference_once"], "figures": report},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
