"""A small OpenAI-compatible chat-completions server for a local model directory (the tiny demo model, or any).

    python -m ernie_dpo.serve --model models/base --port 8180          # then infer.backend=openai

For tests and for trying infer.backend=openai without FastDeploy or vLLM; not a production server: requests are
answered one at a time (a lock around the model), with the same sampling code as local inference. Endpoints:
GET /v1/models, POST /v1/chat/completions (model, messages, top_p, temperature, max_tokens, seed; no streaming).
"""
import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .common import get_logger
from .generate import LocalModel

log = get_logger("serve")


def make_server(model_dir, host, port, device="cpu", name=None):
    lm = LocalModel(model_dir, device)
    lock = threading.Lock()
    served_name = name or str(model_dir)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            log.info("%s %s", self.address_string(), fmt % args)

        def _json(self, code, obj):
            body = json.dumps(obj, ensure_ascii=False).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": served_name, "object": "model"}]})
            else:
                self._json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._json(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = req["messages"]
                if not messages or messages[-1].get("role") != "user":
                    raise ValueError("the last message must come from the user")
                top_p, temperature = float(req.get("top_p", 1.0)), float(req.get("temperature", 1.0))
                max_tokens, seed = int(req.get("max_tokens", 256)), int(req.get("seed", 0))
            except (ValueError, KeyError, TypeError) as e:
                self._json(400, {"error": {"message": f"bad request: {e}"}})
                return
            with lock:
                rec = lm.answer([{"id": "r", "messages": messages}], top_p, temperature, max_tokens, 1, seed,
                                seeds={"r": seed})["r"]
            self._json(200, {
                "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": served_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": rec["reply"]},
                             "finish_reason": "stop" if rec["finish_reason"] == "eos" else "length"}],
                "usage": {"completion_tokens": rec["tokens"]},
            })

    return ThreadingHTTPServer((host, port), Handler)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="model directory (models/base, models/merged, ...)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8180)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None, help="model id reported by /v1/models (default: the directory)")
    args = ap.parse_args()
    server = make_server(args.model, args.host, args.port, args.device, args.name)
    log.info("serving %s on http://%s:%d/v1 (OpenAI chat completions)", args.model, args.host, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
