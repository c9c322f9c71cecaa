"""Kill real stage processes with a real signal, run the stage again, and check nothing is lost or redone."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import venv_env


def start(root, args):
    # own process group, so the kill reaches the engine subprocess too (as Ctrl-C or a scheduler would)
    return subprocess.Popen([sys.executable, *args], cwd=root, env=venv_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_when(proc, condition, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"the process ended before it could be interrupted:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the condition to interrupt on never came")


def test_killed_inference_resumes_without_regenerating(tiny_repo):
    repo = tiny_repo
    root = repo.root
    partial = root / "data/infer/partial"
    lines = lambda: sum(f.read_text().count("\n") for f in partial.glob("*.jsonl")) if partial.exists() else 0
    proc = start(root, ["-m", "stages.infer", "--model", "models/base", "--out", "data/infer/baseline.jsonl"])
    kill_when(proc, lambda: lines() >= 2)  # killed after its first batch, mid-run
    done_before = lines()
    assert 2 <= done_before < 12 and not (root / "data/infer/baseline.jsonl").exists()

    r = repo("infer", args=["--model", "models/base", "--out", "data/infer/baseline.jsonl"])
    assert f"resuming: {done_before} of 12 prompts already answered" in r.stderr
    out = [json.loads(x) for x in (root / "data/infer/baseline.jsonl").read_text().splitlines()]
    test_ids = [json.loads(x)["id"] for x in (root / "data/testset/testset.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == test_ids  # complete, in test-set order, each prompt once
    assert all(o["messages"][-1]["role"] == "assistant" and o["finish_reason"] in ("eos", "length") for o in out)

    # the same as a run that was never interrupted
    shutil.rmtree(partial)
    repo("infer", args=["--model", "models/base", "--out", "data/infer/fresh.jsonl"])
    assert (root / "data/infer/fresh.jsonl").read_text() == (root / "data/infer/baseline.jsonl").read_text()


def test_killed_training_resumes_from_its_checkpoint(tiny_repo):
    repo = tiny_repo
    root = repo.root
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/baseline.json").write_text('{"baseline": {"chars_mean": 50}}')  # trainset needs it only for near_baseline
    repo("trainset")
    for key, value in {"train.max_steps": 200, "train.warmup_steps": 1, "train.save_steps": 5, "train.global_batch_size": 8,
                       "train.fine_tuning": "lora", "train.learning_rate": 1e-3, "train.max_seq_len": 128,
                       "train.max_prompt_len": 64, "train.max_skipped_share": 1.0}.items():
        repo.set_param(key, value)
    # the engine writes a checkpoint's LR scheduler state last (after weights, trainer state, RNG, optimizer)
    ckpt = lambda: list((root / "checkpoints").glob("train-*/checkpoint-*/scheduler.pdparams"))
    (root / "checkpoints").mkdir()
    proc = start(root, ["-m", "stages.train"])
    kill_when(proc, lambda: bool(ckpt()))  # killed right after its first checkpoint
    assert not (root / "models/train").exists()
    work = ckpt()[0].parent.parent
    assert int(ckpt()[0].parent.name.split("-")[1]) < 200  # killed mid-run
    shutil.copytree(work, root / "killed")  # kept for the second half

    r = repo("train")
    assert "resuming from checkpoints/train-" in r.stderr
    log = (root / "logs/train/engine.log").read_text()
    assert "Checkpoint detected, resuming training" in log
    assert "global_step: 1," not in log  # the resumed run did not start over
    assert "global_step: 200," in log
    assert (root / "models/train/lora_config.json").exists() and not any((root / "models/train").glob("checkpoint-*"))
    assert json.loads((root / "metrics/train.json").read_text())["dpo"]["steps_done"] == 200
    assert not list((root / "checkpoints").iterdir())  # the work folder is removed once the model is out

    # A run killed WHILE saving leaves a checkpoint without optimizer and scheduler state (seen under load: killed
    # after trainer_state.bin, before the optimizer index); the engine would pick it and fail on every rerun.
    shutil.copytree(root / "killed", work)
    for f in work.glob("checkpoint-*/*"):
        if f.name.startswith(("optimizer", "scheduler")):
            f.unlink()
    r = repo("train")
    assert "incomplete (the run was killed while saving it)" in r.stderr and "resuming from" not in r.stderr
    assert "global_step: 1," in (root / "logs/train/engine.log").read_text()  # started afresh, and finished:
    assert json.loads((root / "metrics/train.json").read_text())["dpo"]["steps_done"] == 200




def test_a_stopped_stage_ends_its_engine_process_group(tiny_repo):
    """SIGTERM (what dvc or a scheduler sends) or Ctrl-C to the STAGE, not its group: the engine must not outlive it."""
    import psutil

    repo = tiny_repo
    root = repo.root
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/baseline.json").write_text('{"baseline": {"chars_mean": 50}}')
    repo("trainset")
    for key, value in {"train.max_steps": 5000, "train.fine_tuning": "lora", "train.max_seq_len": 128,
                       "train.max_prompt_len": 64,
                       "train.max_skipped_share": 1.0}.items():
        repo.set_param(key, value)
    log = root / "logs/train/engine.log"
    for sig in (signal.SIGTERM, signal.SIGINT):
        log.unlink(missing_ok=True)  # the previous round's log must not count as this one's progress
        err = root / "train.stderr"
        with open(err, "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=venv_env(),
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.time() + 180
            while not (log.exists() and "global_step: 2," in log.read_text()):  # the engine is training
                assert proc.poll() is None and time.time() < deadline, f"training never started:\n{err.read_text()[-3000:]}"
                time.sleep(0.2)
            engine_procs = psutil.Process(proc.pid).children(recursive=True)
            assert engine_procs, (proc.poll(), log.read_text()[-2000:])
        except BaseException:  # never leave a 5000-step training behind a failed test
            try:
                for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
                    p.kill()
            except psutil.NoSuchProcess:
                pass
            raise
        proc.send_signal(sig)
        start = time.time()
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(engine_procs, timeout=15)
        assert alive == [], f"engine processes left running after {sig!r}: {alive}"
        assert time.time() - start < 20
        assert not (root / "models/train").exists()


def test_training_refuses_when_most_pairs_would_be_skipped(tiny_repo):
    repo = tiny_repo
    (repo.root / "metrics").mkdir(exist_ok=True)
    (repo.root / "metrics/baseline.json").write_text('{"baseline": {"chars_mean": 50}}')
    repo("trainset")
    repo.set_param("train.max_seq_len", 64)
    repo.set_param("train.max_prompt_len", 32)
    repo.set_param("train.truncate", False)  # drop what does not fit (the demo profile cuts it to fit instead)
    r = repo("train", check=False)
    assert r.returncode != 0 and "cannot be used (longer than train.max_seq_len 64" in r.stderr, r.stderr[-2000:]
    assert "more than train.max_skipped_share 0.5" in r.stderr and not (repo.root / "models/train").exists()
