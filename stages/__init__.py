"""The pipeline's stages, one script each (dvc.yaml runs `python -m stages.<name>` from the repository root, so a
stage imports the ernie_dpo of the checkout it runs in: DVC runs queued experiments in copies of the repository)."""
from ernie_dpo import runtime

runtime.setup()  # every stage: quiet imports, plots without a display, MKL's fast path on AMD (before Paddle loads)
