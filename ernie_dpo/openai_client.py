"""Inference through an OpenAI-compatible chat-completions server (FastDeploy, vLLM, or this project's dev server).

Same output records and the same resume behaviour as local inference (ernie_dpo.generate): each finished prompt is
appended to the progress file at once, and a rerun skips the prompts already there. Requests run `concurrency` at a
time; a timeout, a refused connection, HTTP 429 or 5xx is retried with exponential backoff; any other HTTP error
stops the run naming the prompt. Each request carries its prompt's own seed (decode.prompt_seed(seed, id), as local
inference uses), which servers that honour `seed` (vLLM, the dev server) use for reproducible sampling.

Stopping: a fatal error or Ctrl-C sets a stop flag that every worker checks before each attempt and while waiting to
retry; workers are daemon threads, so the stage exits within seconds instead of waiting out requests in flight
(up to timeout_s x (max_retries + 1) each). The API key is sent as a header and never logged.
"""
import json
import queue
import threading
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .common import append_progress, get_logger, read_progress, reply_record
from .decode import prompt_seed

log = get_logger("openai_client")
RETRY_HTTP = {408, 429, 500, 502, 503, 504}
FINISH = {"stop": "eos", "length": "length"}  # OpenAI finish_reason -> ours


class ServedError(RuntimeError):
    pass


class Stopped(Exception):
    """The run is stopping (another prompt failed, or Ctrl-C): no new attempt is made."""


def _get(url, timeout, api_key=None):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        return json.loads(resp.read())


def served_models(base_url, timeout=10, api_key=None):
    """The model ids the server lists at GET /v1/models."""
    return [m.get("id") for m in _get(f"{base_url.rstrip('/')}/models", timeout, api_key).get("data", [])]


def chat(base_url, model, messages, top_p, temperature, max_tokens, seed, timeout, api_key=None, stop_token_ids=()):
    """One chat completion: (reply, completion tokens or None when the server sends no usage, finish_reason).
    stop_token_ids: the model's own stop tokens (vLLM and FastDeploy take them in the request body), so a server
    that ignores the model's generation config still ends replies where local inference does."""
    payload = {"model": model, "messages": messages, "top_p": top_p, "temperature": temperature,
               "max_tokens": max_tokens, "seed": seed, "stream": False}
    if stop_token_ids:
        payload["stop_token_ids"] = [int(i) for i in stop_token_ids]
    body = json.dumps(payload).encode()
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


def chat_with_retries(test, max_retries, backoff, stop, **kw):
    why = "not tried"
    for attempt in range(max_retries + 1):
        if stop.is_set():
            raise Stopped()
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
            if stop.wait(wait):
                raise Stopped()
    raise ServedError(f"prompt {test['id']}: {kw['base_url']} failed {max_retries + 1} times (last: {why}); is the "
                      "server up? (infer.openai.* in params.yaml)")


def generate_all(tests, out_path, base_url, model, top_p, temperature, max_dec_len, seed, concurrency, timeout,
                 max_retries, api_key=None, backoff=1.0, stop_token_ids=()):
    """Answer every test prompt through the server into out_path, skipping prompts a previous run finished."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_progress(out_path)
    todo = [t for t in tests if t["id"] not in done]
    if len(todo) < len(tests):
        log.info("resuming: %d of %d prompts already answered in %s", len(tests) - len(todo), len(tests), out_path)
    waiting, results, stop = queue.Queue(), queue.Queue(), threading.Event()
    for t in todo:
        waiting.put(t)

    def worker():
        while not stop.is_set():
            try:
                t = waiting.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((t, chat_with_retries(t, max_retries, backoff, stop, base_url=base_url, model=model,
                                                  top_p=top_p, temperature=temperature, max_tokens=max_dec_len,
                                                  seed=prompt_seed(seed, t["id"]), timeout=timeout,
                                                  api_key=api_key, stop_token_ids=stop_token_ids)))
            except Stopped:
                return
            except BaseException as e:  # handed to the main thread, which stops the run
                results.put((t, e))

    # daemon threads: a stopping run never waits for a request in flight
    for _ in range(min(concurrency, len(todo))):
        threading.Thread(target=worker, daemon=True).start()
    with open(out_path, "a", encoding="utf-8") as f, tqdm(total=len(tests), initial=len(tests) - len(todo),
                                                          desc=f"generating ({model} @ {base_url})",
                                                          unit="prompt") as bar:
        try:
            for _ in range(len(todo)):
                while True:
                    try:
                        t, res = results.get(timeout=0.2)  # a short wait, so Ctrl-C is handled at once
                        break
                    except queue.Empty:
                        continue
                if isinstance(res, BaseException):
                    raise res
                reply, tokens, finish = res
                rec = reply_record(t, reply, tokens, finish)
                append_progress(f, rec)
                done[t["id"]] = rec
                bar.update(1)
        finally:
            stop.set()
    return [done[t["id"]] for t in tests]
