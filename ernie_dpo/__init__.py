"""ERNIE DPO recipe as a DVC pipeline: the pure logic the stages and tests share."""
import os
import warnings

# Noise the engine's imports print in every stage, which says nothing about the run: Paddle's "No ccache found"
# (it compiles nothing here), setuptools' distutils notice, and transformers' "PyTorch was not found" advice
# (PaddleFormers uses transformers for tokenizers only).
warnings.filterwarnings("ignore", message="No ccache found")
warnings.filterwarnings("ignore", message="Setuptools is replacing distutils")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _amd_cpu():
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False


# PaddlePaddle's CPU wheel does its matrix products with the MKL it bundles (libmklml_intel), which takes slow generic
# kernels on AMD CPUs unless told otherwise. Measured on this project's 2-core AMD EPYC machines (60 matrices
# 576x1536): 8 rows 34 ms -> 12 ms, 512 rows 834 ms -> 318 ms, for inference and training alike. It must be set
# before Paddle loads MKL, hence here; the engine's training processes inherit it. A value the user set wins.
if _amd_cpu():
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
