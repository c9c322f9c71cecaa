"""A small OpenAI-compatible chat-completions server for a local model directory: the managed backend's CPU preset,
the tests, and a way to try infer.backend=openai without FastDeploy or vLLM. Not a production server.

    ernie-dpo serve --model models/base --port 8180 [--name NAME]    (or python -m ernie_dpo.dev_server ...)

GET /v1/models, POST /v1/chat/completions (model, messages, top_p, temperature, max_tokens, seed, stop_token_ids;
no streaming),
sampled with the same code as local inference (ernie_dpo.generate.LocalModel). One generation runs at a time;
at most --queue requests wait for it, more get 503 (the client retries with backoff), so timed-out retries cannot
pile up unbounded threads of duplicate work. Every bad request gets a 4xx JSON error saying what is wrong, a failed
generation a 500 JSON error, and the server keeps serving. Loopback by default; binding elsewhere logs a warning
(no authentication here).
"""
import argparse
import ipaddress
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .common import get_logger

log = get_logger("dev_server")
MAX_BODY = 4 << 20  # bytes of one request
ROLES = {"system", "user", "assistant"}


class BadRequest(ValueError):
    def __init__(self, message, code=400):
        super().__init__(message)
        self.code = code


def _number(req, key, default):
    v = req.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"'{key}' must be a number, got {json.dumps(v)[:40]}")
    return v


def _integer(req, key, default):
    v = req.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{key}' must be an integer, got {json.dumps(v)[:40]}")
    return v


def validate(req, served_name, prompt_len, context):
    """The request's generation settings, or BadRequest naming the field and the reason.

    prompt_len(messages) -> prompt tokens; context: the model's context length (None: unknown)."""
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object")
    if req.get("stream"):
        raise BadRequest("'stream' is not supported by this server")
    if "model" in req and req["model"] != served_name:
        raise BadRequest(f"model {json.dumps(req['model'])[:80]} is not served here (serving {served_name!r})", 404)
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{k}] must be an object")
        if m.get("role") not in ROLES:
            raise BadRequest(f"messages[{k}].role must be one of {sorted(ROLES)}, got {json.dumps(m.get('role'))[:40]}")
        if not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{k}].content must be a string")
    if messages[-1]["role"] != "user":
        raise BadRequest("the last message must come from the user")
    top_p, temperature = _number(req, "top_p", 1.0), _number(req, "temperature", 1.0)
    if not 0 < top_p <= 1:
        raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise BadRequest(f"'temperature' must be >= 0 (0 = greedy), got {temperature}")
    seed = _integer(req, "seed", 0)
    if seed < 0:
        raise BadRequest(f"'seed' must be >= 0, got {seed}")
    stop_ids = req.get("stop_token_ids")
    if stop_ids is not None and (not isinstance(stop_ids, list) or
                                 not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stop_ids)):
        raise BadRequest("'stop_token_ids' must be a list of non-negative integers")
    max_tokens = _integer(req, "max_tokens", 256)
    if max_tokens <= 0:
        raise BadRequest(f"'max_tokens' must be > 0, got {max_tokens}")
    n_prompt = prompt_len(messages)
    if context and n_prompt + max_tokens > context:
        raise BadRequest(f"'max_tokens' {max_tokens} + the prompt's {n_prompt} tokens exceed the model's context "
                         f"of {context}")
    return {"messages": messages, "top_p": top_p, "temperature": temperature, "seed": seed, "max_tokens": max_tokens,
            "stop_token_ids": stop_ids or None}


def make_handler(generate, served_name, prompt_len, context, queue_size, read_timeout):
    """generate(settings) -> (reply, tokens, finish_reason "eos" | "length")."""
    admitted = threading.BoundedSemaphore(queue_size + 1)  # the one generating + those waiting
    model_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        timeout = read_timeout  # socket timeout: a client that stops sending cannot hold a thread forever

        def log_message(self, fmt, *args):
            log.info("%s %s", self.address_string(), fmt % args)

        def _json(self, code, obj):
            body = json.dumps(obj, ensure_ascii=False).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, code, message):
            self._json(code, {"error": {"message": message, "code": code}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": served_name, "object": "model"}]})
            else:
                self._error(404, f"no route {self.path}")

        def _body(self):
            raw = self.headers.get("Content-Length")
            if raw is None:
                raise BadRequest("a Content-Length header is required", 411)
            try:
                n = int(raw)
            except ValueError:
                raise BadRequest(f"bad Content-Length {raw[:40]!r}") from None
            if n < 0:
                raise BadRequest(f"bad Content-Length {n}")
            if n > MAX_BODY:
                raise BadRequest(f"body of {n} bytes exceeds the limit of {MAX_BODY}", 413)
            data = self.rfile.read(n)
            if len(data) < n:
                raise BadRequest(f"body ended after {len(data)} of {n} bytes")
            try:
                return json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not valid JSON ({e})") from None

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}")
                return
            try:
                settings = validate(self._body(), served_name, prompt_len, context)
            except BadRequest as e:
                self._error(e.code, str(e))
                return
            except TimeoutError:
                self._error(408, "timed out reading the request body")
                return
            if not admitted.acquire(blocking=False):
                self._error(503, f"busy: {queue_size} requests already waiting; retry later")
                return
            try:
                with model_lock:
                    reply, tokens, finish = generate(settings)
            except Exception as e:  # the server stays up; the client sees what failed
                log.exception("generation failed")
                self._error(500, f"generation failed: {type(e).__name__}: {e}")
                return
            finally:
                admitted.release()
            self._json(200, {
                "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": served_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": "stop" if finish == "eos" else "length"}],
                "usage": {"completion_tokens": tokens},
            })

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stopping server does not wait for a client that keeps its connection open


def make_server(model_dir, host, port, device="cpu", name=None, queue_size=16, read_timeout=30):
    from .generate import LocalModel
    from .tokens import prompt_ids

    lm = LocalModel(model_dir, device)

    def generate(s):
        rec = lm.answer([{"id": "r", "messages": s["messages"]}], s["top_p"], s["temperature"], s["max_tokens"], 1,
                        0, seeds={"r": s["seed"]}, stop_ids=s["stop_token_ids"])["r"]
        return rec["reply"], rec["tokens"], rec["finish_reason"]

    handler = make_handler(generate, name or str(model_dir), lambda m: len(prompt_ids(lm.tokenizer, m)), lm.max_len,
                           queue_size, read_timeout)
    return Server((host, port), handler)


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="ernie-dpo serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (models/base, models/merged, ...)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8180)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None, help="model id reported by /v1/models (default: the directory)")
    ap.add_argument("--queue", type=int, default=16, help="requests that may wait; more get 503")
    args = ap.parse_args(argv)
    if not is_loopback(args.host):
        log.warning("binding to %s: this server has no authentication; anyone who reaches it can use the model",
                    args.host)
    server = make_server(args.model, args.host, args.port, args.device, args.name, args.queue)
    log.info("serving %s as %r on http://%s:%d/v1 (OpenAI chat completions)", args.model, args.name or args.model,
             args.host, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
