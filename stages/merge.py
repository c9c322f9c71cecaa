"""merge: a plain model directory for inference. LoRA: adapter folded into the base weights. Full fine-tuning: the
trained model itself, hard-linked file by file (no gigabytes copied; DVC stores identical files once in its cache)."""
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ernie_dpo import engine  # noqa: E402
from ernie_dpo.common import get_logger, load_params  # noqa: E402

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
    params = load_params()
    fine_tuning, device = params["train"]["fine_tuning"], params["engine"]["device"]
    engine.require_device(params, "merge")
    shutil.rmtree(OUT, ignore_errors=True)
    if fine_tuning == "lora":
        log.info("merging the LoRA adapter in models/train into models/base")
        engine.merge_lora("models/base", "models/train", OUT, device)
    else:
        log.info("full fine-tuning: linking models/train to %s", OUT)
        link_tree("models/train", OUT)
    log.info("merged model ready in %s", OUT)


if __name__ == "__main__":
    main()
