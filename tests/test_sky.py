"""sky/experiment.yaml without a cloud.

SkyPilot's own loader (in .venv-sky, `make sky-venv`) accepts the task file and the commands `ernie-dpo series
--launcher sky` prints, and refuses broken copies. The task's `setup` and `run` scripts, taken from the YAML as they
are, run on this CPU the way SkyPilot runs them on a node: a fresh clone of the project (pushed to a bare git repo,
its `origin`), a folder as the DVC remote and another as the bucket mount, SKYPILOT_* variables set, the demo profile.
Only the package install of `setup` is skipped (ERNIE_DPO_VENV names this environment instead). Not tested: a real
cloud launch, the bucket mount itself (rclone), GPUs, and multi-node training (its commands are checked with stubs).
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_repo, venv_env

SKY_PYTHON = ROOT / ".venv-sky/bin/python"
TASK = yaml.safe_load((ROOT / "sky/experiment.yaml").read_text())
ERNIE_DPO = str(Path(sys.executable).parent / "ernie-dpo")


def sky_python():
    if SKY_PYTHON.exists():
        return SKY_PYTHON
    message = f"{SKY_PYTHON} is missing: run `make sky-venv` (SkyPilot 0.14.1 in an environment of its own)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def validate(tmp_path, *args):
    """sky/validate.py in .venv-sky, offline; `import sky` writes ~/.sky, so HOME is a temp folder."""
    home = tmp_path / "sky-home"
    home.mkdir(exist_ok=True)
    r = subprocess.run([str(sky_python()), "sky/validate.py", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "HOME": str(home)}, timeout=300)
    loaded = json.loads(r.stdout.splitlines()[-1]) if r.returncode == 0 else None
    return r, loaded


def test_the_task_file_loads_with_skypilots_own_loader(tmp_path):
    r, task = validate(tmp_path, "sky/experiment.yaml", "EXP_NAME=exp4",
                       "EXP_PARAMS=profile=demo train.warmup_steps=360", "REPO_URL=https://example.org/x/ernie-dpo.git",
                       "REPO_REF=0123abc", "CKPT_BUCKET=my-ernie-dpo-checkpoints", "CKPT_STORE=gcs")
    assert r.returncode == 0, r.stdout + r.stderr
    assert task["sky"] == "0.14.1" and task["name"] == "ernie-dpo-exp" and task["num_nodes"] == 1
    assert task["accelerators"] == {"A100": 1} and task["use_spot"] is True
    # env values reach the git workdir and the bucket name, as SkyPilot substitutes them at load time
    assert task["workdir"] == {"url": "https://example.org/x/ernie-dpo.git", "ref": "0123abc"}
    assert task["storage_mounts"] == {"/checkpoints": {"name": "my-ernie-dpo-checkpoints", "mode": "MOUNT_CACHED",
                                                       "store": ["GCS"]}}  # pinned: a job on another cloud uses it
    assert task["secrets"] == ["GIT_TOKEN"]  # a null secret: its value comes from `--secret GIT_TOKEN` at launch
    assert task["job_recovery"] == {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 1}
    assert task["envs"]["EXP_PARAMS"] == "profile=demo train.warmup_steps=360"
    assert (task["setup"], task["run"]) == (TASK["setup"], TASK["run"])  # what the CPU run below executes


BROKEN = {  # a copy of the task file with one mistake -> what must be said
    "misspelt top-level key": (("run: |", "runn: |"), "Instead of 'runn', did you mean 'run'?"),
    "misspelt resources key": (("  accelerators: A100:1", "  accelerator: A100:1"), "did you mean 'accelerators'?"),
    "misspelt mount mode": (("mode: MOUNT_CACHED ", "mode: MOUNT_CACHE "), "'MOUNT_CACHE' is not one of"),
}


@pytest.mark.parametrize("mistake", BROKEN)
def test_a_broken_task_file_is_refused(mistake, tmp_path):
    (old, new), message = BROKEN[mistake]
    text = (ROOT / "sky/experiment.yaml").read_text()
    assert old in text
    (tmp_path / "broken.yaml").write_text(text.replace(old, new, 1))
    r, _ = validate(tmp_path, tmp_path / "broken.yaml")
    assert r.returncode == 1 and r.stdout.startswith("INVALID:") and message in r.stdout, r.stdout + r.stderr


def test_a_local_workdir_is_refused_by_the_projects_own_rule(tmp_path):
    """A managed job copies a local workdir without .git: `dvc exp run` / `dvc exp push` would fail on the VM."""
    task = dict(TASK, workdir=".")
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    r, _ = validate(tmp_path, tmp_path / "local.yaml")
    assert r.returncode == 1 and "workdir must be a git repository" in r.stdout, r.stdout + r.stderr


def git(*args, cwd, env=None):
    return subprocess.run(["git", *args], cwd=cwd, env=env or venv_env(), check=True, capture_output=True,
                          text=True).stdout.strip()


def test_series_launcher_sky_prints_launches_that_skypilot_parses_and_loads(run_stage, tmp_path):
    from dvc.utils.hydra import compose_and_dump

    from ernie_dpo.common import read_json, read_jsonl
    from ernie_dpo.data import pool_outside
    from ernie_dpo.series import count_pairs, plan

    repo = run_stage.root
    run_stage("prepare")
    run_stage("testset")
    # the plan the series makes from this workspace
    params = yaml.safe_load((repo / "params.yaml").read_text())
    pool, _, _ = pool_outside(read_jsonl(repo / "data/prepared/dpo.jsonl"),
                              read_jsonl(repo / "data/testset/testset.jsonl")
                              + read_jsonl(repo / "data/testset/validation.jsonl"))
    counts = count_pairs(pool, read_json(repo / "metrics/baseline.json")["baseline"]["chars_mean"],
                         params["trainset"]["baseline_tolerance"], params["trainset"]["eval_pairs"],
                         params["trainset"]["seed"])
    planned = plan(counts, params["train"]["global_batch_size"], params["train"]["warmup_steps"])
    git("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x", cwd=repo)
    git("init", "-q", "--bare", str(tmp_path / "origin.git"), cwd=tmp_path)
    git("remote", "add", "origin", str(tmp_path / "origin.git"), cwd=repo)
    r = subprocess.run([ERNIE_DPO, "series", "--launcher", "sky", "--bucket", "s3://my-ckpt", "--secret",
                        "AWS_ACCESS_KEY_ID", "--dry"], cwd=repo, env=venv_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    launches = [line for line in r.stdout.splitlines() if not line.startswith("#")]
    assert len(launches) == 4 and "dvc exp pull origin exp1 exp2 exp3 exp4" in r.stdout
    head = git("rev-parse", "HEAD", cwd=repo)
    for line, name in zip(launches, ("exp1", "exp2", "exp3", "exp4")):
        argv = shlex.split(line)
        assert Path(argv[0]).name == "sky" and argv[1:6] == ["jobs", "launch", "sky/experiment.yaml", "-n",
                                                             f"ernie-dpo-{name}"]
        envs = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--env")
        assert envs["EXP_NAME"] == name and envs["REPO_REF"] == head and envs["CKPT_BUCKET"] == "my-ckpt"
        assert envs["CKPT_STORE"] == "s3" and "STAGES" not in envs
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "--secret"] == ["GIT_TOKEN", "AWS_ACCESS_KEY_ID"]
        assert envs["REPO_URL"] == str(tmp_path / "origin.git")
        # EXP_PARAMS composes (Hydra, against conf/) to the planned experiment, as `run` will pass it with -S
        out = tmp_path / f"{name}.yaml"
        compose_and_dump(out, str(repo / "conf"), None, "config", str(repo), envs["EXP_PARAMS"].split())
        composed = yaml.safe_load(out.read_text())
        assert composed["profile_name"] == params["profile_name"]
        for key, value in planned[name].items():
            section, leaf = key.split(".")
            assert composed[section][leaf] == value, (name, key)
    # SkyPilot's CLI parses the last command and its loader accepts the task with exactly these --env values
    os.environ.update(GIT_TOKEN="t0ken", AWS_ACCESS_KEY_ID="AKIA")  # `--secret NAME` reads $NAME when parsed
    try:
        r, task = validate(tmp_path, "--launch", launches[-1])
    finally:
        del os.environ["GIT_TOKEN"], os.environ["AWS_ACCESS_KEY_ID"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert task["name"] == "ernie-dpo-exp4" and task["workdir"] == {"url": str(tmp_path / "origin.git"), "ref": head}
    r, _ = validate(tmp_path, "--launch", launches[-1].replace("--env CKPT_BUCKET=my-ckpt", "").replace(
        "--secret GIT_TOKEN --secret AWS_ACCESS_KEY_ID", ""))
    assert r.returncode == 1 and "Environment variable 'CKPT_BUCKET' is None" in r.stdout


def test_series_launcher_sky_refuses_what_a_cloud_job_could_not_use(tmp_path):
    """Before launching anything: the commit must be on the git remote, the experiment names free there, the DVC
    remote reachable from a cloud (the committed default is a folder next to the repository)."""
    repo = copy_repo(tmp_path / "repo")
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", "-A", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x", cwd=repo)
    git("init", "-q", "--bare", str(tmp_path / "origin.git"), cwd=tmp_path)
    git("remote", "add", "origin", str(tmp_path / "origin.git"), cwd=repo)

    def launch():
        r = subprocess.run([ERNIE_DPO, "series", "--launcher", "sky", "--bucket", "s3://b"], cwd=repo,
                           env=venv_env(), capture_output=True, text=True)
        assert r.returncode == 1, r.stdout + r.stderr
        return r.stderr

    assert "is not on the git remote 'origin'" in launch()
    git("push", "-q", "origin", "main", cwd=repo)
    head = git("rev-parse", "HEAD", cwd=repo)
    git("push", "-q", "origin", f"HEAD:refs/exps/{head[:2]}/{head[2:]}/exp3", cwd=repo)  # someone's exp3 of this commit
    assert "origin already has experiment(s) exp3 of this commit" in launch()
    git("push", "-q", "origin", "--delete", f"refs/exps/{head[:2]}/{head[2:]}/exp3", cwd=repo)
    assert f"the default DVC remote 'storage' ({tmp_path / 'dvc-storage'}) is not one the cloud can reach" in launch()


# ------------------------------------------------------------------------- setup and run, as a node runs them

def sky_checkpoints():
    """sky/checkpoints.py as a module (it is a script in sky/, not part of the ernie_dpo package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sky_checkpoints", ROOT / "sky/checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shrink_demo(repo):
    """The demo profile at its smallest: 8 test prompts, short replies, a short tiny-model warm-up, one probe sample."""
    demo = repo / "conf/profile/demo.yaml"
    cfg = yaml.safe_load(demo.read_text())
    cfg["testset"]["size"] = 8
    cfg["infer"].update(max_dec_len=32, batch_size=8)
    cfg["train"].update(max_steps=2, warmup_steps=1)
    cfg["model"]["tiny"] = {"warmup_steps": 20}
    cfg["probes"] = {"samples": 1}
    demo.write_text("# @package _global_\n" + yaml.safe_dump(cfg, sort_keys=False))


def dvc(*args, cwd):
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=venv_env(), capture_output=True, text=True)
    assert r.returncode == 0, f"dvc {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """What the user has before launching: the project with its baseline committed, on a git remote (a bare repo)
    and a DVC remote (a folder, added with the docs' `dvc remote add -d -f storage <url>`)."""
    base = tmp_path_factory.mktemp("sky")
    repo = copy_repo(base / "repo")
    (repo / "dvc.lock").unlink(missing_ok=True)
    shrink_demo(repo)
    code = ("from pathlib import Path; from dvc.utils.hydra import compose_and_dump; "
            "compose_and_dump(Path('params.yaml'), str(Path('conf').resolve()), None, 'config', '.', [])")
    subprocess.run([sys.executable, "-c", code], cwd=repo, env=venv_env(), check=True)
    git("init", "-q", "-b", "main", cwd=repo)
    dvc("remote", "add", "-d", "-f", "storage", str(base / "dvc-remote"), cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "code", cwd=repo)
    dvc("repro", "evaluate_baseline", "probe_baseline", cwd=repo)
    dvc("push", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "baseline", cwd=repo)
    git("init", "-q", "--bare", str(base / "origin.git"), cwd=base)
    git("remote", "add", "origin", str(base / "origin.git"), cwd=repo)
    git("push", "-q", "origin", "main", cwd=repo)
    return base, repo


def node(base, name, mount, **envs):
    """A fresh node: the git workdir SkyPilot clones (like sky/utils/git_clone.sh: a clone of REPO_URL at REPO_REF),
    and the environment its scripts get: the task's envs, the --env values, SKYPILOT_* variables. HOME is empty and
    no git identity is configured anywhere, as on a new VM."""
    workdir = base / name
    git("clone", "-q", "--depth", "1", "--branch", "main", f"file://{base / 'origin.git'}", str(workdir), cwd=base)
    home = base / f"{name}-home"
    home.mkdir()
    env = venv_env()
    for k in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        env.pop(k, None)
    env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1")
    env.update({k: str(v) for k, v in TASK["envs"].items() if v is not None})
    env.update(REPO_URL=str(base / "origin.git"), REPO_REF="main", CKPT_BUCKET="unused-here", CKPT_MOUNT=str(mount),
               ERNIE_DPO_VENV=str(Path(sys.executable).parent.parent),  # installed already: setup installs nothing
               SKYPILOT_NODE_RANK="0", SKYPILOT_NUM_NODES="1", SKYPILOT_NODE_IPS="127.0.0.1",
               SKYPILOT_NUM_GPUS_PER_NODE="1", SKYPILOT_TASK_ID=f"sky-managed-2026-12-02_ernie-dpo-exp_1-{name}")
    env.update(envs)
    return workdir, env


def script(workdir, part):
    """The YAML's setup or run, as the file SkyPilot writes and runs with bash in the workdir."""
    path = workdir.parent / f"{workdir.name}-{part}.sh"
    path.write_text(TASK[part])
    return ["bash", str(path)]


def run_script(workdir, env, part):
    r = subprocess.run(script(workdir, part), cwd=workdir, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{part} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def test_a_preempted_node_resumes_from_the_bucket_and_the_experiment_comes_home(project):
    base, repo = project
    mount = base / "bucket-mount"  # stands in for the MOUNT_CACHED bucket
    mount.mkdir()
    job = dict(EXP_NAME="cloud1", EXP_PARAMS="train.max_steps=10 train.warmup_steps=1", SAVE_STEPS="2",
               CKPT_SYNC_SECONDS="0.2")
    start = time.time()

    # node 1: setup, then run until its first checkpoint is in the bucket -- then the VM disappears (SIGKILL)
    workdir, env = node(base, "node1", mount, **job)
    run_script(workdir, env, "setup")
    assert (workdir / "models/base").is_dir() and (workdir / "data/infer/baseline.jsonl").is_file()  # pulled
    proc = subprocess.Popen(script(workdir, "run"), cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not list(mount.glob("cloud1/train-*/checkpoint-*/manifest.json")):
        assert proc.poll() is None, f"the run ended before a checkpoint was copied:\n{proc.stdout.read()[-4000:]}"
        assert time.time() < deadline, "no checkpoint reached the bucket"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = sky_checkpoints()
    copied = [c for w in mount.glob("cloud1/train-*") for c in ck.checkpoints(w) if ck.copied_whole(c)][-1]
    assert int(copied.name.split("-")[1]) < 10  # preempted mid-training, not after its last step
    preempted = time.time() - start

    # the managed job's recovery: a new node, setup and run from the top; it resumes from the bucket's checkpoint
    workdir, env = node(base, "node2", mount, **job)
    run_script(workdir, env, "setup")
    out = run_script(workdir, env, "run")
    assert f"restored checkpoints/{copied.parent.name}/{copied.name}" in out, out[-4000:]
    assert f"resuming from checkpoints/{copied.parent.name}/{copied.name}" in out, out[-4000:]
    assert "Pushed experiment cloud1 to Git remote 'origin'" in out
    assert not (mount / "cloud1").exists()  # pushed: its checkpoints are gone from the bucket

    # at home: the experiment and its outputs come back through git and the DVC remote
    dvc("exp", "pull", "origin", "cloud1", cwd=repo)
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo))
    revs = {r["name"]: r["data"] for c in shown for e in (c.get("experiments") or []) for r in e["revs"]}
    params = revs["cloud1"]["params"]["params.yaml"]["data"]
    assert (params["train"]["max_steps"], params["train"]["save_steps"], params["engine"]["gpus"]) == (10, 2, 1)
    tuned = revs["cloud1"]["metrics"]["metrics/tuned.json"]["data"]["tuned"]
    r = subprocess.run([ERNIE_DPO, "report", "--names", "cloud1"], cwd=repo, env=venv_env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    row = next(line for line in (repo / "metrics/report.md").read_text().splitlines() if line.startswith("| cloud1"))
    assert f"| {tuned['chars_mean']:.1f} " in row and "10 steps" in row
    dvc("exp", "apply", "cloud1", cwd=repo)
    dvc("pull", cwd=repo)  # its models are on the DVC remote: the worker pushed them
    assert (repo / "models/merged/config.json").is_file()
    print(f"baseline built before; node 1 preempted after {preempted:.0f} s, whole test {time.time() - start:.0f} s")


def serve_git(root, token):
    """A public-style git host on localhost: anyone may clone (git's own smart-HTTP backend, `git http-backend`), a
    push needs the token (HTTP 401 otherwise, as GitHub answers). Returns (base URL, server)."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.cgi()

        def do_POST(self):
            self.cgi()

        def cgi(self):
            path, _, query = self.path.partition("?")
            user = None
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                user = name if token in (name, password) else None
            if ("git-receive-pack" in path or "service=git-receive-pack" in query) and user is None:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(root), "GIT_HTTP_EXPORT_ALL": "1",
                   "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
                   "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                   "REMOTE_ADDR": "127.0.0.1", **({"REMOTE_USER": user} if user else {})}
            out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
            head, _, rest = out.partition(b"\r\n\r\n")
            status, headers = 200, []
            for line in head.decode().split("\r\n"):
                key, _, value = line.partition(": ")
                if key.lower() == "status":
                    status = int(value.split()[0])
                elif key:
                    headers.append((key, value))
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(rest)))
            self.end_headers()
            self.wfile.write(rest)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def test_the_job_refuses_an_origin_it_could_not_push_to_before_any_work(project):
    """(31.4) A public repository: the VM clones it anonymously, so its origin has no push credentials, and the
    final `dvc exp push` would fail after the whole run. The task's own setup stops at its preflight, in seconds,
    naming GIT_TOKEN, before pulling or computing anything; a wrong token is refused too; the right one passes and
    becomes origin's URL for the final push."""
    base, _ = project
    url, server = serve_git(base, token="s3cret-t0ken")
    try:
        mount = base / "public-mount"
        mount.mkdir()
        origin = f"{url}/origin.git"
        workdir, env = node(base, "public", mount, EXP_NAME="pub1", REPO_URL=origin)
        git("remote", "set-url", "origin", origin, cwd=workdir)  # cloned from the public URL, as SkyPilot does
        git("fetch", "-q", "origin", cwd=workdir, env=env)  # anyone may read it
        env.pop("GIT_TOKEN", None)
        start = time.time()
        r = subprocess.run(script(workdir, "setup"), cwd=workdir, env=env, capture_output=True, text=True)
        took = time.time() - start
        assert r.returncode != 0 and "GIT_TOKEN is not set" in r.stderr, r.stdout + r.stderr
        assert "refuses a push without credentials" in r.stderr
        assert not (workdir / "models/base").exists() and not (workdir / "data/prepared/dpo.jsonl").exists()
        assert took < 60, took
        wrong = subprocess.run(script(workdir, "setup"), cwd=workdir, env={**env, "GIT_TOKEN": "bad-t0ken-42"},
                               capture_output=True, text=True)
        assert wrong.returncode != 0 and "refuses a push with GIT_TOKEN" in wrong.stderr, wrong.stderr
        assert "bad-t0ken-42" not in wrong.stdout + wrong.stderr  # the token itself is never printed
        ok = subprocess.run([sys.executable, "-m", "ernie_dpo.cloud", "preflight", "--set-push-url"], cwd=workdir,
                            env={**env, "GIT_TOKEN": "s3cret-t0ken"}, capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert git("remote", "get-url", "origin", cwd=workdir) == origin.replace("http://", "http://s3cret-t0ken@")
        assert cloud_module().with_token("https://github.com/you/ernie-dpo.git", "T") == \
            "https://T@github.com/you/ernie-dpo.git"
        print(f"refused in {took:.1f} s")
    finally:
        server.shutdown()


def cloud_module():
    from ernie_dpo import cloud

    return cloud


STUB = """#!/bin/sh
exec {python} -c 'import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    env = {{k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK")}}
    f.write(json.dumps([sys.argv[1:], env]) + "\\n")
' {name} "$@"
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_run_maps_skypilots_nodes_and_gpus_to_the_engine(rank, tmp_path):
    """Two nodes of 4 GPUs, with `dvc` and `python` as stubs that only record their arguments and environment."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("dvc", "python"):
        (venv / "bin" / name).write_text(STUB.format(python=sys.executable, name=name))
        (venv / "bin" / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {**{k: str(v) for k, v in TASK["envs"].items() if v is not None}, "PATH": os.environ["PATH"],
           "ERNIE_DPO_VENV": str(venv), "STUB_LOG": str(log), "EXP_NAME": "exp4", "CKPT_MOUNT": str(tmp_path / "m"),
           "EXP_PARAMS": "profile=cookbook train.max_steps=3608 train.warmup_steps=360",
           "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2",
           "SKYPILOT_NUM_GPUS_PER_NODE": "4", "SKYPILOT_TASK_ID": "t"}
    r = subprocess.run(["bash", "-c", TASK["run"]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    sets = ["-S", "train.save_steps=100", "-S", "profile=cookbook", "-S", "train.max_steps=3608",
            "-S", "train.warmup_steps=360", "-S", "engine.gpus=4", "-S", "engine.nnodes=2"]
    node_env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "8090", "RANK": str(rank)}
    commands = [args for args, _ in calls]  # each begins with the program: dvc or python
    assert commands[0] == ["python", "sky/checkpoints.py", "restore", str(tmp_path / "m/exp4"), "checkpoints"]
    if rank == 0:
        # the mirror runs in the background: its call is logged at any point after the restore, or not at all when
        # the stubbed experiment ends before the stub starts (the kill after `dvc exp run` comes first); that it
        # really runs is shown by the checkpoint reaching the bucket in the test above
        mirror = [c for c in commands if c[:3] == ["python", "sky/checkpoints.py", "mirror"]]
        assert mirror in ([], [["python", "sky/checkpoints.py", "mirror", "checkpoints", str(tmp_path / "m/exp4"),
                                "--every", "60"]])
        assert [c for c in commands[1:] if c not in mirror] == [["dvc", "exp", "run", "--pull", "-n", "exp4", *sets],
                                                                ["dvc", "exp", "push", "origin", "exp4"]]
    else:  # a worker node: this experiment's params.yaml and training set (that stage only: no baseline inference
        # on every node), then it joins node 0's training
        assert commands[1:] == [["dvc", "exp", "run", "--pull", "--single-item", *sets, "trainset"],
                                ["python", "-m", "stages.train", "--worker-node"]]
    assert all(e == node_env for _, e in calls)


def complete_checkpoint(folder, step, size=1000):
    """A folder weights.checkpoint_is_complete() accepts: scheduler, trainer state, an optimizer index and its shard."""
    c = folder / f"checkpoint-{step}"
    c.mkdir(parents=True)
    for name in ("scheduler.pdparams", "trainer_state.bin", "model-00001.safetensors"):
        (c / name).write_bytes(os.urandom(size))
    (c / "optimizer-00001.safetensors").write_bytes(os.urandom(size))
    index = {"weight_map": {"w": "optimizer-00001.safetensors"}}
    (c / "optimizer.safetensors.index.json").write_text(json.dumps(index))
    return c


def test_checkpoints_mirror_keeps_two_whole_copies_and_restore_skips_a_half_uploaded_one(tmp_path):
    ck = sky_checkpoints()

    local, bucket, fresh = tmp_path / "checkpoints", tmp_path / "bucket/exp1", tmp_path / "node2/checkpoints"
    work = local / "train-abc"
    unfinished = work / "checkpoint-9"
    unfinished.mkdir(parents=True)  # being written: no scheduler yet
    (unfinished / "trainer_state.bin").write_bytes(b"x")
    assert ck.mirror_once(local, bucket) == [] and ck.restore(bucket, fresh) == []
    for step in (2, 4, 6):
        complete_checkpoint(work, step)
        ck.mirror_once(local, bucket)
        assert ck.mirror_once(local, bucket) == []  # copied once
    assert [c.name for c in ck.checkpoints(bucket / "train-abc")] == ["checkpoint-4", "checkpoint-6"]
    # a preemption caught checkpoint-6 half-uploaded: the one before it is restored
    shard = bucket / "train-abc/checkpoint-6/optimizer-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    assert ck.restore(bucket, fresh) == [fresh / "train-abc/checkpoint-4"]
    from ernie_dpo.weights import checkpoint_is_complete

    assert checkpoint_is_complete(fresh / "train-abc/checkpoint-4")
    assert not (fresh / "train-abc/checkpoint-4" / ck.MANIFEST).exists()  # the engine's folder, as it wrote it


def test_wait_reports_each_job_as_it_ends_and_returns_when_all_have():
    """`series --launcher sky --wait`: polls, names each job as it ends (a failure too), stops when all ended."""
    from ernie_dpo import cloud

    polls = iter([{"ernie-dpo-exp1": "RUNNING", "ernie-dpo-exp2": "PENDING"},
                  {"ernie-dpo-exp1": "FAILED_SETUP", "ernie-dpo-exp2": "RECOVERING", "other": "SUCCEEDED"},
                  {"ernie-dpo-exp1": "FAILED_SETUP", "ernie-dpo-exp2": "SUCCEEDED"}])
    seen = []
    final = cloud.wait_for_jobs(["exp1", "exp2"], lambda: next(polls), poll_s=0,
                                on_end=lambda name, status: seen.append((name, status)))
    assert final == {"exp1": "FAILED_SETUP", "exp2": "SUCCEEDED"}
    assert seen == [("exp1", "FAILED_SETUP"), ("exp2", "SUCCEEDED")]  # exp1 named when it ended, not at the end


def test_the_bucket_url_pins_the_store():
    from ernie_dpo import cloud

    assert cloud.bucket_store("s3://my-ckpt") == ("my-ckpt", "s3")
    assert cloud.bucket_store("gs://my-ckpt/") == ("my-ckpt", "gcs")
    for bad in ("my-ckpt", "s3://my-ckpt/sub", "ftp://x"):
        with pytest.raises(ValueError, match="bucket URL"):
            cloud.bucket_store(bad)
