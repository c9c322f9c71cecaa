"""Model files: made loadable on a device, checked for the layout the engine reads, LoRA merged, checkpoints
checked for completeness."""
import json
import shutil
from pathlib import Path


def prepare_model_dir(model_dir, device):
    """Make a model directory (built, converted, copied or downloaded) loadable on `device`; returns what changed.

    PaddleFormers' RMSNorm uses the fused kernel unless the model's config says `fuse_rms_norm: false`, and that
    kernel has no CPU implementation ("The kernel 'fused_rms_norm_ext' is not registered"): on a CPU every model
    needs the flag, not only the tiny one.
    """
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    changed = {}
    if device == "cpu" and config.get("fuse_rms_norm", True):
        config["fuse_rms_norm"] = False
        changed["fuse_rms_norm"] = False
    if changed:
        path.write_text(json.dumps(config, indent=2) + "\n")
    return changed


class LayoutError(ValueError):
    pass


def weight_names(model_dir):
    """The tensor names of a model directory's safetensors files (read from their headers, nothing loaded)."""
    names = []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        names += [k for k in header if k != "__metadata__"]
    return names


def check_layout(model_dir, source=""):
    """Refuse a checkpoint in PaddlePaddle's own ERNIE layout (`baidu/ERNIE-4.5-*-Paddle`: `ernie.` names, fused
    qkv_proj / up_gate_proj, [in, out] weights). PaddleFormers 1.2 only loads the Hugging Face layout of the `-PT`
    repositories (transformers/ernie4_5/modeling.py maps `model.layers.*.q_proj.weight`; its own hub map names
    `-PT`); the `-Paddle` layout fails later with "model.embed_tokens.weight should be assigned before!"."""
    names = weight_names(model_dir)
    paddle_layout = [n for n in names if n.startswith("ernie.") or ".qkv_proj." in n or ".up_gate_proj." in n]
    if paddle_layout:
        pt = source[:-len("-Paddle")] + "-PT" if source.endswith("-Paddle") else "the matching baidu/ERNIE-4.5-*-PT"
        raise LayoutError(f"{source or model_dir} is a checkpoint in PaddlePaddle's own layout (e.g. "
                          f"{paddle_layout[0]!r}), which PaddleFormers 1.2 cannot load; use {pt} (the Hugging Face "
                          f"layout), e.g. -S model.name_or_path={pt if pt.startswith('baidu') else 'baidu/ERNIE-4.5-0.3B-PT'}")


def float32_copy(model_dir, dst):
    """dst with model_dir's files, every safetensors tensor in float32 (metadata kept). Returns dst."""
    from safetensors import safe_open
    from safetensors.paddle import load_file, save_file

    dst = Path(dst)
    for f in Path(model_dir).iterdir():
        if f.suffix == ".safetensors":
            with safe_open(str(f), "np") as st:  # the header only (numpy cannot hold bf16 tensors)
                meta = st.metadata()
            tensors = {k: v.astype("float32") for k, v in load_file(str(f)).items()}
            save_file(tensors, str(dst / f.name), metadata=meta)
        elif f.is_file() and f.name != "flex-ckpt.auto_generated.metadata":
            shutil.copy2(f, dst / f.name)
    return dst


def merge_lora(base_dir, adapter_dir, out_dir, device, save_dtype="float32"):
    """Fold a LoRA adapter into the base weights and save a plain model in `save_dtype` (+ the base's tokenizer
    files, copied as they are) to out_dir.

    Why not `paddleformers-cli export`: in PaddleFormers 1.2.0 its LoRA merge computes W + A@B correctly in Paddle's
    [in, out] layout, but the transpose back to the Hugging Face layout it saves is written as a reshape (the numpy
    view's strides are lost), so every linear weight of the exported model is scrambled and the model emits
    gibberish. Here the engine's own LoRAModel applies the adapter (LoRAModel.from_pretrained), merges it in place
    (merge()), and the plain model is saved by save_pretrained, the writer the training stage uses.
    tests/test_model.py checks merged logits == adapter logits, also for a bf16 adapter (what a GPU run saves).

    The sum W + A@B is formed in float32 whatever the adapter's dtype: LoRALinear.merge adds in the layer's dtype,
    and in bf16 a delta below half a bf16 step of the weight would vanish. It is then saved in `save_dtype`, the
    dtype inference and servers load (engine.inference_dtype: bfloat16 on Ampere GPUs, float32 on a CPU), and the
    config says so, so a server's `dtype: auto` reads what it is given instead of casting a float32 model.
    Tokenizer files are copied, not re-saved: transformers 5 (PaddleFormers' pin) re-saves `extra_special_tokens`
    as a list, which the transformers 4 of vLLM / FastDeploy servers cannot read.
    """
    import tempfile

    import paddle
    from paddleformers.peft import LoRAModel
    from paddleformers.transformers import AutoModelForCausalLM

    from .devices import inference_device

    paddle.set_device(inference_device(device))  # the first GPU this process sees: the experiment's own
    with tempfile.TemporaryDirectory() as tmp:
        # a float32 copy of the adapter: PaddleFormers 1.2 refuses to load bf16 factors (what an O2 GPU run saves)
        # into the float32 model ("Direct assignment of Tensors with different types is prohibited in AOA"), and
        # loading writes a metadata file into the folder it reads, which must not be models/train (a DVC output)
        lora = LoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="float32"),
                                         str(float32_copy(adapter_dir, tmp)))
        lora.merge()
    merged = {k: v.astype(save_dtype) for k, v in lora.model.state_dict().items() if ".lora_" not in k}
    del lora
    plain = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=save_dtype)
    missing, unexpected = plain.set_state_dict(merged)
    if missing or unexpected:
        raise RuntimeError(f"LoRA merge: weights missing {missing} / unexpected {unexpected}")
    plain.save_pretrained(str(out_dir))
    copy_tokenizer_files(base_dir, out_dir)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def copy_tokenizer_files(src, dst):
    """The tokenizer (and generation config) files of a model directory, byte for byte."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            (Path(dst) / name).unlink(missing_ok=True)  # maybe a hard link into another model directory
            shutil.copy2(Path(src) / name, Path(dst) / name)


def checkpoint_is_complete(folder):
    """Can the engine resume from this checkpoint-N folder?

    PaddleFormers 1.2 (one process) writes a checkpoint as: weights, trainer state, RNG state, optimizer, and the LR
    scheduler last. A run killed in between leaves a folder the engine still picks as the newest checkpoint and then
    fails on, every time ("Can't find a optimizer index"; seen when training was killed just after trainer_state.bin
    appeared). Complete = the scheduler state is there and every *.index.json parses and names shards that exist.
    """
    folder = Path(folder)
    if not (folder / "scheduler.pdparams").is_file() or not (folder / "trainer_state.bin").is_file():
        return False
    indexes = list(folder.glob("*.index.json"))
    if not any(i.name.startswith("optimizer") for i in indexes):
        return False
    for index in indexes:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError):
            return False
        if not all((folder / shard).is_file() for shard in shards):
            return False
    return True
