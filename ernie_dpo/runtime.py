"""The process settings every entry point applies once, at its start (stages/__init__.py, `ernie-dpo`, the engine
process, the benchmarks, the tests): importing ernie_dpo itself changes nothing in the environment."""
import os
import warnings


def _amd_cpu():
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False


def setup():
    """Quiet the engine's import noise, plot without a display, and give MKL its fast path on AMD CPUs.

    - Noise that says nothing about the run: Paddle's "No ccache found" (it compiles nothing here), setuptools'
      distutils notice, transformers' "PyTorch was not found" advice (PaddleFormers uses it for tokenizers only).
    - Plots are written to files (metrics/plots/): matplotlib's Agg backend, no display needed.
    - PaddlePaddle's CPU wheel does its matrix products with the MKL it bundles, which takes slow generic kernels on
      AMD CPUs unless told otherwise (on 2-core AMD EPYC machines, 60 matrices 576x1536: 512 rows 834 ms -> 318 ms).
      It must be set before Paddle loads MKL; the engine's processes inherit it. Values the user set win.
    """
    warnings.filterwarnings("ignore", message="No ccache found")
    warnings.filterwarnings("ignore", message="Setuptools is replacing distutils")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    if _amd_cpu():
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
