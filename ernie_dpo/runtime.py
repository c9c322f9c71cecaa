"""The process settings every entry point applies once, at its start (stages/__init__.py, `ernie-dpo`, the engine
process, the benchmarks, the tests): importing ernie_dpo itself changes nothing in the environment."""
import os
import warnings


def _amd_cpu_with_avx2():
    """An AMD CPU whose flags include avx2: MKL's AVX2 kernels run there (MKL_DEBUG_CPU_TYPE=5 on a CPU without
    AVX2 would stop the process with an illegal instruction)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    amd = any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in lines)
    return amd and any(line.startswith("flags") and " avx2" in line for line in lines)


def _keep_freed_memory():
    """glibc's malloc returns each block above its mmap threshold (128 KB, rising to 32 MB at most) to the kernel
    when it is freed and maps fresh zeroed pages for the next one, so a process that frees and reallocates the same
    large tensors at every step (training, a forward pass per decode step) pays a page fault per 4 KB, again and
    again. Here freed memory stays in the process for the next tensor: no mmap per block (M_MMAP_MAX 0) and no
    returning the heap's free top (M_TRIM_THRESHOLD). The arithmetic is untouched (the same losses and replies, bit
    for bit); measured on the smol profile, 2 cores: its reference pass and first 8 training steps 200 -> 165 s,
    16.6 -> 2.2 million page faults, peak memory +6%; docs/benchmarks.md. Linux with glibc only; a MALLOC_* setting
    of the user's own wins."""
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to set
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def setup():
    """Quiet import noise, plot without a display, give MKL its fast path on AMD CPUs, keep freed memory.

    - Noise that says nothing about the run: Paddle's "No ccache found" (it compiles nothing here), setuptools'
      distutils notice, transformers' "PyTorch was not found" advice (PaddleFormers uses it for tokenizers only).
    - Plots are written to files (metrics/plots/): matplotlib's Agg backend, no display needed.
    - PaddlePaddle's CPU wheel does its matrix products with the MKL it bundles, which takes slow generic kernels on
      AMD CPUs unless told otherwise (on 2-core AMD EPYC machines, 60 matrices 576x1536: 512 rows 834 ms -> 318 ms).
      It must be set before Paddle loads MKL; the engine's processes inherit it. Values the user set win.
    - Freed memory is kept for the next tensor instead of being unmapped and faulted in again (_keep_freed_memory).
    """
    warnings.filterwarnings("ignore", message="No ccache found")
    warnings.filterwarnings("ignore", message="Setuptools is replacing distutils")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    if _amd_cpu_with_avx2():
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    _keep_freed_memory()
