"""A newcomer's path: a small file of your own in any supported format runs to the end with the documented command,
a misspelt -S key gets the project's answer before anything runs, and a preview says what an experiment would run."""
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, copy_repo, venv_env

ERNIE_DPO = str(Path(sys.executable).parent / "ernie-dpo")


def sh(args, cwd, check=True, timeout=None):
    r = subprocess.run(args, cwd=cwd, env=venv_env(), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def real_pairs(n, seed=7):
    """n real preference pairs (LLaMA-Factory's dpo_en_demo, data/real/), single-turn, as (prompt, chosen, rejected)."""
    rows = json.loads((ROOT / "data/real/dpo_en_demo.json").read_text())
    rows = [r for r in rows if len(r["conversations"]) == 1]
    random.Random(seed).shuffle(rows)
    return [(r["conversations"][0]["value"], r["chosen"]["value"], r["rejected"]["value"]) for r in rows[:n]]


def as_format(fmt, pairs):
    """The same pairs in each input format the README names (docs/data_formats.md has one record of each)."""
    if fmt == "sharegpt":
        return [{"conversations": [{"from": "human", "value": p}], "chosen": {"from": "gpt", "value": c},
                 "rejected": {"from": "gpt", "value": r}} for p, c, r in pairs]
    if fmt == "trl":
        return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
    if fmt == "alpaca":
        return [{"instruction": p, "input": "", "chosen": c, "rejected": r} for p, c, r in pairs]
    if fmt == "openai":
        return [{"messages": [{"role": "user", "content": p}], "chosen": {"role": "assistant", "content": c},
                 "rejected": {"role": "assistant", "content": r}} for p, c, r in pairs]
    if fmt == "erniekit":
        return [{"src": [p], "tgt": [], "response": [[c], [r]], "sort": [1, 0]} for p, c, r in pairs]
    raise ValueError(fmt)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("newcomer") / "repo")
    sh(["git", "init", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"], repo)
    return repo


FORMATS = [("sharegpt", "json"), ("trl", "jsonl"), ("alpaca", "json"), ("openai", "jsonl"), ("erniekit", "jsonl")]


@pytest.mark.parametrize("fmt,ext", FORMATS, ids=[f for f, _ in FORMATS])
def test_a_30_record_file_of_your_own_runs_to_the_end_with_the_documented_command(clone, fmt, ext):
    """README "Your own data": `dvc exp run -S data.raw_path=FILE` on the demo profile, a 30-record file of real
    pairs (long answers) in each supported format: the test and validation sets shrink to what the file allows (with
    a warning naming the sizes and the override), long pairs are cut to fit, and the run reaches evaluate_tuned."""
    records = as_format(fmt, real_pairs(30))
    path = clone / f"data/own_{fmt}.{ext}"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n" if ext == "jsonl" else json.dumps(records))
    r = sh([sys.executable, "-m", "dvc", "exp", "run", "-S", f"data.raw_path=data/own_{fmt}.{ext}"], clone,
           check=False)
    assert r.returncode == 0, f"{fmt}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = r.stdout + r.stderr
    assert "testset.size 60" in out and "-S testset.size=N" in out  # the warning names the sizes and the override
    prepared = json.loads((clone / "metrics/prepare.json").read_text())["prepare"]
    testset = json.loads((clone / "metrics/testset.json").read_text())["testset"]
    tuned = json.loads((clone / "metrics/tuned.json").read_text())
    assert prepared["data_format"] == fmt and prepared["records_kept"] == 30
    assert testset["sizes_adapted_to_data"] and 1 <= testset["prompts"] < 30 and testset["validation_prompts"] >= 1
    assert tuned["tuned"]["replies"] == testset["prompts"] and "verdict" in tuned["delta"]


def test_a_misspelt_key_gets_the_projects_answer_before_anything_runs(clone):
    start = time.time()
    r = sh([ERNIE_DPO, "run", "-S", "train.lerning_rate=1e-5"], clone, check=False)
    assert r.returncode != 0 and "did you mean train.learning_rate?" in r.stderr, r.stderr
    assert "nothing was run" in r.stderr and time.time() - start < 60
    r = sh([ERNIE_DPO, "run", "-S", "+train.lerning_rate=1e-5"], clone, check=False)
    assert r.returncode != 0 and "nothing reads" in r.stderr  # Hydra's advice (+key) would make it a silent new key
    r = sh([ERNIE_DPO, "preview", "-S", "profile=smoll"], clone, check=False)
    assert r.returncode != 0 and "did you mean profile=smol?" in r.stderr
    r = sh([ERNIE_DPO, "run", "-S", "train.learning_rate=abc"], clone, check=False)
    assert r.returncode != 0 and "train.learning_rate: 'abc' must be a number" in r.stderr, r.stderr


def test_dvc_itself_rejects_the_misspelt_key_with_the_message_the_readme_explains(clone):
    """The README's troubleshooting line quotes DVC's own words for a misspelt -S key: they must still be DVC's."""
    r = sh([sys.executable, "-m", "dvc", "exp", "run", "-S", "train.lerning_rate=1e-5"], clone, check=False)
    assert r.returncode != 0 and "Could not override 'train.lerning_rate'" in r.stdout + r.stderr
    assert "Could not override" in (ROOT / "README.md").read_text()


def test_the_preview_names_what_an_experiment_would_run_on_a_clean_clone(tmp_path):
    """A clean clone: dvc.lock is committed but no data or model is there (nor in a cache). `dvc exp run --dry` and
    `dvc repro --dry --allow-missing` fail here once a parameter changes; the project's preview does not."""
    repo = copy_repo(tmp_path / "repo")
    sh(["git", "init", "-q"], repo)  # a clone is a git repository (DVC's status needs one)
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"], repo)
    r = sh([ERNIE_DPO, "preview", "-S", "trainset.min_ratio=2.0"], repo)
    lines = {line.split(":")[0].strip(): line for line in r.stdout.splitlines() if line.startswith("  ")}
    assert "trainset.min_ratio: 1.2 -> 2.0" in lines["trainset"]
    assert "neither in the workspace nor in the DVC cache" in lines["prepare"]  # nothing was ever pulled here
    assert "after trainset" in lines["diagnose"] and set(lines) >= {"train", "merge", "infer_tuned", "evaluate_tuned"}
    assert "dvc exp run -S trainset.min_ratio=2.0 trainset" in r.stdout  # only the first stages, documented
