"""Experiments as SkyPilot managed jobs (sky/experiment.yaml): the launch commands, a preflight that refuses what a
cloud VM could not use before any VM starts, and waiting for the jobs to bring their experiments home.

A job clones the commit from the git remote, runs `dvc exp run`, and ends with `dvc exp push` (the experiment's git
ref to the git remote, its outputs to the DVC remote). Everything a job needs to get its results home is checked
here, on this machine, with the credentials the job will have (`preflight`), and again by the job itself at the top
of its `setup`, before it pulls or computes anything:
- the git remote accepts a push with GIT_TOKEN (passed to the job as a SkyPilot secret): SkyPilot forwards GIT_TOKEN
  for cloning only when anonymous cloning fails (sky/utils/git.py), so for a public repository the VM's `origin`
  would have no credentials and the final push would fail after the whole run;
- the DVC remote is writable (its credentials: `--secret AWS_ACCESS_KEY_ID --secret AWS_SECRET_ACCESS_KEY`, ...).

    python -m ernie_dpo.cloud preflight [--git-remote origin] [--set-push-url]
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .common import get_logger

log = get_logger("cloud")
DVC = [sys.executable, "-m", "dvc"]
SKY_TASK = "sky/experiment.yaml"
STORES = {"s3": "s3", "gs": "gcs", "r2": "r2", "cos": "ibm", "oci": "oci"}  # bucket URL scheme -> SkyPilot store
TERMINAL = {"SUCCEEDED", "CANCELLED", "FAILED", "FAILED_SETUP", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE",
            "FAILED_CONTROLLER"}  # SkyPilot 0.14's ManagedJobStatus values that end a job


def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


# ------------------------------------------------------------------------------------------ the preflight

def with_token(url, token):
    """The URL a job pushes to: https://<GIT_TOKEN>@host/path (SkyPilot's own clone form, sky/utils/git_clone.sh);
    URLs other than http(s) unchanged."""
    m = re.match(r"(https?://)([^/@]*@)?(.*)", url)
    return f"{m.group(1)}{token}@{m.group(3)}" if token and m else url


def redact(text, token):
    return text.replace(token, "<GIT_TOKEN>") if token else text


def git_push_problem(url, token=None, timeout_s=60):
    """None when `git push --dry-run` to `url` succeeds with `token` as the only credential (no credential helper,
    no SSH agent, no prompt: what a fresh VM has), else what is missing."""
    if url.startswith(("git@", "ssh://")):
        return (f"the git remote {url} is an SSH URL: a cloud VM has no SSH key to push with. Use the https:// URL "
                "and GIT_TOKEN (a token that may push to it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSH_AUTH_SOCK", "GIT_ASKPASS", "SSH_ASKPASS"))}
    env.update(GIT_TERMINAL_PROMPT="0", GCM_INTERACTIVE="never")
    ref = f"refs/heads/ernie-dpo-preflight-{uuid.uuid4().hex[:8]}"  # a new name: nothing is overwritten, dry or not
    try:
        r = subprocess.run(["git", "-c", "credential.helper=", "push", "--dry-run", with_token(url, token),
                            f"HEAD:{ref}"], capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"`git push --dry-run {url}` did not answer in {timeout_s} s"
    if r.returncode == 0:
        return None
    why = redact(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}", token)
    if not token and url.startswith(("https://", "http://")):
        return (f"the git remote {url} refuses a push without credentials ({why}), and GIT_TOKEN is not set: export "
                "GIT_TOKEN=<a token that may push to it> here; the job gets it as a SkyPilot secret")
    return f"the git remote {url} refuses a push{' with GIT_TOKEN' if token else ''}: {why}"


def dvc_remote_problem():
    """None when the default DVC remote takes a write (a small file, removed again), else what is missing."""
    from dvc.repo import Repo

    with Repo() as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return "no default DVC remote: `dvc remote add -d storage s3://<bucket>/<path>`, commit .dvc/config"
        url = repo.config["remote"].get(name, {}).get("url", "")
        try:
            odb = repo.cloud.get_remote_odb(name)
            probe = odb.fs.join(odb.path, f".ernie-dpo-preflight-{uuid.uuid4().hex[:8]}")
            odb.fs.pipe_file(probe, b"ernie-dpo preflight\n")
            odb.fs.rm_file(probe)
        except Exception as e:  # any failure to write is the answer; its type depends on the remote's plugin
            return (f"the DVC remote {name!r} ({url}) cannot be written with these credentials: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (pass the remote's credentials "
                    "to the jobs: ernie-dpo series --launcher sky --secret AWS_ACCESS_KEY_ID --secret ...)")
    return None


def preflight(git_remote="origin", set_push_url=False):
    """[problems]; empty when a job could push both its git ref and its outputs. With set_push_url (on the VM),
    `origin` is then pointed at the token URL the check succeeded with, for the final `dvc exp push`."""
    token = os.environ.get("GIT_TOKEN") or None
    try:
        url = git("remote", "get-url", git_remote)
    except subprocess.CalledProcessError:
        return [f"no git remote {git_remote!r}"]
    problems = [p for p in (git_push_problem(url, token), dvc_remote_problem()) if p]
    if not problems and set_push_url and token:
        git("remote", "set-url", git_remote, with_token(url, token))
    return problems


# ------------------------------------------------------------------------------------------ launching

def exp_params(profile, params):
    """EXP_PARAMS of sky/experiment.yaml: the same overrides as the local `-S` ones, separated by spaces (its `run`
    splits them on spaces and passes each as one -S)."""
    values = [f"profile={profile}", *(f"{key}={value}" for key, value in params.items())]
    spaced = [v for v in values if len(v.split()) != 1]
    if spaced:
        raise ValueError(f"EXP_PARAMS cannot carry a value with a space: {spaced}")
    return " ".join(values)


def bucket_store(bucket):
    """--bucket s3://name -> ("name", "s3"): the store is pinned, so a job that lands on another cloud still writes
    its checkpoints to this bucket (SkyPilot would otherwise create one on the job's cloud)."""
    m = re.fullmatch(r"(\w+)://([^/]+)/?", bucket or "")
    if not m or m.group(1) not in STORES:
        raise ValueError(f"--bucket takes a bucket URL like s3://my-ckpt or gs://my-ckpt "
                         f"({', '.join(s + '://' for s in STORES)}), got {bucket!r}")
    return m.group(2), STORES[m.group(1)]


def sky_commands(experiments, profile, repo_url, ref, bucket, task=SKY_TASK, sky="sky", secrets=(), stages=""):
    """One `sky jobs launch` per experiment: its name, overrides, the commit to clone, the checkpoint bucket and its
    store, and the secrets (GIT_TOKEN always; each --secret NAME takes $NAME from this shell)."""
    name_, store = bucket_store(bucket)
    out = []
    for name, params in experiments.items():
        cmd = [sky, "jobs", "launch", task, "-n", f"ernie-dpo-{name}", "-y", "-d",
               "--env", f"EXP_NAME={name}", "--env", f"EXP_PARAMS={exp_params(profile, params)}",
               "--env", f"REPO_URL={repo_url}", "--env", f"REPO_REF={ref}", "--env", f"CKPT_BUCKET={name_}",
               "--env", f"CKPT_STORE={store}"]
        if stages:
            cmd += ["--env", f"STAGES={stages}"]
        for secret in ("GIT_TOKEN", *secrets):
            cmd += ["--secret", secret]
        out.append(cmd)
    return out


def sky_binary():
    """SkyPilot from its own environment (`make sky-venv`), else a `sky` on PATH."""
    local = Path(".venv-sky/bin/sky")
    return str(local) if local.exists() else shutil.which("sky")


def local_checks(remote, names, baseline=True):
    """What the cloud jobs need from here, before any VM starts: this commit on the git remote, no experiment of
    these names there yet, a push with GIT_TOKEN and a write to the DVC remote that work (preflight), and -- unless
    the baseline itself is the job -- the baseline committed and on the DVC remote (the jobs pull it)."""
    head = git("rev-parse", "HEAD")
    if not any(b.startswith(f"{remote}/") for b in git("branch", "-r", "--contains", head,
                                                       "--format=%(refname:short)").splitlines()):
        sys.exit(f"series: commit {head[:7]} is not on the git remote {remote!r}, where the jobs clone it from: "
                 f"`git push {remote} HEAD` first")
    prefix = f"refs/exps/{head[:2]}/{head[2:]}/"
    taken = [ref.split("/")[-1] for ref in git("ls-remote", remote, "refs/exps/*").split()
             if ref.startswith(prefix) and ref.split("/")[-1] in names]
    if taken:
        sys.exit(f"series: {remote} already has experiment(s) {', '.join(taken)} of this commit; a job could not "
                 f"push its result. Remove them first: dvc exp remove -g {remote} {' '.join(taken)}")
    from dvc.repo import Repo

    with Repo() as repo:
        default = repo.config["core"].get("remote")
        url = repo.config["remote"].get(default, {}).get("url", "") if default else ""
    if "://" not in url:
        sys.exit(f"series: the default DVC remote {default!r} ({url or 'none'}) is not one the cloud can reach: "
                 "`dvc remote add -d -f storage s3://<bucket>/<path>` (or gs://, ssh://), commit .dvc/config, push "
                 "(docs/scaling.md, 'A shared DVC remote')")
    git_url = git("remote", "get-url", remote)
    if not git_url.startswith(("https://", "http://", "ssh://", "git@")):
        sys.exit(f"series: the git remote {remote!r} is {git_url}, which a cloud VM cannot clone: use an https:// "
                 "remote (docs/scaling.md, 'What you provide')")
    problems = preflight(remote)
    if problems:
        sys.exit("series: a cloud job could not bring its results home:\n- " + "\n- ".join(problems))
    if baseline:
        subprocess.run(DVC + ["repro", "--pull", "evaluate_baseline", "probe_baseline"], check=True)
        changed = git("status", "--porcelain", "--", "dvc.lock", "params.yaml", "metrics")
        if changed:
            sys.exit("series: the baseline in the workspace is not the committed one; the jobs start from the "
                     "commit. Commit (and push) it first, or compute it on a cloud GPU: ernie-dpo series "
                     "--launcher sky --baseline ...\n" + changed)
        subprocess.run(DVC + ["push", "--with-deps", "evaluate_baseline", "probe_baseline"], check=True)


STATUS_CODE = """import json, sys, sky
records = sky.get(sky.jobs.queue_v2(refresh=True, skip_finished=False))[0]
print(json.dumps({r["job_name"]: getattr(r["status"], "value", str(r["status"])) for r in records}))
"""


def job_statuses(sky):
    """{job name: status} of the managed jobs, from SkyPilot's SDK in its own environment (unverified against a
    live SkyPilot API server here: no cloud account)."""
    python = Path(sky).parent / "python"
    r = subprocess.run([str(python), "-c", STATUS_CODE], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"could not read `sky jobs queue`: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def wait_for_jobs(names, statuses, poll_s=60, on_end=None):
    """Poll statuses() until every job `ernie-dpo-<name>` has ended; call on_end(name, status) as each one ends.
    Returns {name: final status}."""
    ended = {}
    while len(ended) < len(names):
        now = statuses()
        for name in names:
            status = now.get(f"ernie-dpo-{name}")
            if status in TERMINAL and name not in ended:
                ended[name] = status
                if on_end:
                    on_end(name, status)
        if len(ended) < len(names):
            time.sleep(poll_s)
    return ended


def launch(experiments, profile, args, sh):
    """`ernie-dpo series --launcher sky` after local_checks: one managed job per experiment; with --wait, their
    results pulled and the report written when they end."""
    sky = sky_binary() or "sky"
    try:
        repo_url = git("remote", "get-url", args.git_remote)
    except subprocess.CalledProcessError:
        sys.exit(f"series: no git remote {args.git_remote!r}: the jobs clone the project from it and push to it")
    stages = "evaluate_baseline probe_baseline" if args.baseline else ""
    try:
        cmds = sky_commands(experiments, profile, repo_url, git("rev-parse", "HEAD"), args.bucket, args.task, sky,
                            args.secret or (), stages)
    except ValueError as e:
        sys.exit(f"series: {e}")
    names = " ".join(experiments)
    if args.baseline:
        after = (f"When the job is done: dvc exp pull {args.git_remote} baseline && dvc exp apply baseline && "
                 "git add -A && git commit -m 'baseline' && git push && dvc push; then ernie-dpo series "
                 "--launcher sky ...")
    else:
        after = (f"When the jobs are done (`{sky} jobs queue`): dvc exp pull {args.git_remote} {names}   "
                 f"(-f replaces local experiments of these names), then: ernie-dpo report --names {names}")
    if args.dry:
        for cmd in cmds:
            print(shlex.join(cmd))
        print(f"# {after}")
        return
    if not sky_binary():
        sys.exit("series: no SkyPilot here: `make sky-venv` installs it into .venv-sky")
    for cmd in cmds:
        sh(cmd)
    if not args.wait:
        log.info("launched %d managed jobs. %s", len(cmds), after)
        return

    def ended(name, status):
        (log.info if status == "SUCCEEDED" else log.error)("%s: %s%s", name, status, "" if status == "SUCCEEDED" else
                                                           f" (logs: {sky} jobs logs -n ernie-dpo-{name})")

    final = wait_for_jobs(list(experiments), lambda: job_statuses(sky), on_end=ended)
    done = [n for n, s in final.items() if s == "SUCCEEDED"]
    if done:
        sh(DVC + ["exp", "pull", "-f", args.git_remote, *done])
    if args.baseline:
        log.info("%s", after)
    elif done:
        from .report import main as report

        report(["--names", *done])
    failed = [n for n in experiments if n not in done]
    if failed:
        sys.exit(f"series: {', '.join(failed)} did not succeed; rerun them alone: ernie-dpo series --launcher sky "
                 f"--only {','.join(failed)} ...")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m ernie_dpo.cloud", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["preflight"])
    ap.add_argument("--git-remote", default="origin")
    ap.add_argument("--set-push-url", action="store_true",
                    help="on success, point the git remote at the GIT_TOKEN URL (the job's final push uses it)")
    args = ap.parse_args(argv)
    problems = preflight(args.git_remote, args.set_push_url)
    if problems:
        sys.exit("preflight: this job could not bring its results home; stopping before any work:\n- "
                 + "\n- ".join(problems))
    print("preflight: the git remote takes a push and the DVC remote a write with this job's credentials")


if __name__ == "__main__":
    main()
