"""The peer side of benchmarks/generation.py: Hugging Face transformers + torch on the same weights and token ids.

Runs in its own venv (benchmarks/requirements-peer.txt); reads a spec json, prints one json line of figures.
Batches are left-padded and generated with `model.generate` (what a transformers user would write), sampling with
top_p and temperature only (top_k=0 turns transformers' default top_k=50 off), the same stop tokens.
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(2025)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    pad = spec["stops"][0] if spec["stops"] else 0
    prompts, batch, max_new = spec["prompts"], spec["batch"], spec["max_new"]
    kw = dict(do_sample=True, top_p=0.7, temperature=0.7, top_k=0, max_new_tokens=max_new, pad_token_id=pad)
    if spec["forced"]:
        kw.update(min_new_tokens=max_new, eos_token_id=None)
    else:
        kw["eos_token_id"] = spec["stops"]

    def run(chunk):
        t = max(map(len, chunk))
        ids = torch.tensor([[pad] * (t - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, t:]
        n = 0
        for row in out.tolist():
            k = next((i for i, x in enumerate(row) if x in spec["stops"]), len(row)) if not spec["forced"] else len(row)
            n += k
        return n

    run(prompts[:1])  # warm-up
    start, tokens = time.time(), 0
    for k in range(0, len(prompts), batch):
        tokens += run(prompts[k:k + batch])
    print(json.dumps({"seconds": time.time() - start, "tokens": tokens, "replies": len(prompts)}))


if __name__ == "__main__":
    main()
