"""Download the cookbook's real data once, pin it, verify it, and hand it to DVC.

    python data/fetch.py                  # llamafactory/DPO-En-Zh-20k dpo_en.json -> data/raw/dpo_en.json + dvc add
    HF_ENDPOINT=https://hf-mirror.com python data/fetch.py      # through a mirror

Pinning: the first download resolves fetch.revision (a branch such as "main") to the commit the hub served and
records that commit and the file's sha256 in data/raw/dpo_en.source.json (commit it). Every later fetch downloads
that exact commit and refuses a file with another sha256. This project could not pin the values itself: no model or
dataset hub is reachable from where it was built, so the pin is made by the first user who fetches.

`dvc add` then tracks data/raw/dpo_en.json (commit the .dvc file): teammates get it with `dvc pull` from the DVC
remote instead of downloading it again.

No network? Download dpo_en.json on another machine and either copy it to data/raw/dpo_en.json and run
`dvc add data/raw/dpo_en.json`, or point the pipeline at it: `dvc exp run -S profile=cookbook -S data.raw_path=/path/dpo_en.json`.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ernie_dpo.common import get_logger, load_params  # noqa: E402
from ernie_dpo.fetch import FetchError, download, file_url, sha256_of  # noqa: E402

log = get_logger("fetch")
OFFLINE_HELP = (
    "What to do: check the network (or set HF_ENDPOINT to a reachable mirror); or download {file} elsewhere, copy it "
    "to {dest} and run `dvc add {dest}`; or run the pipeline on a local copy: "
    "`dvc exp run -S profile=cookbook -S data.raw_path=/path/to/{file}`."
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", default=None, help="hub URL (default: $HF_ENDPOINT, else params fetch.endpoint)")
    ap.add_argument("--no-dvc-add", action="store_true", help="only download and verify")
    ap.add_argument("--retries", type=int, default=3)
    args = ap.parse_args()
    f = load_params()["fetch"]
    endpoint = args.endpoint or os.environ.get("HF_ENDPOINT") or f["endpoint"]
    dest = Path("data/raw") / f["file"]
    pin_path = dest.with_name(Path(f["file"]).stem + ".source.json")
    pin = json.loads(pin_path.read_text()) if pin_path.exists() else None
    revision = pin["commit"] if pin else f["revision"]
    expected = pin["sha256"] if pin else None

    if dest.exists() and expected and sha256_of(dest) == expected:
        log.info("%s is already here and matches the pinned sha256 %s; nothing to download", dest, expected)
    else:
        url = file_url(endpoint, f["dataset"], revision, f["file"])
        log.info("downloading %s (%s)", url, f"pinned: commit {revision}, sha256 {expected}" if pin
                 else f"not pinned yet: revision {revision!r} will be pinned to the commit served")
        try:
            got = download(url, dest, expected, timeout=f["timeout_s"], retries=args.retries)
        except FetchError as e:
            sys.exit(f"fetch: {e}\n" + OFFLINE_HELP.format(file=f["file"], dest=dest))
        log.info("%s: %d bytes, sha256 %s, commit %s", dest, got["bytes"], got["sha256"], got["commit"] or "unknown")
        if not pin:
            pin = {"dataset": f["dataset"], "file": f["file"], "commit": got["commit"] or revision,
                   "sha256": got["sha256"], "bytes": got["bytes"], "endpoint": endpoint,
                   "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if not got["commit"]:
                log.warning("the server sent no X-Repo-Commit header: pinned to revision %r, which may move", revision)
            pin_path.write_text(json.dumps(pin, indent=2) + "\n")
            log.info("pinned in %s: commit it so every later fetch gets exactly this file", pin_path)
    if not args.no_dvc_add:
        subprocess.run([sys.executable, "-m", "dvc", "add", str(dest)], check=True)
        log.info("DVC tracks %s: commit %s.dvc and %s, then `dvc push` shares it", dest, dest, pin_path)


if __name__ == "__main__":
    main()
