import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # tests read the bundled sample by its repo path


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
        result = subprocess.run([sys.executable, f"stages/{stage}.py", *args], cwd=self.root, env=venv_env(),
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
