"""The dev server survives bad input: a corpus of bad requests, each answered with a 4xx JSON error saying what is
wrong, while good requests keep being served; generation errors are 500 JSON; a full queue is 503."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from ernie_dpo import dev_server

GOOD = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "top_p": 0.7, "temperature": 0.7, "max_tokens": 8, "seed": 1}


@pytest.fixture(scope="module")
def server(tiny_base):
    srv = dev_server.make_server(tiny_base, "127.0.0.1", 0, name="m", read_timeout=2)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_port
    srv.shutdown()
    srv.server_close()


def raw(port, data):
    """Send raw bytes, return (status, parsed JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # all sent: a short body ends here
        chunks = []
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(port, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def change(**kw):
    return {**GOOD, **kw}


BAD_JSON = [  # (what, body, expected status, words the error must contain)
    ("messages is a string", change(messages="hi"), 400, "messages"),
    ("no messages", change(messages=[]), 400, "non-empty"),
    ("unknown role", change(messages=[{"role": "robot", "content": "x"}]), 400, "role"),
    ("non-string content", change(messages=[{"role": "user", "content": 5}]), 400, "content"),
    ("message not an object", change(messages=["hi"]), 400, "object"),
    ("last turn not the user's", change(messages=[{"role": "user", "content": "a"},
                                                  {"role": "assistant", "content": "b"}]), 400, "last message"),
    ("top_p 0", change(top_p=0), 400, "top_p"),
    ("top_p negative", change(top_p=-3), 400, "top_p"),
    ("top_p above 1", change(top_p=1.5), 400, "top_p"),
    ("top_p a boolean", change(top_p=True), 400, "number"),
    ("negative temperature", change(temperature=-1), 400, "temperature"),
    ("negative seed", change(seed=-7), 400, "seed"),
    ("max_tokens 0", change(max_tokens=0), 400, "max_tokens"),
    ("max_tokens past the context", change(max_tokens=10 ** 9), 400, "context"),
    ("max_tokens a string", change(max_tokens="10"), 400, "integer"),
    ("another model", change(model="other"), 404, "not served"),
    ("streaming", change(stream=True), 400, "stream"),
    ("a JSON list", [1, 2], 400, "object"),
    ("not JSON", b"{not json", 400, "JSON"),
]


@pytest.mark.parametrize("what,body,code,words", BAD_JSON, ids=[b[0] for b in BAD_JSON])
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(server, what, body, code, words):
    status, out = post(server, body)
    assert status == code and words in out["error"]["message"], (status, out)
    status, out = post(server, GOOD)
    assert status == 200 and isinstance(out["choices"][0]["message"]["content"], str)


@pytest.mark.parametrize("what,data,code", [
    ("no Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    ("negative Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
    ("Content-Length not a number", b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400),
    ("body over the cap", b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", 413),
    ("body shorter than announced", b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}", 400),
    ("unknown route", b"POST /v1/other HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 404),
])
def test_bad_http_framing_gets_a_json_error(server, what, data, code):
    status, out = raw(server, data)
    assert status == code and out["error"]["code"] == code
    assert post(server, GOOD)[0] == 200


def test_a_client_that_stops_sending_is_timed_out(server):
    with socket.create_connection(("127.0.0.1", server), timeout=20) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # and then nothing
        start = time.time()
        reply = s.recv(65536)
    assert b" 408 " in reply.split(b"\r\n")[0] and time.time() - start < 10


def test_temperature_zero_is_greedy(server):
    a = post(server, change(temperature=0, seed=1))[1]["choices"][0]["message"]["content"]
    b = post(server, change(temperature=0, seed=2))[1]["choices"][0]["message"]["content"]
    assert a == b


def test_generation_errors_are_500_and_a_full_queue_is_503():
    release, started = threading.Event(), threading.Event()

    def generate(s):
        if s["messages"][-1]["content"] == "explode":
            raise RuntimeError("kaboom")
        started.set()
        release.wait(30)
        return "ok", 1, "eos"

    handler = dev_server.make_handler(generate, "m", lambda m: 3, 100, queue_size=1, read_timeout=5)
    srv = dev_server.Server(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_port
    try:
        status, out = post(port, change(messages=[{"role": "user", "content": "explode"}]))
        assert status == 500 and "kaboom" in out["error"]["message"]
        results = []
        first = threading.Thread(target=lambda: results.append(post(port, GOOD)))
        first.start()
        assert started.wait(10)  # one generating
        second = threading.Thread(target=lambda: results.append(post(port, GOOD)))
        second.start()
        time.sleep(0.5)  # one waiting: the queue (1) is full
        status, out = post(port, GOOD)
        assert status == 503 and "busy" in out["error"]["message"]
        release.set()
        first.join(30)
        second.join(30)
        assert [r[0] for r in results] == [200, 200]
    finally:
        release.set()
        srv.shutdown()
        srv.server_close()


def test_only_loopback_counts_as_loopback():
    assert dev_server.is_loopback("127.0.0.1") and dev_server.is_loopback("::1") and dev_server.is_loopback("localhost")
    assert not dev_server.is_loopback("0.0.0.0") and not dev_server.is_loopback("10.1.2.3")
