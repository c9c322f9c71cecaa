"""The real-data download against a real HTTP server on loopback (the hub's URL layout, redirect and commit header)."""
import hashlib
import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import LoopbackServer, free_port, venv_env

from ernie_dpo.fetch import FetchError, download, file_url

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub(LoopbackServer):
    """A loopback stand-in for the hub: /datasets/<repo>/resolve/<rev>/<file> redirects (302, X-Repo-Commit) to a
    blob URL serving `content`; `fail_first` answers that many requests with 503 first."""

    def __init__(self, content, fail_first=0):
        self.content, self.fail_first, self.requests = content, fail_first, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                hub.requests.append(self.path)
                if hub.fail_first > 0:
                    hub.fail_first -= 1
                    self.send_error(503, "busy")
                elif "/resolve/" in self.path and self.path.endswith("/dpo_en.json"):
                    rev = self.path.split("/resolve/")[1].split("/")[0]
                    if rev not in ("main", COMMIT):
                        self.send_error(404, "Revision Not Found")
                        return
                    self.send_response(302)
                    self.send_header("Location", "/blob/dpo_en.json")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.end_headers()
                elif self.path == "/blob/dpo_en.json":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(hub.content)))
                    self.end_headers()
                    self.wfile.write(hub.content)
                else:
                    self.send_error(404)

        super().__init__(Handler)


@pytest.fixture
def hub():
    servers = []

    def start(content, fail_first=0):
        servers.append(Hub(content, fail_first))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


DATA = json.dumps([{"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "Hi."},
                    "rejected": {"from": "gpt", "value": "Hello there, how are you doing today?"}}]).encode()


def test_download_follows_the_redirect_records_the_commit_and_verifies(tmp_path, hub):
    h = hub(DATA)
    url = file_url(h.url, "llamafactory/DPO-En-Zh-20k", "main", "dpo_en.json")
    got = download(url, tmp_path / "dpo_en.json", hashlib.sha256(DATA).hexdigest())
    assert got == {"sha256": hashlib.sha256(DATA).hexdigest(), "bytes": len(DATA), "commit": COMMIT}
    assert (tmp_path / "dpo_en.json").read_bytes() == DATA and not (tmp_path / "dpo_en.json.part").exists()


def test_checksum_mismatch_writes_nothing_and_keeps_the_old_file(tmp_path, hub):
    h = hub(DATA + b" ")
    (tmp_path / "dpo_en.json").write_bytes(b"old")
    with pytest.raises(FetchError, match="checksum mismatch.*expected sha256 " + hashlib.sha256(DATA).hexdigest()):
        download(file_url(h.url, "d/x", "main", "dpo_en.json"), tmp_path / "dpo_en.json", hashlib.sha256(DATA).hexdigest())
    assert (tmp_path / "dpo_en.json").read_bytes() == b"old" and not (tmp_path / "dpo_en.json.part").exists()


def test_unreachable_server_and_wrong_revision_are_clear_errors(tmp_path, hub):
    with pytest.raises(FetchError, match="cannot download .* after 2 tries"):
        download(f"http://127.0.0.1:{free_port()}/x", tmp_path / "f", retries=2, backoff=0.01, timeout=2)
    h = hub(DATA)
    with pytest.raises(FetchError, match="HTTP 404"):
        download(file_url(h.url, "d/x", "no-such-branch", "dpo_en.json"), tmp_path / "f", retries=3, backoff=0.01)
    assert len(h.requests) == 1  # a 404 is not retried


def test_busy_server_is_retried(tmp_path, hub):
    h = hub(DATA, fail_first=2)
    got = download(file_url(h.url, "d/x", "main", "dpo_en.json"), tmp_path / "f", retries=3, backoff=0.01)
    assert got["bytes"] == len(DATA) and len(h.requests) == 4  # 503, 503, then redirect + blob


def fetch(repo, endpoint, *extra):
    return subprocess.run([str(Path(sys.executable).parent / "ernie-dpo"), "fetch", "--endpoint", endpoint, "--retries", "1", *extra],
                          cwd=repo, env=venv_env(), capture_output=True, text=True)


def test_fetch_script_pins_on_first_use_then_refuses_a_changed_file(run_stage, hub):
    repo = run_stage.root
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    h = hub(DATA)
    r = fetch(repo, h.url)
    assert r.returncode == 0, r.stderr
    pin = json.loads((repo / "data/raw/dpo_en.source.json").read_text())
    assert (pin["commit"], pin["sha256"], pin["bytes"]) == (COMMIT, hashlib.sha256(DATA).hexdigest(), len(DATA))
    assert (repo / "data/raw/dpo_en.json.dvc").exists()  # DVC tracks it: downloaded once, shared by `dvc push`
    assert fetch(repo, h.url).returncode == 0 and len(h.requests) == 2  # already here and verified: no download
    assert h.requests[-1] == "/blob/dpo_en.json"

    (repo / "data/raw/dpo_en.json").unlink()
    h2 = hub(DATA.replace(b"Hi.", b"Yo."))  # the file changed upstream
    r = fetch(repo, h2.url, "--no-dvc-add")
    assert r.returncode != 0 and "checksum mismatch" in r.stderr and "data.raw_path" in r.stderr
    assert f"/resolve/{COMMIT}/" in h2.requests[0]  # the pinned commit is asked for, not "main"
    assert not (repo / "data/raw/dpo_en.json").exists()

    r = fetch(repo, f"http://127.0.0.1:{free_port()}", "--no-dvc-add")
    assert r.returncode != 0 and "cannot download" in r.stderr and "HF_ENDPOINT" in r.stderr
