"""Speed and memory figures, printed as a table (not tests: nothing here passes or fails).

    python benchmarks/bench.py            # run after `dvc repro` (uses models/base and the test set)
    python benchmarks/bench.py --quick    # skip the `dvc exp run` measurement (≈1 min less)

(a) reply throughput: batched vs one-prompt-at-a-time generation, same prompts, same settings, same process
(b) prepare: throughput and peak memory on generated ShareGPT files of 5,000 and 20,000 records
(c) a no-op `dvc repro` (everything up to date)
(d) which stages `dvc exp run --temp -S train.warmup_steps=360` reruns, and how long it takes
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]


def generation(n_prompts=32, max_dec_len=64, batch_size=8):
    from ernie_dpo.common import read_jsonl
    from ernie_dpo.generate import LocalModel

    tests = read_jsonl(ROOT / "data/testset/testset.jsonl")[:n_prompts]
    lm = LocalModel(ROOT / "models/base", "cpu")
    rows, throughput = [], {}
    for bs in (1, batch_size):
        start = time.time()
        tokens = sum(r["tokens"] for r in lm.answer(tests, 0.7, 0.7, max_dec_len, bs, 2025).values())
        secs = time.time() - start
        throughput[bs] = len(tests) / secs
        rows.append([f"(a) generation, batch {bs}", f"{throughput[bs]:.2f} replies/s",
                     f"{len(tests)} test prompts, max_dec_len {max_dec_len}: {secs:.1f} s, {tokens / secs:.0f} new tokens/s"])
    rows.append(["(a) batched / one-at-a-time", f"{throughput[batch_size] / throughput[1]:.1f}x",
                 "reply throughput ratio (tiny model; benchmarks/generation.py has real-length prompts and SmolLM2)"])
    return rows


def make_big_file(path, n):
    base = json.loads((ROOT / "data/sample/sharegpt_dpo_sample.json").read_text())
    records = []
    for i in range(n):
        r = json.loads(json.dumps(base[i % len(base)]))
        r["conversations"][-1]["value"] += f" (variant {i})"  # distinct records: nothing dropped as duplicate
        records.append(r)
    path.write_text(json.dumps(records, ensure_ascii=False))


def prepare(sizes=(5000, 20000)):
    rows = []
    # tracemalloc: peak of Python allocations during prepare alone (ru_maxrss of a child would include the
    # interpreter and, after fork, can report the parent's size)
    code = ("import time, tracemalloc; "
            "from ernie_dpo.data import load_sharegpt, prepare_records; t = time.time(); "
            "kept, rej, c = prepare_records(load_sharegpt({path!r})); s = time.time() - t; del kept, rej; "
            "tracemalloc.start(); prepare_records(load_sharegpt({path!r})); "  # second pass: memory (slower)
            "print(c['read'], c['kept'], s, tracemalloc.get_traced_memory()[1] // 1024)")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"raw{n}.json"
            make_big_file(path, n)
            out = subprocess.run([sys.executable, "-c", code.format(path=str(path))],
                                 capture_output=True, text=True, check=True).stdout.split()
            read, kept, secs, peak_kb = int(out[0]), int(out[1]), float(out[2]), int(out[3])
            rows.append([f"(b) prepare, {n:,} records", f"{read / secs:,.0f} records/s",
                         f"{secs:.2f} s (target < 10 s), peak Python memory {peak_kb / 1024:.0f} MB, "
                         f"file {path.stat().st_size / 1e6:.1f} MB, kept {kept:,}"])
    return rows


def dvc(*args):
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ROOT, capture_output=True, text=True)
    return r, time.time() - start


def noop_repro():
    r, secs = dvc("repro")
    ran = re.findall(r"Running stage '([^']+)'", r.stdout)
    note = "nothing reran" if not ran else f"reran {ran}: run `dvc repro` first for a true no-op"
    return [["(c) no-op `dvc repro`", f"{secs:.1f} s", note]]


def warmup_exp():
    r, secs = dvc("exp", "run", "--temp", "-S", "train.warmup_steps=360")
    ran = re.findall(r"Running stage '([^']+)'", r.stdout)
    return [["(d) `dvc exp run --temp -S train.warmup_steps=360`", f"{secs:.0f} s", f"reran: {', '.join(ran)}"]]


def main():
    from ernie_dpo import runtime

    runtime.setup()  # as the stages: MKL's fast path on AMD CPUs, quiet imports
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip (d)")
    args = ap.parse_args()
    if not (ROOT / "models/base/config.json").exists():
        sys.exit("run `dvc repro` (or `dvc pull`) first: the benchmark uses models/base and the test set")
    rows = prepare() + generation() + noop_repro() + ([] if args.quick else warmup_exp())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, tiny demo model")
    print(tabulate(rows, headers=["measurement", "figure", "what it measures"]))


if __name__ == "__main__":
    main()
