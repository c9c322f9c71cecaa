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
    ernie-dpo series --gpus 0,1,2,3     # a queue worker per GPU: each experiment on a free GPU (docs/scaling.md)
    ernie-dpo series --gpus 0,1,2,3 --gpus-per-experiment 2    # two workers, on GPUs 0,1 and 2,3
    ernie-dpo series --only exp3        # rerun exp3 alone; exp1, exp2, exp4 are kept
    ernie-dpo series --launcher sky --bucket s3://BUCKET --wait # one SkyPilot managed job per experiment
    ernie-dpo series --dry              # print the commands and stop (with any of the above)

What it does, in order:
1. `dvc repro evaluate_baseline`: prepared data, test set and baseline metrics in the workspace (no-op when done).
2. Counts the pairs of each training-set variant with the trainset stage's own code, and plans exp1-exp4
   (sizes, max_steps = one epoch, exp4 = 2 epochs with 10% warmup).
3. Removes earlier experiments with these names on this commit (with --only: those only), queues them with every
   varied key set (`dvc exp run --queue -n expN -S ...`) and starts DVC queue workers: one per --jobs, or one per
   GPU group, each with CUDA_VISIBLE_DEVICES set to its group. A worker takes the next queued experiment as soon as
   its last one ends; no GPU id is an experiment parameter, so an experiment is one cache entry on any GPU.
   Queued experiments run in temp folders: the workspace and its params.yaml are left as they are.
4. Reports each experiment as it ends -- a failure at once, with the tail of its log and the --only command that
   reruns it -- then writes metrics/report.md (ernie-dpo report) from every finished experiment.

With --launcher sky, steps 3-4 become one SkyPilot managed job per experiment (ernie_dpo/cloud.py): the commit
pushed to the git remote, checked first that a job could push its result home (`git push --dry-run` with GIT_TOKEN,
a write to the DVC remote), the baseline committed and on the DVC remote (the jobs pull it; --baseline computes it
in a job of its own). --wait polls the jobs, pulls the finished experiments and writes the report.
"""
import argparse
import math
import os
import shlex
import subprocess
import sys
import time

from . import cloud
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
    """--gpus "0,1,2,3" -> ["0", "1", "2", "3"]; with per_experiment 2 -> ["0,1", "2,3"]: each one queue worker's
    CUDA_VISIBLE_DEVICES (ids as nvidia-smi shows them, or GPU UUIDs). GPUs that would not fill a whole group are
    refused, not silently left idle."""
    ids = [g.strip() for g in str(gpus).split(",") if g.strip()]
    if not ids or not all(g.isdigit() or g.startswith(("GPU-", "MIG-")) for g in ids):
        raise ValueError(f"--gpus takes GPU ids like 0,1,2,3 (or GPU-<uuid>), got {gpus!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus names a GPU twice: {gpus!r}")
    if per_experiment < 1 or len(ids) % per_experiment:
        raise ValueError(f"{len(ids)} GPUs ({gpus}) do not split into groups of {per_experiment}")
    return [",".join(ids[i:i + per_experiment]) for i in range(0, len(ids), per_experiment)]


def queue_command(name, profile, params):
    """`dvc exp run --queue` arguments (after `dvc`) for one experiment. No GPU id among them: which GPU runs it is
    the worker's CUDA_VISIBLE_DEVICES, so the experiment is the same (one cache entry) whichever GPU it lands on."""
    return ["exp", "run", "--queue", "-n", name, "-S", f"profile={profile}", *overrides(params)]


# ------------------------------------------------------------------------------------------ ernie-dpo series

log = get_logger("series")
DVC = [sys.executable, "-m", "dvc"]


def sh(args, check=True):
    log.info("$ %s", shlex.join(args[2:] if args[:3] == DVC else args))
    r = subprocess.run(args)
    if check and r.returncode != 0:
        sys.exit(f"series: `{shlex.join(args)}` failed (exit {r.returncode})")
    return r


def pending_queue():
    """Names of experiments already queued or running in DVC's queue (a queue run would run them too)."""
    from dvc.repo import Repo

    with Repo() as repo:
        q = repo.experiments.celery_queue
        return [e.name or e.stash_rev[:7] for e in [*q.iter_active(), *q.iter_queued()]]


def start_workers(slots):
    """One DVC queue worker per slot, each with its own CUDA_VISIBLE_DEVICES (slot None: the environment as it is).

    DVC's queue runs every experiment in a worker process (`dvc exp queue-worker`, one experiment at a time each, the
    next queued one as soon as it is free) and a worker's experiments inherit its environment. `dvc queue start -j N`
    starts N workers from one environment; here each is started (DVC's own _spawn_worker, dvc 3.67) while
    CUDA_VISIBLE_DEVICES names its GPUs: a queue per GPU group, each GPU busy as long as experiments are waiting."""
    from dvc.repo import Repo

    with Repo() as repo:
        q = repo.experiments.celery_queue
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            for k, slot in enumerate(slots, 1):
                if slot is not None:
                    os.environ["CUDA_VISIBLE_DEVICES"] = slot
                log.info("queue worker %d%s", k, f": CUDA_VISIBLE_DEVICES={slot}" if slot is not None else "")
                q._spawn_worker(k)
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved


def queue_state(revs):
    """{stash rev: "queued" | "running" | "success" | "failed"} for the experiments this series queued."""
    from dvc.repo import Repo

    with Repo() as repo:
        q = repo.experiments.celery_queue
        state = {e.stash_rev: "queued" for e in q.iter_queued()}
        state.update({e.stash_rev: "running" for e in q.iter_active()})
        state.update({r.entry.stash_rev: "success" for r in q.iter_success()})
        state.update({r.entry.stash_rev: "failed" for r in q.iter_failed()})
    return {rev: state.get(rev, "queued") for rev in revs}


def log_tail(name, lines=30):
    out = subprocess.run(DVC + ["queue", "logs", name], capture_output=True, text=True)
    return "\n".join((out.stdout + out.stderr).splitlines()[-lines:])


def wait_for_idle_workers(timeout_s=180):
    """Workers of an earlier series still idling (DVC's exit after 60 s without work) would take the new experiments
    in THEIR environment, on their GPUs: stop them and wait until they are gone."""
    from dvc.repo import Repo

    deadline = time.time() + timeout_s
    with Repo() as repo:
        q = repo.experiments.celery_queue
        if q.worker_status():
            log.info("stopping idle DVC queue workers of an earlier run")
            q.shutdown()
        while q.worker_status():
            if time.time() > deadline:
                sys.exit("series: DVC queue workers of an earlier run do not stop (`dvc queue status`); "
                         "`dvc queue kill` them or wait for them to finish")
            time.sleep(2)


def run_local(experiments, profile, slots, poll_s=10):
    """Queue the experiments, start one worker per slot, report each experiment as it ends (a failure with the tail
    of its log, at once), and return {name: {"status": "success" | "failed", "at": when it was seen to end}}."""
    from dvc.repo import Repo

    wait_for_idle_workers()
    with Repo() as repo:
        before = {e.stash_rev for e in repo.experiments.celery_queue.iter_queued()}
    for name, params in experiments.items():
        sh(DVC + queue_command(name, profile, params))
    with Repo() as repo:
        revs = {e.stash_rev: e.name for e in repo.experiments.celery_queue.iter_queued() if e.stash_rev not in before}
    start_workers(slots)
    reported, started = {}, time.time()
    while len(reported) < len(revs):
        time.sleep(poll_s)
        for rev, status in queue_state(revs).items():
            name = revs[rev]
            if status in ("success", "failed") and name not in reported:
                reported[name] = {"status": status, "at": time.time()}
                if status == "failed":
                    log.error("%s FAILED after %.0f s (the others go on). Last lines of `dvc queue logs %s`:\n%s\n"
                              "Rerun it alone, keeping the others: ernie-dpo series --only %s", name,
                              time.time() - started, name, log_tail(name), name)
                else:
                    log.info("%s finished after %.0f s (%d of %d)", name, time.time() - started, len(reported),
                             len(revs))
    return reported


def parse_args(argv):
    """The command line, checked: (args, slots -- one queue worker's CUDA_VISIBLE_DEVICES each, or None --, names)."""
    ap = argparse.ArgumentParser(prog="ernie-dpo series", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, help="experiments run at the same time (default 1; one GPU: 1)")
    ap.add_argument("--gpus", help="GPU ids (nvidia-smi's), e.g. 0,1,2,3: one queue worker per GPU (group), each "
                                   "with CUDA_VISIBLE_DEVICES set to it; never two experiments on one GPU")
    ap.add_argument("--gpus-per-experiment", type=int, default=1, metavar="N",
                    help="with --gpus: N GPUs per experiment (0,1 and 2,3 for --gpus 0,1,2,3 and N=2)")
    ap.add_argument("--only", help="comma-separated experiment names (exp1..exp4): run these, keep the others")
    ap.add_argument("--launcher", choices=("local", "sky"), default="local",
                    help="local: DVC's queue on this machine; sky: one SkyPilot managed job per experiment "
                         f"({cloud.SKY_TASK}, docs/scaling.md)")
    ap.add_argument("--bucket", help="--launcher sky: the bucket URL the jobs keep their checkpoints in "
                                     "(s3://name, gs://name: the store is pinned)")
    ap.add_argument("--git-remote", default="origin",
                    help="--launcher sky: the git remote the jobs clone from and push their experiments to")
    ap.add_argument("--task", default=cloud.SKY_TASK, help="--launcher sky: the SkyPilot task file")
    ap.add_argument("--secret", action="append", metavar="NAME",
                    help="--launcher sky: an environment variable passed to the jobs as a SkyPilot secret (the DVC "
                         "remote's credentials, e.g. AWS_ACCESS_KEY_ID); GIT_TOKEN always is")
    ap.add_argument("--baseline", action="store_true",
                    help="--launcher sky: compute the baseline in a cloud job (then commit it, and run the series)")
    ap.add_argument("--wait", action="store_true",
                    help="--launcher sky: wait for the jobs, pull their experiments, write the report")
    ap.add_argument("--dry", action="store_true", help="print the plan and the commands, run nothing")
    args = ap.parse_args(argv)
    slots = [None] * (args.jobs or 1)
    if args.gpus:
        try:
            slots = device_groups(args.gpus, args.gpus_per_experiment)
        except ValueError as e:
            ap.error(str(e))
        if args.jobs is not None and args.jobs != len(slots):
            ap.error(f"--jobs {args.jobs} with {len(slots)} GPU groups: --gpus already runs one experiment per group")
    if args.launcher == "sky" and (args.gpus or args.jobs):
        ap.error("--launcher sky: every job gets GPUs of its own (resources in the task file); --gpus and --jobs are "
                 "for this machine")
    if args.launcher == "sky" and not args.bucket:
        ap.error("--launcher sky needs --bucket (where the jobs keep the checkpoints they resume from)")
    if args.launcher != "sky" and (args.secret or args.baseline or args.wait):
        ap.error("--secret, --baseline and --wait are for --launcher sky")
    only = [n.strip() for n in args.only.split(",")] if args.only else list(NAMES)
    unknown = sorted(set(only) - set(NAMES))
    if unknown:
        ap.error(f"--only: unknown experiment(s) {', '.join(unknown)}; the series has {', '.join(NAMES)}")
    return args, slots, only


def main(argv=None):
    """`ernie-dpo series`: queue exp1-exp4 as named DVC experiments, run them, write the report."""
    args, slots, only = parse_args(argv)
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
    if args.launcher == "sky" and not args.dry:  # before any VM starts: could the jobs bring their results home?
        cloud.local_checks(args.git_remote, ["baseline"] if args.baseline else only, baseline=not args.baseline)
    if args.launcher == "sky" and args.baseline:
        return cloud.launch({"baseline": {}}, profile, args, sh)
    if not args.dry and args.launcher == "local":
        pending = pending_queue()
        if pending:  # the new workers would run them too, in their environment
            sys.exit(f"series: DVC's queue already holds {', '.join(pending)} (`dvc queue status`); let them "
                     "finish or remove them (`dvc queue remove --queued`) first")
        sh(DVC + ["repro", "evaluate_baseline"])
    experiments = {n: p for n, p in plan_series(params).items() if n in only}
    for name, p in experiments.items():
        log.info("%s: %s", name, ", ".join(f"{k}={v}" for k, v in p.items()))
    if args.launcher == "sky":
        return cloud.launch(experiments, profile, args, sh)
    if args.gpus:
        if params["engine"]["device"] == "cpu":
            log.warning("engine.device is cpu (profile %s): --gpus only sets how many experiments run at once here",
                        profile)
        experiments = {n: {**p, "engine.gpus": args.gpus_per_experiment} for n, p in experiments.items()}
    if args.dry:
        return print_plan(experiments, profile, slots)

    import dvc.api

    existing = [r["Experiment"] for r in dvc.api.exp_show() if r.get("Experiment") in experiments
                and r["typ"] != "baseline"]
    if existing:
        log.info("replacing earlier experiments on this commit: %s", ", ".join(existing))
        sh(DVC + ["exp", "remove", *existing])
    ended = run_local(experiments, profile, slots)

    done = find(dvc.api.exp_show(), NAMES)  # every finished one of the series, this run's and earlier ones
    for n in NAMES:
        if n in done:
            log.info("%s: tuned mean %.1f / median %.1f chars (baseline %.1f / %.1f)", n, done[n]["tuned.chars_mean"],
                     done[n]["tuned.chars_median"], done[n]["baseline.chars_mean"], done[n]["baseline.chars_median"])
    log.info("series done in %.0f s", time.time() - start)
    from .report import main as report

    report([])  # every experiment of the series: a failed or not-run one shows as "not run"
    failed = [n for n, e in ended.items() if e["status"] != "success"]
    if failed:
        sys.exit(f"series: {', '.join(failed)} failed (logs above; `dvc queue logs <name>`); rerun: "
                 f"ernie-dpo series --only {','.join(failed)}")


def print_plan(experiments, profile, slots):
    for name, p in experiments.items():
        print("dvc " + shlex.join(queue_command(name, profile, p)))
    for k, slot in enumerate(slots, 1):
        print(f"# queue worker {k}" + (f": CUDA_VISIBLE_DEVICES={slot}" if slot is not None else ""))


def plan_series(params):
    """{name: overrides} for exp1-exp4 from the workspace's prepared data, test/validation sets and baseline."""
    try:
        pool, _, _ = pool_outside(read_jsonl("data/prepared/dpo.jsonl"), read_jsonl("data/testset/testset.jsonl")
                                  + read_jsonl("data/testset/validation.jsonl"))
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"series: {e} (run `dvc repro evaluate_baseline` first)")
    baseline_mean = read_json("metrics/baseline.json")["baseline"]["chars_mean"]
    b = basis(params)  # what the plan is computed from is what every experiment is given
    counts = count_pairs(pool, baseline_mean, b["trainset.baseline_tolerance"], b["trainset.eval_pairs"],
                         b["trainset.seed"])
    log.info("profile %s: pool of %d pairs outside the test set; near-baseline %d, ratio>=1.2 %d, ratio>=2 %d; "
             "global batch %d", params["profile_name"], len(pool), counts["near_baseline"], counts["ratio_1.2"],
             counts["ratio_2"], b["train.global_batch_size"])
    return {name: {**p, **b} for name, p in plan(counts, b["train.global_batch_size"],
                                                 params["train"]["warmup_steps"]).items()}
