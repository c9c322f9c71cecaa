"""Served inference end to end: this project's dev server serving the tiny model on loopback, the real infer stage
as its client (a real kill and resume), retries and errors against real flaky servers, a corpus of bad requests,
Ctrl-C of a served run."""
import json
import subprocess
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import LoopbackServer, free_port, venv_env
from test_interruption import kill_when, start

from ernie_dpo import managed
from ernie_dpo import openai_client as served

KEYS = {"id", "messages", "reply", "tokens", "finish_reason"}


@pytest.fixture
def served_repo(tiny_repo):
    run_stage = tiny_repo
    port = free_port()
    name = managed.served_name(run_stage.root / "models/base")  # what the stage can check it against
    server = subprocess.Popen([sys.executable, "-m", "ernie_dpo.dev_server", "--model", "models/base", "--port",
                               str(port), "--name", name], cwd=run_stage.root, env=venv_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while True:
        try:
            models = json.loads(urllib.request.urlopen(f"{url}/models", timeout=2).read())
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.3)
    assert models["data"][0]["id"] == name
    run_stage.set_param("infer.openai.baseline_url", url)
    run_stage.set_param("infer.openai.model", name)
    run_stage.set_param("infer.openai.concurrency", 3)
    yield run_stage, url
    server.terminate()
    server.wait(timeout=30)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_openai_backend_writes_what_local_inference_writes_and_resumes(served_repo):
    repo, url = served_repo
    root, out = repo.root, ["--model", "models/base", "--out", "data/infer/baseline.jsonl"]
    repo("infer", args=out)  # local backend first, for the format to compare against
    local = read(root / "data/infer/baseline.jsonl")

    repo.set_param("infer.backend", "openai")
    partial = root / "data/infer/partial"
    before = {f.name for f in partial.glob("*.jsonl")}
    proc = start(root, ["-m", "stages.infer", *out])
    new = lambda: [f for f in partial.glob("*.jsonl") if f.name not in before]
    kill_when(proc, lambda: bool(new()) and new()[0].read_text().count("\n") >= 3)
    done_before = new()[0].read_text().count("\n")
    assert 3 <= done_before < 12

    r = repo("infer", args=out)
    assert f"resuming: {done_before} of 12 prompts already answered" in r.stderr
    served_out = read(root / "data/infer/baseline.jsonl")
    assert [o["id"] for o in served_out] == [o["id"] for o in local]  # complete, in test-set order, once each
    for s, l in zip(served_out, local):
        assert set(s) == set(l) == KEYS
        assert s["messages"][:-1] == l["messages"][:-1] and s["messages"][-1] == {"role": "assistant", "content": s["reply"]}
        assert s["finish_reason"] in ("eos", "length") and isinstance(s["tokens"], int) and 0 <= s["tokens"] <= 24
    assert sum(bool(s["reply"]) for s in served_out) >= 6  # the tiny model answers through the server too
    assert url in r.stderr  # the log says where the replies came from
    assert "verified" in (root / "logs/servers/infer_baseline.log").read_text()
    info = json.loads((root / "metrics/infer_baseline.json").read_text())["infer_baseline"]
    assert info["backend"] == "openai" and info["model_verified"] is True


def test_an_external_server_for_another_model_is_refused_or_flagged(served_repo):
    repo, url = served_repo
    repo.set_param("infer.backend", "openai")
    repo.set_param("infer.openai.model", "some-other-model")
    r = repo("infer", check=False, args=["--model", "models/base", "--out", "data/infer/baseline.jsonl"])
    assert r.returncode != 0 and "not infer.openai.model='some-other-model'" in r.stderr


def test_the_server_samples_reproducibly_per_seed(served_repo):
    _, url = served_repo
    ask = dict(base_url=url, model=served.served_models(url)[0], messages=[{"role": "user", "content": "What is the capital of France?"}],
               top_p=0.7, temperature=0.7, max_tokens=24, timeout=60)
    assert served.chat(seed=5, **ask) == served.chat(seed=5, **ask)


class Flaky(LoopbackServer):
    """A real loopback server: answers `fail` requests with `status` (or sleeps past the client timeout), then OK."""

    def __init__(self, fail, status=503, sleep=0.0):
        self.fail, self.calls = fail, 0
        me = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                me.calls += 1
                if me.calls <= me.fail:
                    if sleep:
                        time.sleep(sleep)
                    else:
                        self.send_error(status, "nope")
                        return
                body = json.dumps({"choices": [{"message": {"content": f"echo {req['messages'][-1]['content']}"},
                                                "finish_reason": "stop"}], "usage": {"completion_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(H, "/v1")


TESTS = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]


def run(url, tmp_path, retries=3, timeout=5):
    return served.generate_all(TESTS, tmp_path / "out.jsonl", url, "m", 0.7, 0.7, 16, 1, concurrency=1,
                               timeout=timeout, max_retries=retries, backoff=0.01)


def test_busy_and_slow_servers_are_retried(tmp_path):
    busy = Flaky(fail=2, status=503)
    out = run(busy.url, tmp_path)
    assert [o["reply"] for o in out] == ["echo q0", "echo q1", "echo q2"] and busy.calls == 5
    busy.close()
    slow = Flaky(fail=1, sleep=1.5)
    out = run(slow.url, tmp_path / "slow", timeout=0.5)
    assert len(out) == 3 and slow.calls == 4  # the timed-out request was sent again
    slow.close()


def test_a_bad_request_or_a_dead_server_stops_naming_the_prompt(tmp_path):
    bad = Flaky(fail=99, status=400)
    with pytest.raises(served.ServedError, match="prompt p0: HTTP 400"):
        run(bad.url, tmp_path)
    assert bad.calls <= len(TESTS)  # a 400 is not retried (each prompt asked at most once)
    bad.close()
    with pytest.raises(served.ServedError, match="failed 3 times"):
        run(f"http://127.0.0.1:{free_port()}/v1", tmp_path / "dead", retries=2)


def test_a_reply_without_usage_is_recorded_as_unknown_tokens(tmp_path):
    class NoUsage(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = LoopbackServer(NoUsage, "/v1")
    out = run(srv.url, tmp_path)
    srv.close()
    assert [o["tokens"] for o in out] == [None, None, None]
    from ernie_dpo.stats import reply_metrics

    m = reply_metrics(out, max_dec_len=16)  # evaluate copes: lengths in chars, tokens unknown
    assert m["chars_mean"] == 2 and m["tokens_mean"] is None and m["tokens_unknown"] == 3


def test_ctrl_c_stops_a_served_run_within_seconds(tiny_repo, tmp_path):
    """A server whose replies take a minute: Ctrl-C must not wait for the requests in flight (nor retries)."""
    import threading

    in_flight = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps({"data": [{"id": "slow"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            in_flight.set()
            time.sleep(60)

    srv = LoopbackServer(Slow, "/v1")
    repo = tiny_repo
    for k, v in {"infer.backend": "openai", "infer.openai.baseline_url": srv.url, "infer.openai.model": "slow",
                 "infer.openai.concurrency": 4, "infer.openai.timeout_s": 600, "infer.openai.api_key_env": "TEST_KEY"}.items():
        repo.set_param(k, v)
    env = {**venv_env(), "TEST_KEY": "sk-secret-never-logged"}
    proc = subprocess.Popen([sys.executable, "-m", "stages.infer", "--model", "models/base", "--out",
                             "data/infer/baseline.jsonl"], cwd=repo.root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # Ctrl-C once a request is in flight (on a busy machine the stage's imports alone can take longer than any fixed wait)
    assert in_flight.wait(120) and proc.poll() is None
    import signal

    start = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    srv.close()
    assert time.time() - start < 10, f"took {time.time() - start:.1f} s to stop"
    assert proc.returncode != 0 and "sk-secret-never-logged" not in out
