"""The whole pipeline in a real temp DVC repo: `dvc repro`, then experiments that rerun only what they must."""
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_repo, venv_env

STAGES = ["prepare", "analyze", "testset", "base_model", "infer_baseline", "evaluate_baseline", "probe_baseline",
          "trainset", "diagnose", "train", "merge", "infer_tuned", "evaluate_tuned", "probe_tuned"]


# credentials a user's shell may hold: every command of these tests runs with them set, and none may end up in any
# file of the repository, its DVC outputs or its DVC cache (test_no_credential_from_the_shell_lands_in_any_file)
CANARY = {name: f"canary-{uuid.uuid4().hex}" for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY")}


def sh(args, cwd, check=True):
    r = subprocess.run(args, cwd=cwd, env={**venv_env(), **CANARY}, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def dvc(*args, cwd, check=True):
    return sh([sys.executable, "-m", "dvc", *args], cwd, check)


def ran(output):
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def compose(repo, out, overrides=()):
    """params.yaml as `dvc exp run` composes it from conf/ (DVC's own Hydra helper)."""
    code = ("from pathlib import Path; from dvc.utils.hydra import compose_and_dump; "
            f"compose_and_dump(Path({str(out)!r}), str(Path('conf').resolve()), None, 'config', '.', {list(overrides)!r})")
    sh([sys.executable, "-c", code], repo)


def commit_all(repo, message):
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, "--allow-empty"], repo)


def test_committed_params_yaml_is_the_composed_demo_profile(tmp_path):
    compose(ROOT, tmp_path / "params.yaml")
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_lock_matches_the_code_and_params():
    """dvc.lock in git describes this code: a reviewer's `dvc repro` would only fetch, not recompute."""
    r = dvc("repro", "--dry", "--allow-missing", cwd=ROOT)
    unchanged = [line.split("'")[1] for line in r.stdout.splitlines() if line.endswith("didn't change, skipping")]
    assert unchanged == STAGES, r.stdout


def test_cookbook_profile_composes_with_the_recipe_values(tmp_path):
    compose(ROOT, tmp_path / "p.yaml", ["profile=cookbook", "train.warmup_steps=360"])
    p = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert p["model"]["name_or_path"] == "baidu/ERNIE-4.5-0.3B-PT" and p["engine"]["device"] == "gpu"
    assert p["testset"] == {"size": 200, "seed": 2025, "keep_system": False, "validation_size": 24}
    assert (p["infer"]["top_p"], p["infer"]["temperature"], p["infer"]["max_dec_len"]) == (0.7, 0.7, 8192)
    assert p["train"]["warmup_steps"] == 360 and p["train"]["global_batch_size"] == 1


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh clone-like copy with a smaller demo (fewer steps, fewer prompts), reproduced once."""
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    (repo / "dvc.lock").unlink(missing_ok=True)
    demo = repo / "conf/profile/demo.yaml"
    cfg = yaml.safe_load(demo.read_text())
    cfg["testset"]["size"] = 12
    cfg["infer"].update(max_dec_len=48, batch_size=6)
    cfg["train"] = {**cfg["train"], "max_steps": 4, "warmup_steps": 1, "length_probe_steps": 2, "eval_steps": 2}
    cfg["model"]["tiny"] = {"warmup_steps": 30}
    cfg["probes"] = {"samples": 1}
    # 48-token replies make the baseline mean ~18 chars, and only ~2 pairs have a rejected answer within ±40% of it:
    # a wider band keeps exp1 a real training set (the rule itself is tested in test_series / test_data)
    cfg["trainset"] = {**cfg.get("trainset", {}), "baseline_tolerance": 2.0}
    demo.write_text("# @package _global_\n" + yaml.safe_dump(cfg, sort_keys=False))
    compose(repo, repo / "params.yaml")
    sh(["git", "init", "-q"], repo)
    commit_all(repo, "code")
    r = dvc("repro", cwd=repo)
    assert ran(r.stdout) == STAGES
    commit_all(repo, "repro")
    return repo


def test_no_credential_from_the_shell_lands_in_any_file(repo):
    """(issue 31.1) The whole pipeline ran with credentials in its environment: not one file of the repository --
    DVC outputs, logs, the DVC cache (.dvc/cache), checkpoints -- contains any of them."""
    files = [f for f in repo.rglob("*") if f.is_file() and ".git" not in f.relative_to(repo).parts[:1]]
    assert any(".dvc/cache" in str(f) for f in files) and any("logs/train" in str(f) for f in files)
    leaks = [(str(f.relative_to(repo)), k) for f in files for k, v in CANARY.items() if v.encode() in f.read_bytes()]
    assert leaks == []


def test_repro_writes_every_metric_and_keeps_test_prompts_out(repo):
    m = {f: json.loads((repo / "metrics" / f).read_text()) for f in
         ("prepare.json", "data.json", "testset.json", "base_model.json", "baseline.json", "trainset.json",
          "pairs.json", "train.json", "tuned.json", "probes_baseline.json", "probes_tuned.json", "infer_baseline.json",
          "infer_tuned.json")}
    assert m["prepare.json"]["prepare"]["records_read"] == 480
    assert m["testset.json"]["testset"]["prompts"] == 12
    assert m["trainset.json"]["trainset"]["test_overlap"] == 0
    assert m["baseline.json"]["baseline"]["replies"] == 12 and m["baseline.json"]["baseline"]["model"] == "tiny"
    assert set(m["tuned.json"]) == {"tuned", "delta"} and "chars_median_ci_low" in m["tuned.json"]["delta"]
    assert m["train.json"]["dpo"]["steps_done"] == 4
    # pairs trained = pairs reported: every pair the trainset stage wrote is counted as trained or dropped, the
    # engine is handed exactly the trained ones, and its own log shows no skip
    dpo, pairs = m["train.json"]["dpo"], m["trainset.json"]["trainset"]["pairs"]
    assert dpo["pairs_offered"] == pairs
    assert dpo["pairs_trained"] == pairs - dpo["pairs_dropped"]
    assert dpo["pairs_dropped"] == (dpo["pairs_dropped_too_long"] + dpo["pairs_dropped_prompt_too_long"] +
                                    dpo["pairs_dropped_identical_after_truncation"] + dpo["pairs_dropped_chosen_cut"])
    # held-out pairs: the engine's own eval loop ran on them; the length probes answered their prompts from step 0
    held = [json.loads(x) for x in (repo / "data/trainset/eval.jsonl").read_text().splitlines()]
    trained = [json.loads(x) for x in (repo / "data/trainset/train.jsonl").read_text().splitlines()]
    tests = [json.loads(x) for x in (repo / "data/testset/testset.jsonl").read_text().splitlines()]
    from ernie_dpo.data import prompt_key
    keys = {prompt_key(r) for r in trained}
    assert held and not any(prompt_key(r) in keys or r["id"] in {t["id"] for t in tests} for r in held)
    assert m["trainset.json"]["trainset"]["eval_pairs_held_out"] == len(held)
    # what the engine's eval loop saw: every held-out pair once (the engine's dataset alone yields the last one twice)
    assert dpo["heldout"]["pairs_evaluated"] == dpo["heldout"]["pairs"] == len(held)
    assert 0 <= dpo["heldout"]["rewards_accuracies"] <= 1 and dpo["heldout"]["loss"] > 0
    # validation prompts: neither test nor training prompts; the probes and the held-out likelihood read them
    validation = [json.loads(x) for x in (repo / "data/testset/validation.jsonl").read_text().splitlines()]
    assert validation and not any(prompt_key(v) in keys | {prompt_key(h) for h in held} or v["id"] in
                                  {t["id"] for t in tests} for v in validation)
    assert dpo["length_probe"]["prompts"] == len(validation)
    assert m["train.json"]["likelihood"]["answers"] == len(validation)
    assert dpo["length_probe"]["probes"] >= 3 and dpo["length_probe"]["step0_chars_median"] > 0
    probe = (repo / "metrics/dvclive/plots/metrics/length_probe/chars_median.tsv").read_text().splitlines()
    assert probe[1].split("\t")[0] == "0" and len(probe) >= 4  # header + step 0 + later probes
    assert set(m["pairs.json"]["pairs"]) >= {"margin_per_token_median", "share_chosen_already_preferred", "warnings"}
    assert len((repo / "logs/train/pairs.jsonl").read_text().splitlines()) == dpo["pairs_trained"]
    assert "[SKIP]" not in (repo / "logs/train/engine.log").read_text()
    assert m["trainset.json"]["trainset"]["system_prompts_dropped"] > 0  # the recipe drops them from training
    assert not any("system" in json.loads(x) for x in (repo / "data/trainset/train.jsonl").read_text().splitlines())
    for role in ("baseline", "tuned"):
        info = json.loads((repo / f"metrics/infer_{role}.json").read_text())[f"infer_{role}"]
        assert info["top_k"] == "off" and info["threads"] >= 1 and info["device"] == "cpu", info
        assert info["stop_tokens"] == ["</s>", "<|end_of_sentence|>"] and info["prompts_generated"] == 12
    loss = (repo / "metrics/dvclive/plots/metrics/loss.tsv").read_text().splitlines()
    assert loss[0].split("\t") == ["step", "loss"] and len(loss) == 5  # header + one row per step
    assert (repo / "logs/train/dpo.yaml").exists() and "global_step: 4" in (repo / "logs/train/engine.log").read_text()
    assert m["probes_baseline.json"]["probes_baseline"]["replies"] == 28  # 28 probes x 1 sample
    assert "retention" in m["probes_tuned.json"]["probes_tuned"]
    for png in ("data_lengths.png", "reply_lengths.png", "dpo_curves.png"):
        assert (repo / "metrics/plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert (repo / "models/merged/config.json").exists()
    # every metric key is unique across files, so `dvc exp show` columns never collide
    keys = [f"{top}.{k}" for doc in m.values() for top, sub in doc.items() for k in sub]
    assert len(keys) == len(set(keys))


def test_changing_the_length_filter_reruns_only_trainset(repo):
    before = json.loads((repo / "metrics/trainset.json").read_text())["trainset"]
    r = dvc("exp", "run", "-S", "trainset.min_ratio=2.0", "trainset", cwd=repo)
    assert ran(r.stdout) == ["trainset"], r.stdout
    after = json.loads((repo / "metrics/trainset.json").read_text())["trainset"]
    assert after["pairs"] < before["pairs"] and after["test_overlap"] == 0
    rows = [json.loads(line) for line in (repo / "data/trainset/train.jsonl").read_text().splitlines()]
    assert len(rows) == after["pairs"] and all(len(r["response"][1][0]) >= 2 * len(r["response"][0][0]) for r in rows)
    sh(["git", "checkout", "--", "."], repo)  # back to the committed workspace for the next test
    dvc("checkout", "-f", cwd=repo)


def test_param_changes_are_never_answered_from_a_stale_run_cache(tmp_path):
    """Regression: with `params: [testset]` (a whole section) DVC restored a run with other values from its run cache."""
    repo = copy_repo(tmp_path / "repo")
    sh(["git", "init", "-q"], repo)
    commit_all(repo, "code")
    dvc("repro", "testset", cwd=repo)
    commit_all(repo, "repro")
    for size in (17, 19, 17):
        dvc("exp", "run", "-S", f"testset.size={size}", "testset", cwd=repo)
        lines = (repo / "data/testset/testset.jsonl").read_text().splitlines()
        assert len(lines) == size


def test_changing_warmup_reruns_only_train_and_what_follows(repo):
    """...and `ernie-dpo preview` said so before: its list is exactly the stages DVC then runs (DVC's own
    `dvc repro --dry` would list train alone: a dry run cannot know that train's outputs will change)."""
    exe = str(Path(sys.executable).parent / "ernie-dpo")
    assert "nothing would run" in sh([exe, "preview"], repo).stdout
    preview = sh([exe, "preview", "-S", "train.warmup_steps=360"], repo).stdout
    predicted = [line.split(":")[0].strip() for line in preview.splitlines() if line.startswith("  ")]
    r = dvc("exp", "run", "--temp", "-n", "warmup360", "-S", "train.warmup_steps=360", cwd=repo)
    assert ran(r.stdout) == predicted == ["train", "merge", "infer_tuned", "evaluate_tuned", "probe_tuned"], preview
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)
    text = json.dumps(shown)
    assert "warmup360" in text and '"warmup_steps": 360' in text
    for key in ('"chars_mean"', '"chars_median_ci_low"', '"pairs_ratio_ge_2"', '"test_overlap"'):
        assert key in text


def test_forced_rerun_of_the_data_stages_leaves_dvc_lock_unchanged(repo):
    lock = (repo / "dvc.lock").read_bytes()
    r = dvc("repro", "--force", "--single-item", "prepare", "analyze", "testset", "trainset", cwd=repo)
    assert ran(r.stdout) == ["prepare", "analyze", "testset", "trainset"]
    assert (repo / "dvc.lock").read_bytes() == lock  # same hashes: byte-identical outputs


def experiments(shown):
    """{name: {"params": {...}, "metrics": {...}}} from `dvc exp show --json`, nested dicts flattened to dotted keys."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    found = {}
    for base in shown:
        for exp in base.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                found[rev["name"]] = {
                    "params": flat(data["params"]["params.yaml"]["data"]),
                    "metrics": {k: v for f in data["metrics"].values() for k, v in flat(f["data"]).items()},
                }
    return found


def test_series_runs_exp1_to_exp4_and_the_report_matches_dvc_exp_show(repo):
    params_before = (repo / "params.yaml").read_text()
    sh([str(Path(sys.executable).parent / "ernie-dpo"), "series"], repo)
    exps = experiments(json.loads(dvc("exp", "show", "--json", cwd=repo).stdout))
    assert {"exp1", "exp2", "exp3", "exp4"} <= exps.keys()
    p = {n: exps[n]["params"] for n in ("exp1", "exp2", "exp3", "exp4")}
    m = {n: exps[n]["metrics"] for n in ("exp1", "exp2", "exp3", "exp4")}
    # the plan as the recipe has it, and no value leaking from one experiment into the next
    assert p["exp1"]["trainset.strategy"] == "near_baseline" and p["exp2"]["trainset.strategy"] == "ratio"
    assert m["exp2"]["trainset.pairs"] == m["exp1"]["trainset.pairs"] == p["exp2"]["trainset.size"]
    assert p["exp1"]["train.warmup_steps"] == p["exp3"]["train.warmup_steps"] == 1  # the profile's, not exp4's
    assert p["exp4"]["train.max_steps"] == 2 * p["exp3"]["train.max_steps"]
    assert p["exp4"]["train.warmup_steps"] == max(1, int(0.1 * p["exp4"]["train.max_steps"]))
    assert all(m[n]["trainset.test_overlap"] == 0 for n in m)
    assert all(m[n]["dpo.steps_done"] == p[n]["train.max_steps"] for n in m)
    assert (repo / "params.yaml").read_text() == params_before  # queued runs leave the workspace alone

    # every number in the report's table is the one `dvc exp show` has
    report = (repo / "metrics/report.md").read_text().split("For comparison")[0]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in report.split("The recipe's questions")[0].splitlines()
                                          if line.startswith("| exp"))}
    assert list(rows) == ["exp0", "exp1", "exp2", "exp3", "exp4"]
    assert rows["exp0"][3:5] == [f"{m['exp1']['baseline.chars_mean']:.1f}", f"{m['exp1']['baseline.chars_median']:.1f}"]
    for n in m:
        assert rows[n][3:5] == [f"{m[n]['tuned.chars_mean']:.1f}", f"{m[n]['tuned.chars_median']:.1f}"]
        assert rows[n][5].startswith(f"{m[n]['delta.chars_mean']:+.1f} [")
        retention = m[n].get("probes_tuned.retention")  # None (not shown by DVC) when the baseline passed nothing
        assert rows[n][10] == (f"{retention:.2f}" if retention is not None else "—")
        assert rows[n][7] == f"{m[n]['dpo.heldout.rewards_accuracies']:.2f}"  # held-out reward accuracy
        assert f"{int(m[n]['trainset.pairs'])} pairs" in rows[n][1]
    # the recipe's questions: each experiment's per-prompt replies against another's; the mean's point estimate is
    # the difference of the two tuned means dvc exp show has (each rounded to 0.01 there)
    questions = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                               for line in report.split("The recipe's questions")[1].splitlines()
                                               if line.startswith("| exp"))}
    assert list(questions) == ["exp2 − exp1", "exp3 − exp2", "exp3 − exp0", "exp4 − exp3"]
    for later, earlier in (("exp2", "exp1"), ("exp3", "exp2"), ("exp4", "exp3")):
        shown = float(questions[f"{later} − {earlier}"][2].split(" [")[0])
        assert abs(shown - (m[later]["tuned.chars_mean"] - m[earlier]["tuned.chars_mean"])) <= 0.06, questions
    assert float(questions["exp3 − exp0"][2].split(" [")[0]) == pytest.approx(m["exp3"]["delta.chars_mean"], abs=0.06)
    for png in ("experiments.png", "dpo_curves.png", "reply_lengths.png"):
        assert (repo / "metrics/plots" / png).read_bytes()[:4] == b"\x89PNG"

    # DVC's own comparison tools work between two experiments
    diff = json.loads(dvc("metrics", "diff", "exp2", "exp4", "--json", cwd=repo).stdout)
    assert diff["metrics/tuned.json"]["tuned.chars_mean"]["new"] == m["exp4"]["tuned.chars_mean"]
    plots = dvc("plots", "diff", "exp2", "exp4", "--json", cwd=repo)
    assert "reply_lengths" in plots.stdout and "exp4" in plots.stdout and "dpo_curves" in plots.stdout


def test_experiments_and_their_data_reach_a_teammate_through_git_and_the_dvc_remote(repo):
    """The committed default remote (a folder next to the repo) + a git remote: `dvc exp push`, then a fresh clone
    runs `dvc exp pull` and `dvc pull` and has the experiment's numbers and its data."""
    if "exp4" not in experiments(json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)):
        dvc("exp", "run", "-n", "exp4", "-S", "train.max_steps=5", "--temp", cwd=repo)
    team = repo.parent / "team.git"
    sh(["git", "init", "-q", "--bare", str(team)], repo.parent)
    sh(["git", "remote", "add", "origin", str(team)], repo)
    sh(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], repo)
    dvc("push", cwd=repo)
    dvc("exp", "push", "origin", "exp4", cwd=repo)  # the experiment's git ref + its cached outputs
    assert any((repo.parent / "dvc-storage").rglob("*")), "nothing reached the DVC remote"

    clone = repo.parent / "clone"
    sh(["git", "clone", "-q", "-b", "main", str(team), str(clone)], repo.parent)
    dvc("exp", "pull", "origin", "exp4", cwd=clone)
    theirs = experiments(json.loads(dvc("exp", "show", "--json", cwd=clone).stdout))
    ours = experiments(json.loads(dvc("exp", "show", "--json", cwd=repo).stdout))
    assert theirs["exp4"]["metrics"]["tuned.chars_mean"] == ours["exp4"]["metrics"]["tuned.chars_mean"]
    dvc("exp", "apply", "exp4", cwd=clone)
    dvc("pull", "data/infer/tuned.jsonl", cwd=clone)  # from the shared remote, not recomputed
    replies = (clone / "data/infer/tuned.jsonl").read_text().splitlines()
    assert len(replies) == 12
    r = dvc("status", "evaluate_tuned", cwd=clone)
    assert "changed" not in r.stdout


def server_processes():
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if "ernie_dpo.dev_server" in " ".join(p.info["cmdline"] or [])]


def test_managed_backend_starts_its_own_server_answers_like_local_and_leaves_nothing_running(repo):
    import re
    import socket

    # The dev server answers one request at a time (batch 1). Local inference at the same batch shape is the
    # reference: at another batch size the float arithmetic differs (tests/test_generate.py measures it) and a
    # near-tie between two tokens may fall the other way, which says nothing about the backend.
    dvc("exp", "run", "-S", "infer.batch_size=1", cwd=repo)
    local = {f: (repo / f).read_text() for f in ("data/infer/baseline.jsonl", "data/infer/tuned.jsonl")}
    r = dvc("exp", "run", "-S", "infer.batch_size=1", "-S", "infer.backend=managed", cwd=repo)
    assert {"infer_baseline", "probe_baseline", "infer_tuned", "probe_tuned"} <= set(ran(r.stdout)), r.stdout
    for role in ("baseline", "tuned"):
        info = json.loads((repo / f"metrics/infer_{role}.json").read_text())[f"infer_{role}"]
        assert info["backend"] == "managed" and info["served_model"].startswith(("base-", "merged-")), info
        # per-prompt seeds + the same sampling code and batch shape: the server's replies are the local ones
        assert (repo / f"data/infer/{role}.jsonl").read_text() == local[f"data/infer/{role}.jsonl"]
    assert server_processes() == []  # every server was stopped
    ports = [int(p) for f in (repo / "logs/servers").glob("*.log")
             for p in re.findall(r"http://127\.0\.0\.1:(\d+)/v1", f.read_text())]
    assert len(ports) == 4
    for port in ports:  # and nothing listens there any more (SO_REUSEADDR: closed connections may sit in TIME_WAIT)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    sh(["git", "checkout", "--", "."], repo)
    dvc("checkout", "-f", cwd=repo)


def test_queued_experiments_are_answered_by_their_own_tuned_models(repo):
    for steps in (2, 3):
        dvc("exp", "run", "--queue", "-n", f"managed{steps}", "-S", "infer.backend=managed", "-S",
            f"train.max_steps={steps}", cwd=repo)
    dvc("exp", "run", "--run-all", cwd=repo)
    exps = experiments(json.loads(dvc("exp", "show", "--json", cwd=repo).stdout))
    served = {n: (exps[n]["metrics"]["infer_baseline.served_model"], exps[n]["metrics"]["infer_tuned.served_model"])
              for n in ("managed2", "managed3")}
    assert served["managed2"][0] == served["managed3"][0]  # the same base model: the same name
    assert served["managed2"][1] != served["managed3"][1]  # two trainings: two tuned models, two servers
    assert all(s[1].startswith("merged-") for s in served.values()) and server_processes() == []


def test_an_external_server_is_refused_in_a_temp_experiment(repo):
    r = dvc("exp", "run", "--temp", "-S", "infer.backend=openai", cwd=repo, check=False)
    assert r.returncode != 0 and "queued or temp experiment" in (r.stdout + r.stderr)


def test_dvc_plots_show_works_offline(repo):
    """`dvc plots show` writes a page whose plotting library is inlined (conf/plots/offline.html): no script is
    loaded from a CDN, so every plot renders with no network; the PNG plots are images next to it."""
    r = dvc("plots", "show", "--out", "dvc_plots", cwd=repo)
    page = (repo / "dvc_plots/index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src" not in page
    assert "vega-embed 6.18.2" in page and page.count("vegaEmbed('#") >= 8, r.stdout
    assert "dpo_curves.png" in page and "pair_diagnostics.png" in page
    # every curve the engine logs is drawn, training and held-out, and the validation probes: each plot definition's
    # title is on the page, and each of its TSVs was written by the run (a plot with no data draws nothing)
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    titles = {next(iter(p)) for p in spec}
    for wanted in ("DPO loss", "NLL term", "DPO reward margin", "DPO reward accuracy", "DPO rewards, chosen",
                   "policy log-probs", "reply length while training", "held-out NLL"):
        assert any(t.startswith(wanted) for t in titles), wanted
    for p in spec:
        for tsv in next(iter(p.values()))["y"]:
            if tsv.startswith("metrics/dvclive"):
                assert (repo / tsv).is_file(), f"{next(iter(p))}: {tsv} was not written"
                assert next(iter(p)) in page


# the README's everyday commands that rerun training or a whole series (minutes each) are composed by
# tests/test_docs.py instead of run here; the others are run exactly as printed
EXPENSIVE = ("dvc exp run", "ernie-dpo series", "ernie-dpo run")


def test_the_readmes_everyday_commands_run_as_printed_in_a_new_shell(repo):
    """README "Everyday commands", each line as printed, in a new shell that has only done what the README says
    after `make demo`: `source .venv/bin/activate` (here: the environment the tests run in, which `make install`
    made). The shell starts with a PATH that has no dvc or ernie-dpo on it."""
    import os
    import re

    text = (ROOT / "README.md").read_text()
    block = text.split("## Everyday commands", 1)[1].split("\n## ", 1)[0]
    cmds = [line.strip().split("  #")[0].strip() for line in block.splitlines() if line.startswith("    ")]
    assert "source .venv/bin/activate" in text and len(cmds) >= 8
    activate = Path(sys.executable).parent / "activate"
    env = {k: v for k, v in venv_env().items() if k not in ("VIRTUAL_ENV",)}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "dvc").exists())
    ran_here = []
    for cmd in cmds:
        if cmd.startswith(EXPENSIVE):
            continue
        r = subprocess.run(["bash", "-c", f"source {activate} && {cmd}"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        ran_here.append(re.sub(r"\s+", " ", cmd)[:40])
    assert len(ran_here) >= 5, ran_here
    r = subprocess.run(["bash", "-c", "command -v dvc"], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode != 0  # without the README's activation line the commands would not be found
