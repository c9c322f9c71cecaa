"""The llama.cpp side of benchmarks/generation.py: the same prompts (token ids), sampling and new-token limit, on
the model's own GGUF file, in llama.cpp's server loop (xllamacpp, in-process; continuous batching over `parallel`
slots, requests sent concurrently). Runs in a venv with xllamacpp (never the main install):

    python3 -m venv llama && llama/bin/pip install xllamacpp==2026.10.11549
    python benchmarks/generation.py --models smol --modes sampling --llamacpp-python llama/bin/python

Reads a JSON spec (gguf, prompts, max_new, forced, parallel, threads, seed) and prints one JSON line:
{"seconds", "tokens" (new tokens), "replies", "threads"}.
"""
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def main():
    import xllamacpp

    spec = json.load(open(sys.argv[1]))
    p = xllamacpp.CommonParams()
    p.model.path = spec["gguf"]
    p.n_parallel = spec["parallel"]
    longest = max(len(x) for x in spec["prompts"]) + spec["max_new"] + 8
    p.n_ctx = longest * spec["parallel"]  # every slot can hold the longest prompt and its reply
    p.cpuparams.n_threads = spec["threads"]
    p.cpuparams_batch.n_threads = spec["threads"]
    server = xllamacpp.Server(p)

    def answer(k):
        r = server.handle_completions({
            "prompt": spec["prompts"][k], "n_predict": spec["max_new"], "temperature": 0.7, "top_p": 0.7,
            "top_k": 0, "min_p": 0.0, "seed": spec["seed"] + k, "ignore_eos": spec["forced"], "cache_prompt": False})
        return r["usage"]["completion_tokens"]

    answer(0)  # warm-up, not timed (as the other rows load their model before timing)
    start = time.time()
    with ThreadPoolExecutor(spec["parallel"]) as pool:
        tokens = sum(pool.map(answer, range(len(spec["prompts"]))))
    print(json.dumps({"seconds": time.time() - start, "tokens": tokens, "replies": len(spec["prompts"]),
                      "threads": spec["threads"]}))


if __name__ == "__main__":
    main()
