"""merge: a plain model directory for inference. LoRA: adapter folded into the base weights. Full fine-tuning: the
trained model itself, hard-linked file by file (no gigabytes copied; DVC stores identical files once in its cache)."""
import os
import shutil
from pathlib import Path

from ernie_dpo import devices, engine, weights
from ernie_dpo.common import get_logger, load_params, stage_parser

log = get_logger("merge")
OUT = Path("models/merged")


def link_tree(src, dst):
    for f in Path(src).rglob("*"):
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:  # another filesystem: fall back to a copy
                shutil.copy2(f, target)


def main():
    stage_parser(__file__, __doc__).parse_args()
    params = load_params()
    fine_tuning, device = params["train"]["fine_tuning"], params["engine"]["device"]
    devices.require_device(params, "merge")
    shutil.rmtree(OUT, ignore_errors=True)
    if fine_tuning == "lora":
        dtype = engine.inference_dtype(device)  # what inference and servers load: bfloat16 on Ampere GPUs
        log.info("merging the LoRA adapter in models/train into models/base (summed in float32, saved in %s)", dtype)
        weights.merge_lora("models/base", "models/train", OUT, device, save_dtype=dtype)
    else:
        log.info("full fine-tuning: linking models/train to %s (tokenizer files from models/base)", OUT)
        link_tree("models/train", OUT)
        weights.copy_tokenizer_files("models/base", OUT)  # as the hub wrote them, not as the engine re-saved them
    log.info("merged model ready in %s", OUT)


if __name__ == "__main__":
    main()
