import os
import shutil
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

# A shell starts a background job (`.ci/run &`, nohup) with SIGINT ignored, and an ignored signal is inherited by
# every child: the stages would then never see the Ctrl-C the tests send. A handled SIGINT here is reset to the
# default in each child, as in a terminal.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # tests read the bundled sample by its repo path

from ernie_dpo import runtime  # noqa: E402

runtime.setup()  # as every stage does: quiet imports, Agg plots, MKL's fast path on AMD CPUs


def repo_files():
    """The files git tracks (what a fresh clone has)."""
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def copy_repo(dest):
    for f in repo_files():
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)
    return dest


def venv_env():
    """PATH with this interpreter's bin first, so `python` and `dvc` in dvc.yaml are this environment's."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    for k in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):  # CI machines may have no git identity
        env.setdefault(k, "pipeline-test")
    for k in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        env.setdefault(k, "pipeline-test@example.invalid")
    return env


class StageRunner:
    """Runs stage scripts in a copy of the repo, as `dvc repro` would (cwd = repo root)."""

    def __init__(self, root):
        self.root = root

    def __call__(self, stage, check=True, args=()):
        result = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=self.root, env=venv_env(),
                                capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"stage {stage} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def set_param(self, dotted, value):
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        node = params
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = value
        path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def run_stage(tmp_path):
    return StageRunner(copy_repo(tmp_path / "repo"))


@pytest.fixture(scope="session")
def sample_records():
    from ernie_dpo.data import load_sharegpt, prepare_records

    kept, _, _ = prepare_records(load_sharegpt(ROOT / "data/sample/sharegpt_dpo_sample.json"))
    return kept


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, sample_records):
    """A tiny ERNIE-4.5 model after a 10-step warm-up on the real engine: enough for code paths, not for answers."""
    from ernie_dpo import engine, launch, tiny
    from ernie_dpo.common import write_jsonl

    root = tmp_path_factory.mktemp("tiny")
    tiny.train_tokenizer(tiny.corpus_texts(sample_records), root / "init", 600)
    tiny.build_random_model(root / "init", 600, 64, 1, 4, 2, seed=1)
    write_jsonl(root / "sft.jsonl", tiny.sft_records(sample_records[:80]))
    cfg = engine.sft_config(root / "init", root / "sft.jsonl", root / "base", "cpu", 1, 128, 10, 3e-3, 8)
    launch.run(launch.launch_command("train", engine.write_config(cfg, root / "sft.yaml"), "cpu"), root / "sft.log")
    return root / "base"


@pytest.fixture
def tiny_repo(run_stage, tiny_base):
    """A repo copy with the tiny model as models/base, a 12-prompt test set, short replies in batches of 2."""
    shutil.copytree(tiny_base, run_stage.root / "models/base")
    run_stage.set_param("testset.size", 12)
    run_stage.set_param("infer.batch_size", 2)
    run_stage.set_param("infer.max_dec_len", 24)
    run_stage("prepare")
    run_stage("testset")
    return run_stage


def free_port():
    """A loopback port nothing listens on (right now): the managed backend's own helper."""
    from ernie_dpo.managed import free_port as pick

    return pick()


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 (a free port) running `handler` in a thread until close()."""

    def __init__(self, handler, path=""):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}{path}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
