"""Where a decode step's time goes (cProfile over ernie_dpo.decode on SmolLM2-135M): figures, not a test.

    python benchmarks/profile_decode.py [--batch 8] [--prompts 8] [--max-new 64]

Prints the top functions by own time and a split: model forward (Paddle kernels) vs this project's code (sampling,
cache bookkeeping, batch rebuilds) vs tensor conversions.
"""
import argparse
import cProfile
import pstats
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    from ernie_dpo import runtime

    runtime.setup()  # as the stages: MKL's fast path on AMD CPUs, quiet imports
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--cache", default=str(ROOT / ".bench_cache"))
    args = ap.parse_args()
    from generation import (  # benchmarks/ is this script's own directory
        bench_prompts,
        smol_dir,
    )

    from ernie_dpo.generate import LocalModel

    lm = LocalModel(smol_dir(args.cache), "cpu")
    lm.stops = {}  # forced length: every reply runs to max_new, the same work every run
    prompts = bench_prompts(args.prompts)
    lm.answer(prompts[:1], 0.7, 0.7, 4, 1, 0)  # warm-up
    prof = cProfile.Profile()
    start = time.time()
    prof.enable()
    lm.answer(prompts, 0.7, 0.7, args.max_new, args.batch, 2025)
    prof.disable()
    secs = time.time() - start
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())
    groups = {"model forward (Paddle)": 0.0, "sampling (numpy)": 0.0, "KV cache + batch rebuilds": 0.0,
              "tensor <-> numpy": 0.0, "other": 0.0}
    for (file, _, name), (_, _, own, _, _) in stats.stats.items():
        if "decode.py" in file and name in ("sample_token",):
            groups["sampling (numpy)"] += own
        elif "decode.py" in file and name in ("combine", "select", "update", "prefill", "_round_up"):
            groups["KV cache + batch rebuilds"] += own
        elif name in ("to_tensor", "numpy", "astype") or "tensor_patch" in file:
            groups["tensor <-> numpy"] += own
        elif "paddle" in file or file == "~":
            groups["model forward (Paddle)"] += own
        else:
            groups["other"] += own
    n_tokens = args.prompts * args.max_new
    print(f"SmolLM2-135M, {args.prompts} prompts x {args.max_new} forced new tokens, batch {args.batch}: {secs:.1f} s "
          f"({n_tokens / secs:.1f} new tokens/s; profiler overhead included)")
    for k, v in groups.items():
        print(f"  {k:28s} {v:7.2f} s  {100 * v / total:5.1f}%")
    print("\ntop 15 functions by own time:")
    stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
