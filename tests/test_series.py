"""The recipe's series plan and the report table, on numbers whose right answer is known."""
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import venv_env

from ernie_dpo import series
from ernie_dpo.report import ReportError, compare, render, table
from ernie_dpo.series import count_pairs, plan


def test_plan_on_the_recipe_numbers_gives_the_recipe_settings():
    """Recipe (batch 1): exp1/exp2 614 pairs, 614 steps, warmup 50; exp3 1804 steps; exp4 3608 steps, warmup 360."""
    p = plan({"near_baseline": 614, "ratio_1.2": 5000, "ratio_2": 1804}, global_batch_size=1, warmup_steps=50)
    assert p["exp1"] == {"trainset.strategy": "near_baseline", "trainset.min_ratio": 1.2, "trainset.size": 0,
                         "train.max_steps": 614, "train.warmup_steps": 50}
    assert p["exp2"]["trainset.size"] == 614 and p["exp2"]["train.max_steps"] == 614  # equal size to exp1
    assert (p["exp3"]["trainset.min_ratio"], p["exp3"]["train.max_steps"], p["exp3"]["train.warmup_steps"]) == (2.0, 1804, 50)
    assert (p["exp4"]["train.max_steps"], p["exp4"]["train.warmup_steps"]) == (3608, 360)
    # every experiment sets every varied key, so nothing is inherited from whatever ran before
    assert all(set(v) == set(p["exp1"]) for v in p.values())


def test_plan_counts_epochs_not_pairs_at_a_larger_batch():
    p = plan({"near_baseline": 103, "ratio_1.2": 210, "ratio_2": 110}, global_batch_size=8, warmup_steps=4)
    assert [p[n]["train.max_steps"] for n in ("exp1", "exp2", "exp3", "exp4")] == [13, 13, 14, 28]
    assert p["exp4"]["train.warmup_steps"] == 2


def test_plan_refuses_an_empty_variant():
    with pytest.raises(ValueError, match="baseline_tolerance"):
        plan({"near_baseline": 0, "ratio_1.2": 10, "ratio_2": 5}, 1, 50)


def test_a_variant_with_one_prompt_trains_it_and_with_none_the_plan_says_why(sample_records):
    # only one record has rejected >= 2x chosen: a held-out share of one prompt holds nothing out (the trainset stage
    # warns), so it is trained; with none, the plan stops and says which rule left nothing
    one = next(r for r in sample_records if len(r["response"][1][0]) >= 2 * len(r["response"][0][0]))
    short = [r for r in sample_records if len(r["response"][1][0]) < 2 * len(r["response"][0][0])]
    c = count_pairs(short + [one], baseline_mean=90.0, tolerance=0.3, eval_pairs=0.1)
    assert c["ratio_2"] == 1 and c["ratio_1.2"] > 0
    none = count_pairs(short, baseline_mean=90.0, tolerance=0.3, eval_pairs=0.1)
    assert none["ratio_2"] == 0
    with pytest.raises(ValueError, match="rejected >= 2x chosen"):
        plan(none, 1, 50)
    with pytest.raises(ValueError, match="exp2 needs 7 pairs"):
        plan({"near_baseline": 7, "ratio_1.2": 6, "ratio_2": 5}, 1, 50)


def test_counts_use_string_lengths(sample_records):
    c = count_pairs(sample_records, baseline_mean=90.0, tolerance=0.3)
    assert c["ratio_2"] < c["ratio_1.2"] and 0 < c["near_baseline"] <= c["ratio_1.2"]


def row(name, mean, median, **extra):
    r = {"Experiment": name, "typ": "branch_commit", "rev": "abc", "model.name_or_path": "tiny",
         "data.raw_path": "data/sample/dpo_sample.jsonl",
         "baseline.chars_mean": 93.2, "baseline.chars_median": 76.0, "baseline.replies": 60, "infer.top_p": 0.7,
         "infer.temperature": 0.7, "infer.max_dec_len": 160, "evaluate.bootstrap_samples": 2000,
         "trainset.strategy": "ratio", "trainset.min_ratio": 1.2, "trainset.baseline_tolerance": 0.3,
         "trainset.pairs": 103, "train.fine_tuning": "full", "train.max_steps": 13, "train.warmup_steps": 4,
         "train.global_batch_size": 8, "train.learning_rate": 5e-5, "tuned.chars_mean": mean, "tuned.chars_median": median,
         "delta.chars_mean": mean - 93.2, "delta.chars_mean_ci_low": -1.0, "delta.chars_mean_ci_high": 1.0,
         "delta.chars_median": median - 76, "delta.chars_median_ci_low": -2.0, "delta.chars_median_ci_high": 2.0,
         "probes_baseline.pass_rate": 0.2, "probes_tuned.pass_rate": 0.25, "probes_tuned.retention": 1.25}
    r.update(extra)
    return r


def test_report_rows_follow_the_recipe_layout_and_name_what_is_missing():
    rows = [row("exp2", 80.0, 50.0), row("exp4", 40.5, 30.0, **{"trainset.min_ratio": 2.0})]
    body, problems, _ = table(rows, ["exp1", "exp2", "exp3", "exp4"])
    assert [r[0] for r in body] == ["exp0", "exp1", "exp2", "exp3", "exp4"]
    assert body[0][3:5] == ["93.2", "76.0"] and body[2][3:5] == ["80.0", "50.0"] and body[4][3:5] == ["40.5", "30.0"]
    assert body[4][1] == "rejected ≥ 2× chosen, 103 pairs" and body[1][1] == "not run"
    assert problems == ["exp1: no finished experiment of that name", "exp3: no finished experiment of that name"]
    text = render([{"typ": "baseline", "rev": "abc1234ffff"}] + rows, ["exp2", "exp4"])
    assert "experiments of commit abc1234" in text
    assert "tiny demo model" in text and "| exp4 " in text and "888.8" in text  # recipe reference shown apart
    assert "Data: `data/sample/dpo_sample.jsonl`" in text  # every number says which model and which data
    for published in ("888.8", "879.5", "864.7", "1145.1", "628.1", "| 515 ", "| 442 ", "| 354 ", "| 412 ", "| 331 "):
        assert published in text, published  # all five recipe rows, as published


def test_null_metrics_show_as_a_dash():
    rows = [row("exp2", 50.0, 40.0, **{"probes_tuned.retention": "None", "probes_baseline.pass_rate": None})]
    body, _, _ = table(rows, ["exp2"])
    assert body[0][7] == "—" and body[1][8] == "—"


def test_file_prefixed_columns_are_read_too():
    r = row("exp2", 50.0, 40.0)
    r["params.yaml:train.learning_rate"] = r.pop("train.learning_rate")
    r["metrics/train.json:train.learning_rate"] = 0.0  # an older commit's metric of the same name
    body, _, _ = table([r], ["exp2"])
    assert "lr 5e-05" in body[1][2]


def test_the_newest_commit_s_experiment_wins():
    rows = [{"typ": "baseline", "rev": "new"}, row("exp2", 50.0, 40.0),
            {"typ": "baseline", "rev": "old"}, row("exp2", 80.0, 70.0)]
    body, _, _ = table(rows, ["exp2"])
    assert body[1][3] == "50.0"


def test_the_recipe_questions_are_paired_comparisons_with_a_verdict_only_when_the_interval_excludes_zero():
    base = [50 + 37 * (k % 7) for k in range(40)]  # varied lengths, as real replies are
    lengths = {"exp0": base, "exp1": base, "exp2": [x - 20 for x in base], "exp3": [x - 20 for x in base],
               "exp4": [x + 30 for x in base]}
    c = {(r["later"], r["earlier"]): r for r in compare(lengths, 500, 0)}
    assert list(c) == [("exp2", "exp1"), ("exp3", "exp2"), ("exp3", "exp0"), ("exp4", "exp3")]
    # exp2 is 20 chars shorter than exp1 on every prompt: the interval is exactly that; the recipe's exp2 was shorter
    assert c["exp2", "exp1"]["mean"] == {"delta": -20.0, "ci_low": -20.0, "ci_high": -20.0, "recipe_delta": -14.8,
                                         "verdict": "replicates"}
    assert c["exp2", "exp1"]["median"]["recipe_delta"] == -88.0
    assert c["exp3", "exp2"]["mean"]["verdict"] == "undecided (interval includes 0)"  # identical replies
    # exp3 vs the base model: shorter here; the recipe's mean got longer (+256.3) but its median shorter (-103.0)
    assert c["exp3", "exp0"]["mean"]["verdict"] == "opposite of the recipe"
    assert c["exp3", "exp0"]["median"]["verdict"] == "replicates"
    assert c["exp4", "exp3"]["mean"]["delta"] == 50.0 and c["exp4", "exp3"]["mean"]["verdict"] == "opposite of the recipe"
    # an experiment that did not run: its questions are left out, not answered
    assert [(r["later"], r["earlier"]) for r in compare({k: lengths[k] for k in ("exp0", "exp2", "exp3")}, 100, 0)] \
        == [("exp3", "exp2"), ("exp3", "exp0")]
    text = render([row("exp2", 80.0, 50.0), row("exp4", 40.0, 30.0)], ["exp2", "exp4"],
                  comparisons=compare(lengths, 500, 0))
    assert "| exp2 − exp1 | ≥ 1.2× pairs vs near-baseline pairs, same size and steps: shorter? | " \
           "-20.0 [-20.0, -20.0] vs -14.8: replicates |" in " ".join(text.split())  # tabulate pads the cells


def test_report_refuses_experiments_with_different_baselines():
    rows = [row("exp2", 80.0, 50.0), row("exp4", 40.0, 30.0, **{"baseline.chars_mean": 120.0})]
    with pytest.raises(ReportError, match="do not share one baseline"):
        table(rows, ["exp2", "exp4"])


# ------------------------------------------------------------------------------ one queue worker per GPU (issue 31)

ERNIE_DPO = str(Path(sys.executable).parent / "ernie-dpo")


def test_gpus_become_device_groups():
    assert series.device_groups("0,1,2,3") == ["0", "1", "2", "3"]
    assert series.device_groups("4, 5,6,7", per_experiment=2) == ["4,5", "6,7"]
    assert series.device_groups("GPU-8f1c,GPU-77aa") == ["GPU-8f1c", "GPU-77aa"]
    for bad in ("0,0", "a,b", "", "0,1,2"):
        with pytest.raises(ValueError):
            series.device_groups(bad, per_experiment=2 if bad == "0,1,2" else 1)


def git_commit_all(root):
    env = venv_env()
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)


def test_series_gpus_dry_run_prints_commands_that_parse_and_compose_without_a_gpu_id(run_stage, tmp_path):
    from dvc.cli import parse_args
    from dvc.utils.hydra import compose_and_dump

    run_stage("prepare")
    run_stage("testset")
    # the workspace's batch differs from the demo profile's (as after `dvc exp run -S train.global_batch_size=3`):
    # the steps are planned for it, so every experiment must train with it, not with the profile's value
    params = yaml.safe_load((run_stage.root / "params.yaml").read_text())
    assert params["train"]["global_batch_size"] != 3
    params["train"]["global_batch_size"] = 3
    (run_stage.root / "params.yaml").write_text(yaml.safe_dump(params))
    git_commit_all(run_stage.root)
    r = subprocess.run([ERNIE_DPO, "series", "--gpus", "0,1,2", "--dry"], cwd=run_stage.root, env=venv_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line for line in lines if line.startswith("#")] == [
        "# queue worker 1: CUDA_VISIBLE_DEVICES=0", "# queue worker 2: CUDA_VISIBLE_DEVICES=1",
        "# queue worker 3: CUDA_VISIBLE_DEVICES=2"]
    queued = [shlex.split(line) for line in lines if line.startswith("dvc exp run --queue")]
    assert [q[q.index("-n") + 1] for q in queued] == ["exp1", "exp2", "exp3", "exp4"]
    for argv in queued:
        parse_args(argv[1:])  # DVC's own parser
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
        assert not any("CUDA" in s or "devices" in s for s in sets)  # which GPU is no parameter
        out = tmp_path / f"{argv[argv.index('-n') + 1]}.yaml"
        compose_and_dump(out, str(run_stage.root / "conf"), None, "config", str(run_stage.root), sets)
        composed = yaml.safe_load(out.read_text())
        assert composed["engine"]["gpus"] == 1 and "devices" not in composed["engine"]
        assert composed["train"]["global_batch_size"] == 3
        for key in ("baseline_tolerance", "eval_pairs", "seed"):
            assert composed["trainset"][key] == params["trainset"][key]
    only = subprocess.run([ERNIE_DPO, "series", "--only", "exp3", "--dry"], cwd=run_stage.root, env=venv_env(),
                          capture_output=True, text=True)
    assert only.returncode == 0, only.stderr
    assert [shlex.split(x)[shlex.split(x).index("-n") + 1] for x in only.stdout.splitlines()
            if x.startswith("dvc exp run --queue")] == ["exp3"]
    assert only.stdout.count("# queue worker") == 1
    bad = subprocess.run([ERNIE_DPO, "series", "--gpus", "0,1", "--jobs", "3", "--dry"], cwd=run_stage.root,
                         env=venv_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "--gpus already runs one experiment per group" in bad.stderr
    bad = subprocess.run([ERNIE_DPO, "series", "--only", "exp9", "--dry"], cwd=run_stage.root, env=venv_env(),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown experiment(s) exp9" in bad.stderr


TOY_STAGE = """import json, os, sys, time, yaml
p = yaml.safe_load(open("params.yaml"))
start = time.time()
time.sleep(p["exp"]["seconds"])
if p["exp"]["fail"]:
    sys.exit("toy stage: failing on purpose")
json.dump({"run": {"start": start, "end": time.time(), "pid": os.getpid(),
                   "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}}, open("run.json", "w"))
"""


@pytest.fixture
def toy_repo(tmp_path, monkeypatch):
    """A tiny Hydra-composed DVC project whose one stage sleeps and records when and on which GPU it ran: the real
    queue, in seconds."""
    root = tmp_path / "toy"
    (root / "conf/profile").mkdir(parents=True)
    (root / "conf/config.yaml").write_text("defaults:\n  - _self_\n  - profile: demo\nengine:\n  gpus: 1\n"
                                           "exp:\n  seconds: 0\n  id: 0\n  fail: 0\n")
    (root / "conf/profile/demo.yaml").write_text("# @package _global_\nprofile_name: demo\n")
    (root / "stage.py").write_text(TOY_STAGE)
    (root / "dvc.yaml").write_text("stages:\n  work:\n    cmd: python stage.py\n    deps: [stage.py]\n"
                                   "    params: [engine.gpus, exp.seconds, exp.id, exp.fail]\n"
                                   "    metrics: [{run.json: {cache: false}}]\n")
    env = venv_env()
    subprocess.run(["git", "init", "-q"], cwd=root, env=env, check=True)
    for args in (["init", "-q"], ["config", "hydra.enabled", "true"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, check=True, capture_output=True)
    git_commit_all(root)
    monkeypatch.chdir(root)  # series runs dvc in the current folder, as `ernie-dpo series` does
    monkeypatch.setenv("PATH", env["PATH"])  # `dvc` and `python` of the workers: this environment's
    return root


def shown_runs():
    """{experiment name: (rev, its run.json)} of the experiments that finished (a failed one has no metrics)."""
    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True,
                                      text=True, check=True).stdout)
    out = {}
    for r in (r for c in shown for e in (c.get("experiments") or []) for r in e["revs"]):
        run = (((r.get("data") or {}).get("metrics") or {}).get("run.json") or {}).get("data", {}).get("run")
        if run:
            out[r["name"]] = (r["rev"], run)
    return out


def test_a_queue_worker_per_gpu_keeps_every_gpu_busy_reports_a_failure_at_once_and_reruns_one(toy_repo):
    """(31.2, 31.3) Two GPU workers and four experiments: e1 is long, e2 fails at once, e3 and e4 are short. Each
    runs under its worker's CUDA_VISIBLE_DEVICES, never two on one GPU at a time; e3 starts as soon as GPU 1 is free
    (no waves: e1 is still running); e2's failure is reported while e1 still runs; rerunning e2 alone keeps the
    others; and e1's twin queued on the OTHER GPU is one cache entry with e1 (restored, not rerun)."""
    experiments = {"e1": {"exp.seconds": 12, "exp.id": 1}, "e2": {"exp.seconds": 0, "exp.id": 2, "exp.fail": 1},
                   "e3": {"exp.seconds": 2, "exp.id": 3}, "e4": {"exp.seconds": 2, "exp.id": 4}}
    start = time.time()
    try:
        ended = series.run_local(experiments, "demo", ["0", "1"], poll_s=1)
    finally:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "stop"], capture_output=True)
    assert {n: e["status"] for n, e in ended.items()} == {"e1": "success", "e2": "failed", "e3": "success",
                                                          "e4": "success"}
    runs = {n: r for n, (_, r) in shown_runs().items()}
    assert set(runs) == {"e1", "e3", "e4"} and {r["gpu"] for r in runs.values()} == {"0", "1"}
    for a in runs:
        for b in runs:
            if a < b and runs[a]["gpu"] == runs[b]["gpu"]:  # one GPU: one experiment at a time
                assert runs[a]["end"] <= runs[b]["start"] or runs[b]["end"] <= runs[a]["start"], runs
    e1 = runs["e1"]
    other = next(r for n, r in runs.items() if n != "e1" and r["gpu"] != e1["gpu"])
    assert other["start"] < e1["end"]  # the other GPU kept working while e1 ran: no waves
    assert ended["e2"]["at"] < e1["end"]  # the failure was reported while e1 still ran
    first_revs = {n: rev for n, (rev, _) in shown_runs().items()}

    # --only: e2 alone, fixed; the others stay as they were
    subprocess.run([sys.executable, "-m", "dvc", "exp", "remove", "e2"], capture_output=True)
    again = series.run_local({"e2": {"exp.seconds": 0, "exp.id": 2, "exp.fail": 0}}, "demo", ["1"], poll_s=1)
    assert again["e2"]["status"] == "success"
    after = shown_runs()
    assert {n: after[n][0] for n in ("e1", "e3", "e4")} == {n: first_revs[n] for n in ("e1", "e3", "e4")}

    # e1 again, as e5, on the GPU it did NOT run on: same parameters, so DVC restores e1's run (its pid and start
    # time) from the run cache instead of running it: the GPU is not part of the experiment
    twin = series.run_local({"e5": experiments["e1"]}, "demo", ["1" if e1["gpu"] == "0" else "0"], poll_s=1)
    subprocess.run([sys.executable, "-m", "dvc", "queue", "stop"], capture_output=True)
    assert twin["e5"]["status"] == "success"
    assert shown_runs()["e5"][1] == e1
    print(f"toy series: {time.time() - start:.0f} s")


@pytest.mark.parametrize("report", ["metrics/report.md", "docs/results/smol_series/report.md"])
def test_the_committed_report_is_rendered_from_its_own_rows(report):
    """A committed report (the demo's metrics/report.md; the smol series' copy in docs/results/) is render() of the
    rows saved next to it (report.json): one source of truth, so a number edited by hand in the report, or a report
    left over from older experiments, fails here. The question table is computed from these rows' experiments."""
    from conftest import ROOT

    from ernie_dpo.report import render

    saved = json.loads((ROOT / report).with_suffix(".json").read_text())
    assert saved["comparisons"], "no question table: the report was made before `ernie-dpo report` wrote it"
    assert render(saved["rows"], saved["names"], saved["shas"].get, saved["comparisons"]) == \
        (ROOT / report).read_text()
