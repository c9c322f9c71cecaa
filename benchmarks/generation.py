"""Generation speed and memory, this project vs Hugging Face transformers on the same weights (figures, not tests).

    python benchmarks/generation.py                          # tiny demo model (models/base) + SmolLM2-135M
    python benchmarks/generation.py --peer-python /path/to/peer-venv/bin/python    # + transformers, same run
    python benchmarks/generation.py --models smol --quick    # fewer prompts
    python benchmarks/generation.py --models smol --modes sampling --generate-prompts 0 --no-memory --peer-python ...
    python benchmarks/generation.py --models smol --modes sampling --llamacpp-python llama/bin/python   # + llama.cpp

The peer venv: python3 -m venv peer && peer/bin/pip install -r benchmarks/requirements-peer.txt (torch CPU +
transformers; never part of the main install). Both frameworks get the same token ids (the model's own chat
template, encoded once here), the same weights directory, the same sampling (top_p 0.7, temperature 0.7, no top_k),
the same stop token and max_new_tokens, and the same number of CPU threads.

Prompts (--prompts-from): "real" (default): the first N test prompts of the smol profile's real data
(data/real/dpo_en_demo.json, the testset stage's seeded sample: real questions, multi-turn conversations, prompts of
up to ~3000 tokens); "sample": N chat prompts of mixed length built deterministically from the synthetic sample.
Rows: replies/s and new tokens/s at each batch size (--batches, default 1 8 16), in two modes: "sampling" (replies
end at the stop token) and "forced" (every reply runs to max_new_tokens; same work for both frameworks whatever they
sample); then the ratio of each side's BEST new tokens/s.
Memory: peak RSS of local inference on 25 and 100 prompts (tiny model), each in a fresh process.
"""
import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def real_prompts(n):
    """The first n prompts of the smol profile's test set (real data, system prompts dropped, seed 2025)."""
    from ernie_dpo.data import load_sharegpt, make_testset, prepare_records

    records, _, _ = prepare_records(load_sharegpt(ROOT / "data/real/dpo_en_demo.json"))
    return make_testset(records, max(n, 60), 2025, keep_system=False)[:n]


def bench_prompts(n, seed=0):
    """n chat prompts ({"id", "messages"}) of mixed length, deterministic, from the bundled sample."""
    from ernie_dpo.data import load_sharegpt, prepare_records, to_messages

    records, _, _ = prepare_records(load_sharegpt(ROOT / "data/sample/sharegpt_dpo_sample.json"))
    rng = random.Random(seed)
    single = [r for r in records if not r["tgt"]]
    multi = [r for r in records if r["tgt"]]
    notes = [r["response"][1][0] for r in records]
    out = []
    for k in range(n):
        kind = k % 4
        if kind == 0:
            messages = to_messages(rng.choice(single), keep_system=False)
        elif kind == 1:
            messages = to_messages(rng.choice(multi), keep_system=False)
        else:  # long: notes of ~1500 (kind 2) or ~4000 (kind 3) characters to summarize
            budget, text = (1500 if kind == 2 else 4000), []
            while sum(map(len, text)) < budget:
                text.append(rng.choice(notes))
            messages = [{"role": "user", "content": "Here are my notes:\n\n" + "\n\n".join(text) +
                         "\n\nSummarize them in two sentences."}]
        out.append({"id": f"bench-{k}", "messages": messages})
    return out


def smol_dir(cache):
    """SmolLM2-135M converted once into a cache folder (the base_model stage's conversion)."""
    from ernie_dpo import gguf_model, weights

    d = Path(cache) / "smollm2-135m"
    if not (d / "config.json").exists():
        gguf_model.convert("smollm2-135m", d)
        weights.prepare_model_dir(d, "cpu")
    return d


def ours(model_dir, prompts, batch, max_new, forced, repeat=1):
    from ernie_dpo.generate import LocalModel

    lm = LocalModel(model_dir, "cpu")
    if forced:
        lm.stops = {}  # never stop: every reply runs to max_new
    lm.answer(prompts[:2], 0.7, 0.7, 4, batch, 0)  # warm-up
    best = None
    for _ in range(repeat):
        start = time.time()
        recs = lm.answer(prompts, 0.7, 0.7, max_new, batch, 2025)
        secs = time.time() - start
        tokens = sum(r["tokens"] for r in recs.values())
        if best is None or secs < best[0]:
            best = (secs, tokens)
    return {"seconds": best[0], "tokens": best[1], "replies": len(prompts), "threads": lm.threads}


def paddleformers_generate(model_dir, prompts, batch, max_new):
    """The previous code path (and what a PaddleFormers user writes): model.generate over left-padded batches,
    sampling with top_p / temperature, forced to max_new tokens. Same weights, prompts, threads."""
    import paddle

    from ernie_dpo.generate import LocalModel
    from ernie_dpo.tokens import prompt_ids

    lm = LocalModel(model_dir, "cpu")
    model = lm.model
    model.config._attn_implementation = "eager"  # PaddleFormers' own attention, not ernie_dpo.decode's
    for layer in model.sublayers():
        if hasattr(layer, "attn_implementation"):
            layer.attn_implementation = "eager"
    ids = [prompt_ids(lm.tokenizer, p["messages"]) for p in prompts]
    start, tokens = time.time(), 0
    for k in range(0, len(ids), batch):
        chunk = ids[k:k + batch]
        t = max(map(len, chunk))
        x = paddle.to_tensor([[lm.pad_id] * (t - len(i)) + i for i in chunk])
        m = paddle.to_tensor([[0] * (t - len(i)) + [1] * len(i) for i in chunk])
        with paddle.no_grad():
            out = model.generate(input_ids=x, attention_mask=m, max_new_tokens=max_new, min_new_tokens=max_new,
                                 decode_strategy="sampling", top_p=0.7, temperature=0.7, top_k=0,
                                 pad_token_id=lm.pad_id, use_cache=True)
        tokens += int(out[0].shape[0] * out[0].shape[1])
    return {"seconds": time.time() - start, "tokens": tokens, "replies": len(prompts)}


def encoded(model_dir, prompts):
    from ernie_dpo.generate import LocalModel
    from ernie_dpo.tokens import prompt_ids

    lm = LocalModel(model_dir, "cpu")
    return [prompt_ids(lm.tokenizer, p["messages"]) for p in prompts], sorted(lm.stops), lm.max_len


def peer(python, model_dir, prompt_ids, stops, batch, max_new, forced, threads):
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"model": str(model_dir), "prompts": prompt_ids, "stops": stops, "batch": batch,
                                    "max_new": max_new, "forced": forced, "threads": threads}))
        r = subprocess.run([python, str(ROOT / "benchmarks/peer_transformers.py"), str(spec)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"peer benchmark failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def llamacpp(python, prompt_ids, parallel, max_new, forced, threads):
    """llama.cpp on SmolLM2's own GGUF file (benchmarks/peer_llamacpp.py, in a venv with xllamacpp)."""
    from ernie_dpo import gguf_model

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"gguf": str(gguf_model.locate("smollm2-135m")), "prompts": prompt_ids,
                                    "parallel": parallel, "max_new": max_new, "forced": forced, "threads": threads,
                                    "seed": 2025}))
        r = subprocess.run([python, str(ROOT / "benchmarks/peer_llamacpp.py"), str(spec)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama.cpp benchmark failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def peak_rss(model_dir, n_prompts, max_new):
    """Peak RSS (GB) of a fresh process answering n_prompts (local inference, batch 8)."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.json"
        prompts.write_text(json.dumps(bench_prompts(n_prompts)))
        code = ("import json; from ernie_dpo.generate import LocalModel; "
                f"lm = LocalModel({str(model_dir)!r}, 'cpu'); "
                f"lm.answer(json.load(open({str(prompts)!r})), 0.7, 0.7, {max_new}, 8, 2025); "
                "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child of a 4 GB benchmark process
        # would report the parent's 4 GB; VmHWM is this process's own high-water mark
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(r.stdout.strip().splitlines()[-1]) / 1024 / 1024


def main():
    from ernie_dpo import runtime

    runtime.setup()  # as the stages: MKL's fast path on AMD CPUs, quiet imports
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "smol"], choices=["tiny", "smol"])
    ap.add_argument("--peer-python", help="interpreter of a venv with benchmarks/requirements-peer.txt")
    ap.add_argument("--llamacpp-python", help="interpreter of a venv with xllamacpp: + llama.cpp on SmolLM2's own "
                                              "GGUF file (benchmarks/peer_llamacpp.py), parallel slots = batch")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompts-from", choices=["real", "sample"], default="real")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["sampling", "forced"], choices=["sampling", "forced"])
    ap.add_argument("--quick", action="store_true", help="8 prompts, 64 new tokens, no memory check")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-RSS check")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS check")
    ap.add_argument("--generate-prompts", type=int, default=8,
                    help="prompts for the PaddleFormers model.generate row (forced, 64 new tokens; it is slow); 0: skip")
    ap.add_argument("--cache", default=str(ROOT / ".bench_cache"), help="where the converted SmolLM2 is kept")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_new = 8, 64
    from tabulate import tabulate

    prompts = real_prompts(args.prompts) if args.prompts_from == "real" else bench_prompts(args.prompts)
    dirs = {}
    if "tiny" in args.models:
        if not (ROOT / "models/base/config.json").exists():
            sys.exit("the tiny model is models/base of the demo: run `dvc repro base_model` (or `dvc pull`) first")
        dirs["tiny"] = ROOT / "models/base"
    if "smol" in args.models:
        dirs["smol"] = smol_dir(args.cache)
    rows, fitting = [], {}  # fitting: the prompts each model's context holds
    for name, d in ({} if args.memory_only else dirs).items():
        ids, stops, max_len = encoded(d, prompts)
        fit = [k for k, x in enumerate(ids) if not max_len or len(x) < max_len]
        if len(fit) < len(ids):  # the tiny model's tokenizer makes a long real prompt longer than its context
            print(f"{name}: {len(ids) - len(fit)} of {len(ids)} prompts are longer than its context of {max_len} "
                  "tokens and are left out for this model", flush=True)
        model_prompts, ids = [prompts[k] for k in fit], [ids[k] for k in fit]
        fitting[name] = model_prompts
        lens = sorted(len(i) for i in ids)
        label = {"tiny": "tiny ERNIE-4.5 demo model (0.5 M)", "smol": "SmolLM2-135M (4-bit GGUF dequantized, fp32)"}[name]
        print(f"{label}: {len(model_prompts)} prompts of {lens[0]}-{lens[-1]} tokens (median {lens[len(lens) // 2]}), "
              f"max_new_tokens {args.max_new}", flush=True)
        for mode in args.modes:
            forced = mode == "forced"
            figures = {}
            for batch in args.batches:
                o = ours(d, model_prompts, batch, args.max_new, forced)
                figures[("ours", batch)] = o
                if args.peer_python:
                    figures[("transformers", batch)] = peer(args.peer_python, d, ids, stops, batch, args.max_new,
                                                            forced, o["threads"])
                if args.llamacpp_python and name == "smol":
                    figures[("llama.cpp", batch)] = llamacpp(args.llamacpp_python, ids, batch, args.max_new, forced,
                                                             o["threads"])
                for fw in ("ours", "transformers", "llama.cpp"):  # as measured, so a long run shows its progress
                    if (fw, batch) in figures:
                        f = figures[(fw, batch)]
                        print(f"  {name} {fw} {mode} batch {batch}: {f['tokens']} new tokens in {f['seconds']:.1f} s "
                              f"= {f['tokens'] / f['seconds']:.1f} new tokens/s", flush=True)
            best = {}
            for fw in ("ours", "transformers", "llama.cpp"):
                if (fw, args.batches[0]) not in figures:
                    continue
                tps = {b: figures[(fw, b)]["tokens"] / figures[(fw, b)]["seconds"] for b in args.batches}
                best[fw] = max(tps.values())
                fw_name = {"ours": "this project (PaddleFormers model, ernie_dpo.decode)",
                           "transformers": "transformers + torch (generate, left-padded batches)",
                           "llama.cpp": "llama.cpp (xllamacpp) on its 4-bit GGUF, parallel slots = batch"}[fw]
                for b in args.batches:
                    f = figures[(fw, b)]
                    rows.append([name, fw_name, mode, b, f"{f['replies'] / f['seconds']:.3f}", f"{tps[b]:.1f}",
                                 f"{f['seconds']:.0f}", f["tokens"]])
            for peer_name in ("transformers", "llama.cpp"):
                if peer_name in best:
                    rows.append([name, f"ratio of best new tokens/s, ours / {peer_name}", mode, "", "", "", "",
                                 f"{best['ours'] / best[peer_name]:.2f}x"])
    if args.generate_prompts and not args.memory_only:
        for name, d in dirs.items():
            sub = fitting[name][:args.generate_prompts]
            f = {b: paddleformers_generate(d, sub, b, 64) for b in (1, 8)}
            ours_f = {b: ours(d, sub, b, 64, True) for b in (1, 8)}
            for fw, fig in (("PaddleFormers model.generate (the code before)", f), ("this project, same subset", ours_f)):
                for b in (1, 8):
                    rows.append([name, fw, f"forced, {len(sub)} prompts x 64", b,
                                 f"{fig[b]['replies'] / fig[b]['seconds']:.3f}",
                                 f"{fig[b]['tokens'] / fig[b]['seconds']:.1f}", f"{fig[b]['seconds']:.0f}",
                                 fig[b]["tokens"]])
    threads = len(os.sched_getaffinity(0))
    print(f"\nmachine: {platform.machine()}, {threads} cores (both frameworks use {threads} threads), "
          f"Python {platform.python_version()}")
    print(tabulate(rows, headers=["model", "framework", "mode", "batch", "replies/s", "new tokens/s", "seconds",
                                  "new tokens"]))
    if not (args.quick or args.no_memory):
        # tiny: 25 vs 100 prompts x 64 new tokens; smol: 25 vs 100 prompts x 8 new tokens (prefill of every prompt,
        # the memory-hungry part, at a CPU cost that fits a benchmark run)
        mem = [[name, n, new, f"{peak_rss(d, n, new):.2f} GB"] for name, d in dirs.items()
               for new in [64 if name == "tiny" else 8] for n in (25, 100)]
        print("\npeak RSS of local inference (batch 8, mixed-length prompts, fresh process):")
        print(tabulate(mem, headers=["model", "prompts", "new tokens", "peak RSS"]))
    print(f"\nthis process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024:.2f} GB")


if __name__ == "__main__":
    main()
