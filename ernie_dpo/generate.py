"""Batched sampling over the test set with the model's own chat template, resumable.

Output: one jsonl line per prompt
    {"id", "messages": [...test messages, {"role": "assistant", "content": reply}], "reply", "tokens", "finish_reason"}
The recipe's evaluator reads the last message with role "bot"; here that message has the OpenAI role "assistant"
(the same message, the role name is the only difference).

Resume: prompts are cut into fixed batches; a batch is written (and flushed) only once all its replies exist, and each
batch is seeded from (seed, batch index). A rerun after an interruption skips the batches already in the file and
reproduces on a CPU exactly what an uninterrupted run would have written.
"""
import json
import os
from pathlib import Path

from tqdm import tqdm

from .common import get_logger

log = get_logger("generate")
STOP_TOKENS = ("<|end_of_sentence|>",)  # ERNIE 4.5 ends an assistant turn with this before </s>


def load_model(model_dir, device):
    import paddle
    from paddleformers.transformers import AutoModelForCausalLM, AutoTokenizer

    paddle.set_device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    dtype = "float32" if device == "cpu" else "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.eval()
    return model, tokenizer


def stop_ids(tokenizer):
    ids = {tokenizer.eos_token_id}
    for t in STOP_TOKENS:
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


def read_done(out_path):
    """Completed lines of a previous (maybe interrupted) run; a torn last line is cut off the file."""
    done = {}
    path = Path(out_path)
    if not path.exists():
        return done
    good_bytes = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # killed mid-write: drop the partial line
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                break
            done[rec["id"]] = rec
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return done


def generate_batch(model, tokenizer, batch, top_p, temperature, max_dec_len, seed, stops):
    import paddle

    prompts = [tokenizer.apply_chat_template(t["messages"], tokenize=False, add_generation_prompt=True) for t in batch]
    enc = tokenizer(prompts, return_tensors="pd", padding=True, add_special_tokens=False)
    paddle.seed(seed)
    with paddle.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_dec_len,
            decode_strategy="sampling", top_p=top_p, temperature=temperature, eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id, use_cache=True,
        )
    new_tokens = out[0].numpy().tolist()  # generate returns only the new tokens
    results = []
    for t, ids in zip(batch, new_tokens):
        end = next((k for k, i in enumerate(ids) if i in stops), None)
        finish = "eos" if end is not None else "length"
        ids = ids[:end] if end is not None else ids
        reply = tokenizer.decode(ids, skip_special_tokens=True).strip()
        results.append({"id": t["id"], "messages": t["messages"] + [{"role": "assistant", "content": reply}],
                        "reply": reply, "tokens": len(ids), "finish_reason": finish})
    return results


def generate_all(tests, out_path, model_dir, top_p, temperature, max_dec_len, batch_size, seed, device):
    """Answer every test prompt into out_path, skipping batches a previous run finished. Returns all records."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out_path)
    batches = [tests[k:k + batch_size] for k in range(0, len(tests), batch_size)]
    todo = [(k, b) for k, b in enumerate(batches) if not all(t["id"] in done for t in b)]
    if done:
        log.info("resuming: %d of %d prompts already answered in %s", len(done), len(tests), out_path)
    if todo:
        model, tokenizer = load_model(model_dir, device)
        stops = stop_ids(tokenizer)
        with open(out_path, "a", encoding="utf-8") as f, tqdm(total=len(tests), initial=len(tests) - sum(
                len(b) for _, b in todo), desc=f"generating ({Path(model_dir).name})", unit="prompt") as bar:
            for k, batch in todo:
                batch = [t for t in batch if t["id"] not in done]  # a partly kept batch (resume after a crash)
                for rec in generate_batch(model, tokenizer, batch, top_p, temperature, max_dec_len,
                                          seed * 100003 + k, stops):
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    done[rec["id"]] = rec
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
    return [done[t["id"]] for t in tests]


def answer_all(tests, out_path, model_dir, role, params):
    """Answer `tests` with the backend params["infer"]["backend"] names: "local" samples with the model directory
    here; "openai" sends the prompts to the server infer.openai.<role>_url (role: baseline | tuned), which must be
    serving that same model directory. Same records and resume behaviour either way."""
    p, device = params["infer"], params["engine"]["device"]
    if p["backend"] == "local":
        return generate_all(tests, out_path, model_dir, p["top_p"], p["temperature"], p["max_dec_len"],
                            p["batch_size"], p["seed"], device)
    if p["backend"] == "openai":
        from . import served

        o = p["openai"]
        return served.generate_all(tests, out_path, o[f"{role}_url"], o["model"], p["top_p"], p["temperature"],
                                   p["max_dec_len"], p["seed"], o["concurrency"], o["timeout_s"], o["max_retries"],
                                   api_key=os.environ.get(o["api_key_env"]))
    raise ValueError(f"infer.backend must be 'local' or 'openai', got {p['backend']!r}")
