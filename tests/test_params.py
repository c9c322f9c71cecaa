"""Wrong parameters stop in seconds, naming the key, the value and what is allowed; stage scripts are safe to poke."""
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, copy_repo, venv_env

from ernie_dpo.params import SCHEMA, problems

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_value(dotted, value):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    node = p
    *parents, leaf = dotted.split(".")
    for k in parents:
        node = node[k]
    node[leaf] = value
    return p


def test_the_committed_params_and_every_profile_are_valid(tmp_path):
    from test_docs import compose

    assert problems(PARAMS) == []
    for profile in ("demo", "smol", "cookbook"):
        assert problems(compose([f"profile={profile}"], tmp_path)) == [], profile


@pytest.mark.parametrize("key, value, words", [
    ("train.max_steps", "abc", "train.max_steps: 'abc' must be an integer >= 1"),
    ("train.max_steps", -5, "train.max_steps: -5 must be an integer >= 1"),
    ("train.fine_tuning", "qlora", "train.fine_tuning: 'qlora' must be one of lora, full"),
    ("trainset.min_ratio", "two", "trainset.min_ratio: 'two' must be a number > 0"),
    ("infer.top_p", 1.5, "infer.top_p: 1.5 must be a number > 0 and <= 1"),
    ("engine.gpus", 0, "engine.gpus: 0 must be an integer >= 1"),
    ("train.truncate", "yes", "train.truncate: 'yes' must be true or false"),
    ("train.max_prompt_len", 4096, "train.max_prompt_len (4096) must be smaller than train.max_seq_len"),
])
def test_a_wrong_value_is_named_with_what_is_allowed(key, value, words):
    found = problems(with_value(key, value))
    assert any(words in f for f in found), found


def test_an_unknown_key_is_refused_with_the_nearest_name():
    p = with_value("train.max_step", 3)  # what Hydra's "use +train.max_step=3" advice adds
    assert problems(p) == ["train.max_step: unknown parameter (did you mean train.max_steps?); nothing reads it"]
    assert set(SCHEMA) >= {".".join(k) for k in [("train", "max_steps"), ("infer", "top_p")]}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("params") / "repo")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)  # `dvc exp run` needs a commit to start from
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], cwd=repo, check=True)
    return repo


@pytest.mark.parametrize("override, words", [
    ("train.max_steps=abc", "train.max_steps: 'abc' must be an integer >= 1"),
    ("+train.max_step=3", "train.max_step: unknown parameter (did you mean train.max_steps?)"),
])
def test_dvc_exp_run_with_a_wrong_value_stops_in_seconds(repo, override, words):
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-S", override], cwd=repo,
                       env=venv_env(), capture_output=True, text=True, timeout=120)
    secs = time.time() - start
    assert r.returncode != 0 and words in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    assert "nothing was run" in r.stdout + r.stderr
    assert secs < 10, secs


STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("stage", STAGES)
def test_help_on_a_stage_script_describes_it_and_runs_nothing(repo, stage):
    (repo / "models/base").mkdir(parents=True, exist_ok=True)
    marker = repo / "models/base/keep-me"
    marker.write_text("untouched")
    metrics = {p: p.read_bytes() for p in (repo / "metrics").glob("*.json")}
    r = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--help"], cwd=repo, env=venv_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m stages."), r.stderr[-1000:]
    assert "dvc.yaml stage" in r.stdout and "inputs:" in r.stdout and "params:" in r.stdout
    assert marker.read_text() == "untouched"
    assert {p: p.read_bytes() for p in (repo / "metrics").glob("*.json")} == metrics  # no stage wrote anything


def test_every_parameter_is_declared_once_and_conf_is_generated_from_it():
    """(issue 34) ernie_dpo/params.py's SCHEMA is the one declaration of each key (type, allowed values, default,
    one line of help): conf/config.yaml is generated from it, and dvc.yaml's params lists only name declared keys."""
    import yaml
    from conftest import ROOT

    from ernie_dpo import params

    assert (ROOT / "conf/config.yaml").read_text() == params.config_yaml(), \
        "conf/config.yaml differs from SCHEMA: run `python -m ernie_dpo.params --write`"
    assert all(rule.help for rule in params.SCHEMA.values())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    listed = {p for st in stages.values() for p in st.get("params", [])}
    assert listed - set(params.SCHEMA) == set()
