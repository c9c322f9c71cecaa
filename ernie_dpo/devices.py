"""Which device a stage runs on, and whether it is there.

The GPUs an experiment runs on are chosen per process, never by a tracked parameter: `engine.gpus` says HOW MANY GPUs
per node it trains on (it sets how the global batch is split over data ranks, so it is part of the experiment), and
the process's CUDA_VISIBLE_DEVICES says WHICH (`CUDA_VISIBLE_DEVICES=3 dvc exp run ...`; `ernie-dpo series --gpus`
gives each queue worker its own). The same experiment on GPU 0 or on GPU 3 is therefore one cache entry. Inside a
process GPUs are counted from 0 among the visible ones, as Paddle counts them: gpu:0 is the first visible GPU.
"""
import os
import sys


class DeviceError(RuntimeError):
    pass


def visible_gpus(env=None):
    """The names of the GPUs this process may use, as Paddle's launcher reads them: CUDA_VISIBLE_DEVICES' entries
    ("2,3" -> ["2", "3"]: physical ids, or GPU UUIDs), or None when it is unset (then every GPU, named 0..n-1)."""
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def check_device(device, gpus=1):
    """Stop before any heavy work when engine.device is gpu and fewer than `gpus` usable GPUs are visible (named,
    with the way out)."""
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
    shown = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if found == 0:
        raise DeviceError(f"engine.device is 'gpu' but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES={shown}). "
                          f"{way_out}")
    if int(gpus) > found:
        raise DeviceError(f"engine.gpus is {gpus} but this process sees {found} GPU(s) (CUDA_VISIBLE_DEVICES="
                          f"{shown}): lower engine.gpus or make more GPUs visible")


def inference_device(device):
    """Where local inference and the LoRA merge run: the CPU, or the first GPU this process sees (gpu:0 is whatever
    CUDA_VISIBLE_DEVICES names first, so parallel experiments each use their own)."""
    return "cpu" if device == "cpu" else "gpu:0"


def require_device(params, stage, local=True):
    """A stage's first line: check_device for engine.* params, ending the stage with `<stage>: <reason>` on failure.
    local=False (inference through a server) needs no device here."""
    if not local:
        return
    try:
        check_device(params["engine"]["device"], params["engine"]["gpus"])
    except DeviceError as e:
        sys.exit(f"{stage}: {e}")


def use_all_cpu_cores():
    """Paddle's CPU kernels use ONE thread unless told otherwise (FLAGS_paddle_num_threads defaults to 1): use every
    core this process may run on. Returns the thread count (recorded in the inference metadata)."""
    import paddle

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    paddle.base.core.set_num_threads(n)
    return n


def gpu_capability(gpus=1):
    """The lowest (major, minor) compute capability among the first `gpus` visible GPUs (the ones trained on): one
    pre-Ampere card among them decides the settings of all. None without a GPU."""
    import paddle

    if not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        return None
    found = paddle.device.cuda.device_count()
    return min(tuple(paddle.device.cuda.get_device_capability(i)) for i in range(min(int(gpus), found)))
