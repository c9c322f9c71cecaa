"""infer.backend: managed — the stage starts an inference server on ITS OWN model directory, checks that the server
serves exactly that model, sends the prompts through the OpenAI client, and stops the server again.

Why: with a server started by hand, nothing ties the replies a stage caches to the model it claims to evaluate, and
queued experiments (each with its models/merged in a temp folder) would all be answered by one server.

- The command is a template (infer.managed.command, presets in conf/server/): {model} the model directory, {host},
  {port} a free port chosen now (so parallel queued experiments do not collide), {name} the served model name,
  {python} this interpreter, and more free ports for servers that open several ({metrics_port},
  {engine_worker_queue_port}, {cache_queue_port}: FastDeploy's, whose older defaults 8001-8003 made a second
  server fail).
- {name} is the model directory's name plus a hash of its files: the server must list exactly that name at
  GET /v1/models, or the stage refuses to go on (a server answering for another model is never trusted).
- Readiness: GET /v1/models answers within infer.managed.ready_timeout_s, else the stage fails with the server's
  log tail. The server's whole log is a stage output (logs/servers/<stage>.log).
- The server runs in its own process group, ended (SIGTERM, then SIGKILL) on success, failure and Ctrl-C.
"""
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .common import fingerprint, get_logger
from .launch import stop_group, without_secrets
from .openai_client import ServedError, served_models

log = get_logger("managed")


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def served_name(model_dir):
    """The name the server must serve: the directory's name + a hash of its files (another model, another name)."""
    return f"{Path(model_dir).name}-{fingerprint([model_dir], {})}"


def _tail(path, n=30):
    try:
        return "".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(True)[-n:])
    except OSError:
        return "(no log)"


PORT_FIELDS = ("port", "metrics_port", "engine_worker_queue_port", "cache_queue_port")


def command_fields(model_dir, host="127.0.0.1"):
    """What a command template may use: a distinct free port for each of PORT_FIELDS, and the rest."""
    ports = set()
    while len(ports) < len(PORT_FIELDS):
        ports.add(free_port(host))
    return {"model": str(model_dir), "host": host, "name": served_name(model_dir), "python": sys.executable,
            **dict(zip(PORT_FIELDS, sorted(ports)))}


@contextmanager
def managed_server(command, model_dir, log_path, ready_timeout_s, host="127.0.0.1"):
    """Start `command` on model_dir, wait until it serves served_name(model_dir); yields (base_url, name)."""
    fields = command_fields(model_dir, host)
    name, port = fields["name"], fields["port"]
    argv = [str(part).format(**fields) for part in command]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{host}:{port}/v1"
    log.info("starting the inference server for %s as %r on %s: %s (log: %s)", model_dir, name, url,
             " ".join(argv), log_path)
    with open(log_path, "w", encoding="utf-8") as out:
        # no credentials in the server's environment: it serves a local directory, and servers log their
        # environment (the log is a DVC output)
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=without_secrets(os.environ))
        try:
            start = time.time()
            while True:
                if proc.poll() is not None:
                    raise ServedError(f"the inference server exited (code {proc.returncode}) before it was ready; "
                                      f"last lines of {log_path}:\n{_tail(log_path)}")
                try:
                    names = served_models(url, timeout=5)
                    break
                except OSError:
                    pass
                if time.time() - start > ready_timeout_s:
                    raise ServedError(f"the inference server did not answer {url}/models within {ready_timeout_s} s "
                                      f"(infer.managed.ready_timeout_s); last lines of {log_path}:\n{_tail(log_path)}")
                time.sleep(0.5)
            if name not in names:
                raise ServedError(f"the server at {url} serves {names}, not {name!r} (the model directory {model_dir}); "
                                  "its replies would not be this model's. Does infer.managed.command pass {name} as "
                                  "the served model name?")
            log.info("server ready in %.0f s, serving %s", time.time() - start, name)
            yield url, name
        finally:
            stop_group(proc)
            log.info("inference server stopped (%s)", name)
