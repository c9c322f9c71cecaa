"""The recipe's experiment series (exp0-exp4), scaled to the current profile.

The recipe ("ERNIE DPO best practices", ERNIE-4.5-0.3B, global batch 1):
    exp0  the base model, no training (the baseline)
    exp1  rejected about as long as the baseline's mean reply AND rejected >= 1.2x chosen   614 pairs, 614 steps, warmup 50
    exp2  rejected >= 1.2x chosen, sampled to exp1's size                                   614 pairs, 614 steps, warmup 50
    exp3  rejected >= 2x chosen, every passing pair, max_steps = one pass over the pairs
    exp4  exp3 with twice the steps and warmup = 10% of the steps                          1804 pairs, 3608 steps, warmup 360

"Steps = pair count" is one epoch at the recipe's global batch of 1; on another batch size one epoch is
ceil(pairs / global_batch_size) steps, so the demo (batch 8) trains the same number of epochs, not 8x as many.
exp1-exp3 keep the profile's train.warmup_steps (the recipe used 50 for all three).

Every experiment sets ALL the keys it varies (never "whatever the workspace had"): with Hydra, `dvc exp run -S` composes
params.yaml afresh from conf/ + these overrides, so nothing from an earlier experiment can leak into the next one.

Run it:

    ernie-dpo series                    # current profile (params.yaml), one experiment at a time
    ernie-dpo series --jobs 2           # two at a time (CPU: needs the RAM; one GPU: keep 1)
    ernie-dpo series --gpus 0,1,2,3     # one experiment per GPU, four at a time (docs/scaling.md)
    ernie-dpo series --gpus 0,1,2,3 --gpus-per-experiment 2    # two at a time, on GPUs 0,1 and 2,3
    ernie-dpo series --launcher sky --bucket BUCKET            # one SkyPilot managed job per experiment
    ernie-dpo series --dry              # print the commands and stop (with any of the above)

What it does, in order:
1. `dvc repro evaluate_baseline`: prepared data, test set and baseline metrics in the workspace (no-op when done).
2. Counts the pairs of each training-set variant with the trainset stage's own code, and plans exp1-exp4
   (ernie_dpo/series.py: sizes, max_steps = one epoch, exp4 = 2 epochs with 10% warmup).
3. Removes earlier experiments with these names on this commit, queues the four with every varied key set
   (`dvc exp run --queue -n expN -S ...`) and runs the queue (`dvc exp run --run-all -j N`).
   Queued experiments run in temp folders: the workspace and its params.yaml are left as they are.
   With --gpus: in waves of as many experiments as there are device groups, each experiment with its own group
   (`-S 'engine.devices="2"'`), each wave finished before the next is queued (see `waves` for why).
4. Checks every experiment finished, then writes metrics/report.md (ernie-dpo report).

With --launcher sky, steps 3-4 become one `sky jobs launch sky/experiment.yaml --env EXP_NAME=expN
--env EXP_PARAMS="<the same overrides>" ...` per experiment, on the commit pushed to the git remote, after checking
that the baseline is committed and on the DVC remote (the jobs pull it instead of recomputing it). Their results
come back with `dvc exp pull origin exp1 exp2 exp3 exp4`; `ernie-dpo report` then writes the report.
"""
import argparse
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import get_logger, load_params, read_json, read_jsonl
from .data import DataError, pool_outside, select_pairs, split_eval
from .report import NAMES, find



def count_pairs(pool, baseline_mean, tolerance, eval_pairs=0, seed=2025):
    """Training pairs each variant would get from this pool, after its held-out eval pairs (trainset.eval_pairs)
    are set aside -- the trainset stage's own code, so a planned trainset.size always exists."""
    def kept(pairs):
        try:
            return len(split_eval(pairs, eval_pairs, seed)[0])
        except DataError:  # one prompt only: all of it would be held out, nothing left to train (plan() says so)
            return 0

    return {
        "near_baseline": kept(select_pairs(pool, "near_baseline", 1.2, baseline_mean, tolerance)),
        "ratio_1.2": kept(select_pairs(pool, "ratio", 1.2)),
        "ratio_2": kept(select_pairs(pool, "ratio", 2.0)),
    }


def epoch_steps(pairs, global_batch_size):
    return max(1, math.ceil(pairs / global_batch_size))


def plan(counts, global_batch_size, warmup_steps):
    """{experiment name: {param: value}} for `dvc exp run -n <name> -S param=value ...`."""
    if counts["near_baseline"] == 0:
        raise ValueError("no training pair has a rejected answer near the baseline's mean length and >= 1.2x chosen; "
                         "raise trainset.baseline_tolerance")
    if counts["ratio_2"] == 0:
        raise ValueError("no training pair has rejected >= 2x chosen")
    n1, n3 = counts["near_baseline"], counts["ratio_2"]
    if counts["ratio_1.2"] < n1:  # exp2 trains as many >= 1.2x pairs as exp1 has; after each variant's own held-out
        raise ValueError(f"exp2 needs {n1} pairs with rejected >= 1.2x chosen (as many as exp1 has) but only "
                         f"{counts['ratio_1.2']} are left after the held-out pairs; lower trainset.eval_pairs")
    s1, s3 = epoch_steps(n1, global_batch_size), epoch_steps(n3, global_batch_size)
    return {
        "exp1": {"trainset.strategy": "near_baseline", "trainset.min_ratio": 1.2, "trainset.size": 0,
                 "train.max_steps": s1, "train.warmup_steps": warmup_steps},
        "exp2": {"trainset.strategy": "ratio", "trainset.min_ratio": 1.2, "trainset.size": n1,
                 "train.max_steps": s1, "train.warmup_steps": warmup_steps},
        "exp3": {"trainset.strategy": "ratio", "trainset.min_ratio": 2.0, "trainset.size": 0,
                 "train.max_steps": s3, "train.warmup_steps": warmup_steps},
        "exp4": {"trainset.strategy": "ratio", "trainset.min_ratio": 2.0, "trainset.size": 0,
                 "train.max_steps": 2 * s3, "train.warmup_steps": max(1, int(0.1 * 2 * s3))},
    }


def basis(params):
    """The workspace values the plan was computed from. Each experiment is composed afresh from conf/ + its profile
    (Hydra), so a value set in the workspace with `dvc exp run -S train.global_batch_size=1 ...` would otherwise be
    back at the profile's value in the experiments -- steps planned for batch 1, trained at batch 4. Every experiment
    carries them explicitly."""
    t, s = params["train"], params["trainset"]
    return {"train.global_batch_size": t["global_batch_size"], "trainset.baseline_tolerance": s["baseline_tolerance"],
            "trainset.eval_pairs": s["eval_pairs"], "trainset.seed": s["seed"]}


def overrides(params):
    """`-S key=value` arguments, in a stable order."""
    out = []
    for key, value in params.items():
        out += ["-S", f"{key}={value}"]
    return out


# ------------------------------------------------------------------------------------------ where experiments run

def device_groups(gpus, per_experiment=1):
    """--gpus "0,1,2,3" -> ["0", "1", "2", "3"]; with per_experiment 2 -> ["0,1", "2,3"]: each one experiment's
    engine.devices. GPUs that would not fill a whole group are refused, not silently left idle."""
    ids = [g.strip() for g in str(gpus).split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise ValueError(f"--gpus takes GPU ids like 0,1,2,3, got {gpus!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus names a GPU twice: {gpus!r}")
    if per_experiment < 1 or len(ids) % per_experiment:
        raise ValueError(f"{len(ids)} GPUs ({gpus}) do not split into groups of {per_experiment}")
    return [",".join(ids[i:i + per_experiment]) for i in range(0, len(ids), per_experiment)]


def waves(names, groups):
    """[[(name, devices), ...], ...]: at most len(groups) experiments at a time, each on a device group of its own.

    Why waves, and not the whole queue with `-j len(groups)` and the groups handed out round-robin: DVC's queue does
    start experiments in the order they were queued (its filesystem broker takes the oldest message first), but an
    experiment's devices are fixed when it is queued and experiments finish in any order -- exp3 (GPU 0) would start
    as soon as exp2 (GPU 1) finished, while exp1 was still training on GPU 0. Nor can each queue worker get a GPU of
    its own: the workers inherit the environment of the one process that starts them. So each wave is queued and run
    to its end before the next is queued; a GPU whose experiment ends early waits for the rest of its wave."""
    n = len(groups)
    return [[(name, groups[k]) for k, name in enumerate(names[i:i + n])] for i in range(0, len(names), n)]


def queue_command(name, profile, params, devices=None):
    """`dvc exp run --queue` arguments (after `dvc`) for one experiment, with its own engine.devices if given."""
    cmd = ["exp", "run", "--queue", "-n", name, "-S", f"profile={profile}", *overrides(params)]
    if devices is not None:
        cmd += ["-S", f'engine.devices="{devices}"']  # quoted for Hydra: unquoted, 0,1 would be a sweep over 0 and 1
    return cmd


def queue_plan(experiments, profile, groups=None, jobs=1):
    """[(queue commands, run command), ...], one per wave; without groups a single wave, `jobs` at a time."""
    batches = waves(list(experiments), groups) if groups else [[(name, None) for name in experiments]]
    return [([queue_command(name, profile, experiments[name], devices) for name, devices in batch],
             ["exp", "run", "--run-all", "-j", str(len(batch) if groups else jobs)]) for batch in batches]


SKY_TASK = "sky/experiment.yaml"


def exp_params(profile, params):
    """EXP_PARAMS of sky/experiment.yaml: the same overrides as the local `-S` ones, separated by spaces (its `run`
    splits them on spaces and passes each as one -S)."""
    values = [f"profile={profile}", *(f"{key}={value}" for key, value in params.items())]
    spaced = [v for v in values if len(v.split()) != 1]
    if spaced:
        raise ValueError(f"EXP_PARAMS cannot carry a value with a space: {spaced}")
    return " ".join(values)


def sky_commands(experiments, profile, repo_url, ref, bucket, task=SKY_TASK, sky="sky"):
    """One `sky jobs launch` per experiment: its name, overrides, the commit to clone and the checkpoint bucket."""
    return [[sky, "jobs", "launch", task, "-n", f"ernie-dpo-{name}", "-y", "-d",
             "--env", f"EXP_NAME={name}", "--env", f"EXP_PARAMS={exp_params(profile, params)}",
             "--env", f"REPO_URL={repo_url}", "--env", f"REPO_REF={ref}", "--env", f"CKPT_BUCKET={bucket}"]
            for name, params in experiments.items()]


# ------------------------------------------------------------------------------------------ ernie-dpo series

log = get_logger("series")
DVC = [sys.executable, "-m", "dvc"]


def sh(args, check=True):
    log.info("$ %s", shlex.join(args[2:] if args[:3] == DVC else args))
    r = subprocess.run(args)
    if check and r.returncode != 0:
        sys.exit(f"series: `{shlex.join(args)}` failed (exit {r.returncode})")
    return r


def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def pending_queue():
    """Names of experiments already queued or running in DVC's queue (a queue run would run them too)."""
    from dvc.repo import Repo

    with Repo() as repo:
        q = repo.experiments.celery_queue
        return [e.name or e.stash_rev[:7] for e in [*q.iter_active(), *q.iter_queued()]]


def sky_binary():
    """SkyPilot from its own environment (`make sky-venv`), else a `sky` on PATH."""
    local = Path(".venv-sky/bin/sky")
    return str(local) if local.exists() else shutil.which("sky")


def sky_preflight(remote, names):
    """What the cloud jobs need from here: this commit on the git remote, no experiment of these names there yet,
    and the baseline committed and on a DVC remote the cloud can reach (the jobs pull it instead of recomputing)."""
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
    sh(DVC + ["repro", "--pull", "evaluate_baseline", "probe_baseline"])
    changed = git("status", "--porcelain", "--", "dvc.lock", "params.yaml", "metrics")
    if changed:
        sys.exit("series: the baseline in the workspace is not the committed one; the jobs start from the commit. "
                 "Commit (and push) it first:\n" + changed)
    sh(DVC + ["push", "--with-deps", "evaluate_baseline", "probe_baseline"])


def run_queue(steps):
    """Queue each wave's experiments and run them (`dvc exp run --run-all` waits for the wave to end)."""
    for queue, run in steps:
        for cmd in queue:
            sh(DVC + cmd)
        sh(DVC + run, check=False)  # a failed experiment is reported afterwards; the next wave still runs


def launch_sky(experiments, profile, args):
    sky = sky_binary() or "sky"
    try:
        repo_url = git("remote", "get-url", args.git_remote)
    except subprocess.CalledProcessError:
        sys.exit(f"series: no git remote {args.git_remote!r}: the jobs clone the project from it and push to it")
    cmds = sky_commands(experiments, profile, repo_url, git("rev-parse", "HEAD"), args.bucket, args.task, sky)
    names = " ".join(experiments)
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
    log.info("launched %d managed jobs. %s", len(cmds), after)


def main(argv=None):
    """`ernie-dpo series`: queue exp1-exp4 as named DVC experiments, run them, write the report."""
    ap = argparse.ArgumentParser(prog="ernie-dpo series", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, help="experiments run at the same time (default 1; one GPU: 1)")
    ap.add_argument("--gpus", help="GPU ids, e.g. 0,1,2,3: every experiment gets its own GPU (engine.devices) and as "
                                   "many run at once as there are GPUs, never two on one GPU")
    ap.add_argument("--gpus-per-experiment", type=int, default=1, metavar="N",
                    help="with --gpus: N GPUs per experiment (0,1 and 2,3 for --gpus 0,1,2,3 and N=2)")
    ap.add_argument("--launcher", choices=("local", "sky"), default="local",
                    help="local: DVC's queue on this machine; sky: one SkyPilot managed job per experiment "
                         f"({SKY_TASK}, docs/scaling.md)")
    ap.add_argument("--bucket", help="--launcher sky: the bucket the jobs keep their checkpoints in (CKPT_BUCKET)")
    ap.add_argument("--git-remote", default="origin",
                    help="--launcher sky: the git remote the jobs clone from and push their experiments to")
    ap.add_argument("--task", default=SKY_TASK, help="--launcher sky: the SkyPilot task file")
    ap.add_argument("--dry", action="store_true", help="print the plan and the commands, run nothing")
    args = ap.parse_args(argv)
    groups = None
    if args.gpus:
        try:
            groups = device_groups(args.gpus, args.gpus_per_experiment)
        except ValueError as e:
            ap.error(str(e))
        if args.jobs is not None and args.jobs != len(groups):
            ap.error(f"--jobs {args.jobs} with {len(groups)} GPU groups: --gpus already runs one experiment per group")
    if args.launcher == "sky" and (args.gpus or args.jobs):
        ap.error("--launcher sky: every job gets GPUs of its own (resources in the task file); --gpus and --jobs are "
                 "for this machine")
    if args.launcher == "sky" and not args.bucket:
        ap.error("--launcher sky needs --bucket (where the jobs keep the checkpoints they resume from)")
    start = time.time()

    # Uncommitted changes to conf/ would be copied into every queued experiment: refuse rather than mix them in.
    # (Cloud jobs clone the commit: there, any uncommitted change, sky/ included, would be missing instead.)
    paths = ["conf", "dvc.yaml", "stages", "ernie_dpo"] + (["sky"] if args.launcher == "sky" else [])
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths],
                           capture_output=True, text=True, check=True).stdout.strip()
    if dirty and not args.dry:
        sys.exit("series: commit or revert these changes first (they would enter every experiment):\n" + dirty)

    params = load_params()
    profile = params["profile_name"]
    if not args.dry:
        if args.launcher == "sky":
            sky_preflight(args.git_remote, NAMES)
        else:
            pending = pending_queue()
            if pending:  # they would run in the same queue run, on whatever devices they were queued with
                sys.exit(f"series: DVC's queue already holds {', '.join(pending)} (`dvc queue status`); let them "
                         "finish or remove them (`dvc queue remove --queued`) first")
            sh(DVC + ["repro", "evaluate_baseline"])
    try:
        pool, _, _ = pool_outside(read_jsonl("data/prepared/dpo.jsonl"), read_jsonl("data/testset/testset.jsonl")
                                  + read_jsonl("data/testset/validation.jsonl"))
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"series: {e} (run `dvc repro evaluate_baseline` first)")
    baseline_mean = read_json("metrics/baseline.json")["baseline"]["chars_mean"]
    b = basis(params)  # what the plan is computed from is what every experiment is given
    counts = count_pairs(pool, baseline_mean, b["trainset.baseline_tolerance"], b["trainset.eval_pairs"],
                         b["trainset.seed"])
    t = params["train"]
    experiments = {name: {**p, **b}
                   for name, p in plan(counts, b["train.global_batch_size"], t["warmup_steps"]).items()}
    log.info("profile %s: pool of %d pairs outside the test set; near-baseline %d, ratio>=1.2 %d, ratio>=2 %d; "
             "global batch %d", profile, len(pool), counts["near_baseline"], counts["ratio_1.2"], counts["ratio_2"],
             t["global_batch_size"])
    for name, p in experiments.items():
        log.info("%s: %s", name, ", ".join(f"{k}={v}" for k, v in p.items()))
    if args.launcher == "sky":
        return launch_sky(experiments, profile, args)
    if groups and params["engine"]["device"] == "cpu":
        log.warning("engine.device is cpu (profile %s): --gpus only sets how many experiments run at once here; "
                    "each still gets its engine.devices value, which CPU stages ignore", profile)
    steps = queue_plan(experiments, profile, groups, args.jobs or 1)
    if args.dry:
        for k, (queue, run) in enumerate(steps):
            if groups:
                placed = ", ".join(f"{name} on GPU {devices}" for name, devices in waves(list(experiments), groups)[k])
                print(f"# wave {k + 1} of {len(steps)}: {placed}")
            for cmd in queue + [run]:
                print("dvc " + shlex.join(cmd))
        return

    import dvc.api

    existing = [r["Experiment"] for r in dvc.api.exp_show() if r.get("Experiment") in NAMES and r["typ"] != "baseline"]
    if existing:
        log.info("replacing earlier experiments on this commit: %s", ", ".join(existing))
        sh(DVC + ["exp", "remove", *existing])
    run_queue(steps)

    done = find(dvc.api.exp_show(), NAMES)  # the finished ones (with tuned metrics)
    failed = [n for n in experiments if n not in done]
    for n in experiments:
        if n in done:
            log.info("%s: tuned mean %.1f / median %.1f chars (baseline %.1f / %.1f)", n, done[n]["tuned.chars_mean"],
                     done[n]["tuned.chars_median"], done[n]["baseline.chars_mean"], done[n]["baseline.chars_median"])
    if failed:
        sys.exit(f"series: {', '.join(failed)} did not finish; see `dvc queue status` and `dvc queue logs <name>`")
    log.info("series done in %.0f s", time.time() - start)
    from .report import main as report

    report([])
