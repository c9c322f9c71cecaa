"""Training checkpoints of one cloud experiment, copied to a bucket mount so that a preempted managed job resumes.

Why not simply put checkpoints/ on the mount (a symlink or a bind mount)? The train stage trains in
checkpoints/train-<hash>/ and, when done, renames the finished model files from there into models/train; a rename
across filesystems fails (OSError: [Errno 18] Invalid cross-device link), so the work folder has to stay on the VM's
own disk. Instead, `run` in sky/experiment.yaml does

    python sky/checkpoints.py restore $CKPT_MOUNT/$EXP_NAME checkpoints       # before training: bucket -> disk
    python sky/checkpoints.py mirror checkpoints $CKPT_MOUNT/$EXP_NAME &       # while training: disk -> bucket

`mirror` copies the newest checkpoint the engine has finished writing (weights.checkpoint_is_complete) once: its
files first, then a manifest (file -> size); the bucket keeps the two newest copies of each train-<hash> folder (the
engine itself keeps one, save_total_limit 1). `restore` copies back, per train-<hash> folder, the newest copy whose
manifest is there and whose files all have the listed sizes. Two, because a bucket mount uploads in the background in
no set order: a preemption may catch the newest copy half-uploaded (then the one before is used), and the removal of
an older copy may reach the bucket before the newer copy's files do. The train stage then
resumes from the restored checkpoint by itself: the same inputs give the same train-<hash> folder (stages/train.py),
any other inputs another one, so a checkpoint is never used by a run it does not belong to.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from ernie_dpo.weights import (
    checkpoint_is_complete,  # the installed project (`make install-gpu` in setup)
)

MANIFEST = "manifest.json"  # in the bucket's copy only, written last
KEEP = 2  # copies per train-<hash> folder in the bucket


def log(msg):
    print(f"checkpoints: {msg}", file=sys.stderr, flush=True)


def checkpoints(work):
    """checkpoint-N folders of one train-<hash> folder, oldest first."""
    found = [c for c in Path(work).glob("checkpoint-*") if c.is_dir() and c.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda c: int(c.name.split("-")[1]))


def files_of(folder):
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def copied_whole(copy):
    """Does the bucket's copy hold every file its manifest lists, at the listed size?"""
    try:
        listed = json.loads((copy / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return all((copy / name).is_file() and (copy / name).stat().st_size == size for name, size in listed.items())


def copy_files(src, dst, names):
    for name in names:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst / name)  # content only: a bucket mount may refuse chmod / utime


def mirror_once(local, bucket):
    """Copy finished local checkpoints not yet in the bucket; returns the ones copied."""
    done = []
    for work in sorted(Path(local).glob("train-*")):
        finished = [c for c in checkpoints(work) if checkpoint_is_complete(c)]
        if not finished:
            continue
        newest = finished[-1]
        copy = Path(bucket) / work.name / newest.name
        if copied_whole(copy):
            continue
        shutil.rmtree(copy, ignore_errors=True)  # a copy interrupted earlier
        try:
            sizes = files_of(newest)
            copy.mkdir(parents=True)
            copy_files(newest, copy, sizes)
        except FileNotFoundError:  # the engine removed it meanwhile (a newer one is done): next round
            shutil.rmtree(copy, ignore_errors=True)
            continue
        (copy / MANIFEST).write_text(json.dumps(sizes, indent=1))
        keep = [c for c in checkpoints(copy.parent) if copied_whole(c)][-KEEP:]
        for old in checkpoints(copy.parent):
            if old not in keep:  # older copies, and copies a killed mirror left half-done
                shutil.rmtree(old, ignore_errors=True)
        log(f"copied {newest} to {copy}")
        done.append(copy)
    return done


def restore(bucket, local):
    """Copy the newest whole checkpoint of each train-<hash> folder of the bucket back to disk; returns them."""
    done = []
    for work in sorted(Path(bucket).glob("train-*")):
        whole = [c for c in checkpoints(work) if copied_whole(c)]
        if not whole:
            continue
        target = Path(local) / work.name / whole[-1].name
        if checkpoint_is_complete(target):
            continue
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        listed = json.loads((whole[-1] / MANIFEST).read_text())
        copy_files(whole[-1], target, listed)
        log(f"restored {target} from {whole[-1]}: the train stage resumes from it")
        done.append(target)
    if not done:
        log(f"nothing to restore from {bucket}")
    return done


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python sky/checkpoints.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("restore", help="bucket -> local checkpoints/ (before training)")
    r.add_argument("bucket")
    r.add_argument("local")
    m = sub.add_parser("mirror", help="local checkpoints/ -> bucket, every --every seconds until killed")
    m.add_argument("local")
    m.add_argument("bucket")
    m.add_argument("--every", type=float, default=60)
    m.add_argument("--once", action="store_true", help="one round, then exit")
    args = ap.parse_args(argv)
    if args.command == "restore":
        restore(args.bucket, args.local)
        return
    while True:
        mirror_once(args.local, args.bucket)
        if args.once:
            return
        time.sleep(args.every)


if __name__ == "__main__":
    main()
