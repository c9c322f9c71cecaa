"""A tiny ERNIE-4.5-architecture model built offline: the demo profile's stand-in for ERNIE-4.5-0.3B.

Same model class (Ernie4_5ForCausalLM), same tokenizer class (Ernie4_5Tokenizer over SentencePiece), same chat
template layout as the real model, so every later stage runs the code path it would run on the real one.
Only the sizes differ (hidden 128, 2 layers instead of 1024 / 18), and the weights start random: the base_model stage
then gives it a short supervised warm-up so that it answers and stops.
"""
import io
import json
from pathlib import Path

# ERNIE 4.5's chat layout: <|begin_of_sentence|>, "User: ...\n", "Assistant: ...<|end_of_sentence|>".
# Only the tiny model uses this copy; the real model's template is read from its own tokenizer_config.json.
CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}"
    "{{- '<|begin_of_sentence|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' + message['content'] + '<|end_of_sentence|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)
SPECIAL = ["<|begin_of_sentence|>", "<|end_of_sentence|>"]


def corpus_texts(records):
    """Every text of the prepared data, as the tokenizer should see it (with the chat template's words)."""
    for r in records:
        if r.get("system"):
            yield r["system"]
        for t in r["src"]:
            yield "User: " + t
        for t in r["tgt"]:
            yield "Assistant: " + t
        for resp in r["response"]:
            yield "Assistant: " + resp[0]


def train_tokenizer(texts, out_dir, vocab_size):
    """A SentencePiece BPE model in the layout Ernie4_5Tokenizer loads (pad 0, bos 1, eos 2, unk 3)."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>",
        unk_piece="<unk>", user_defined_symbols=SPECIAL + ["\n"], byte_fallback=True, character_coverage=1.0,
        split_digits=True, num_threads=1, minloglevel=2,  # num_threads=1: same corpus -> same model
        # text as it is, newlines included (the default NFKC rules turn "\n" into a space, so the chat template's
        # "User: ...\n" would not be what the model sees)
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    config = {
        "tokenizer_class": "Ernie4_5Tokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>",
        "additional_special_tokens": SPECIAL,
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 4096, "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token",
                                "additional_special_tokens")}, indent=2) + "\n")


def build_random_model(out_dir, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, seed):
    """Random-initialised Ernie4_5ForCausalLM saved as safetensors next to the tokenizer."""
    import paddle
    from paddleformers.transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    paddle.seed(seed)
    head_dim = hidden_size // num_heads
    config = Ernie4_5Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, rope_theta=500000, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, use_bias=False,
        fuse_rms_norm=False,  # the fused RMSNorm kernel has no CPU implementation
    )
    config.architectures = ["Ernie4_5ForCausalLM"]
    model = Ernie4_5ForCausalLM(config)
    model.save_pretrained(str(out_dir))
    return sum(int(p.numel()) for p in model.parameters())


def sft_records(records, rejected_weight=1):
    """Warm-up data: every prompt answered with its chosen AND its rejected answer, in `erniekit` SFT layout.

    Both answers, so the model learns the whole spread of answer lengths in the data (the baseline DPO starts from),
    and learns to end an answer with the end-of-sentence token. `rejected_weight` repeats each rejected answer, which
    makes the base model lean verbose, as the real ERNIE-4.5-0.3B does (baseline mean 888.8 chars in the recipe).
    """
    out = []
    for r in records:
        for resp in [r["response"][0]] + [r["response"][1]] * rejected_weight:
            rec = {"src": list(r["src"]), "tgt": list(r["tgt"]) + [resp[0]]}
            if r.get("system"):
                rec["system"] = r["system"]
            out.append(rec)
    return out
