"""Inference through any OpenAI-compatible chat-completions server (FastDeploy or vLLM serving ERNIE 4.5).

Same output records and the same resume behaviour as local inference (ernie_dpo.generate): each finished prompt is
appended to the progress file at once, and a rerun skips the prompts already there. Requests run `concurrency` at a
time; a timeout, a refused connection, HTTP 429 or 5xx is retried with exponential backoff; any other HTTP error
stops the run naming the prompt. Each request carries its prompt's own seed (decode.prompt_seed(seed, id), as local inference uses), which
servers that honour `seed` (vLLM, this project's ernie_dpo.serve) use for reproducible sampling.
"""
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from .common import get_logger
from .decode import prompt_seed
from .generate import read_done

log = get_logger("served")
RETRY_HTTP = {408, 429, 500, 502, 503, 504}
FINISH = {"stop": "eos", "length": "length"}  # OpenAI finish_reason -> ours


class ServedError(RuntimeError):
    pass


def chat(base_url, model, messages, top_p, temperature, max_tokens, seed, timeout, api_key=None):
    """One chat completion: (reply, completion tokens, finish_reason "eos" | "length")."""
    body = json.dumps({"model": model, "messages": messages, "top_p": top_p, "temperature": temperature,
                       "max_tokens": max_tokens, "seed": seed, "stream": False}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(f"{base_url.rstrip('/')}/chat/completions", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read())
    choice = out["choices"][0]
    reply = (choice["message"].get("content") or "").strip()
    tokens = (out.get("usage") or {}).get("completion_tokens")
    return reply, tokens, FINISH.get(choice.get("finish_reason"), choice.get("finish_reason") or "eos")


def chat_with_retries(test, max_retries, backoff, **kw):
    for attempt in range(max_retries + 1):
        try:
            return chat(messages=test["messages"], **kw)
        except urllib.error.HTTPError as e:
            if e.code not in RETRY_HTTP:
                detail = e.read()[:300].decode("utf-8", "replace")
                raise ServedError(f"prompt {test['id']}: HTTP {e.code} {e.reason} from {kw['base_url']}: {detail}")
            why = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            why = str(getattr(e, "reason", e))
        if attempt < max_retries:
            wait = backoff * 2 ** attempt
            log.warning("prompt %s: %s; retry %d of %d in %.1f s", test["id"], why, attempt + 1, max_retries, wait)
            time.sleep(wait)
    raise ServedError(f"prompt {test['id']}: {kw['base_url']} failed {max_retries + 1} times (last: {why}); is the "
                      "server up? (infer.openai.* in params.yaml)")


def generate_all(tests, out_path, base_url, model, top_p, temperature, max_dec_len, seed, concurrency, timeout,
                 max_retries, api_key=None, backoff=1.0):
    """Answer every test prompt through the server into out_path, skipping prompts a previous run finished."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out_path)
    todo = [(k, t) for k, t in enumerate(tests) if t["id"] not in done]
    if done:
        log.info("resuming: %d of %d prompts already answered in %s", len(tests) - len(todo), len(tests), out_path)
    lock = threading.Lock()
    with open(out_path, "a", encoding="utf-8") as f, \
            tqdm(total=len(tests), initial=len(tests) - len(todo), desc=f"generating ({model} @ {base_url})",
                 unit="prompt") as bar, ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(chat_with_retries, t, max_retries, backoff, base_url=base_url, model=model,
                               top_p=top_p, temperature=temperature, max_tokens=max_dec_len,
                               seed=prompt_seed(seed, t["id"]), timeout=timeout, api_key=api_key): t for k, t in todo}
        try:
            for fut in as_completed(futures):
                t = futures[fut]
                reply, tokens, finish = fut.result()
                rec = {"id": t["id"], "messages": t["messages"] + [{"role": "assistant", "content": reply}],
                       "reply": reply, "tokens": tokens, "finish_reason": finish}
                with lock:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                done[t["id"]] = rec
                bar.update(1)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return [done[t["id"]] for t in tests]
