"""Download one file of a Hugging Face dataset repo over plain HTTPS, checked against a sha256.

Used by `ernie-dpo fetch` for the cookbook's real data (llamafactory/DPO-En-Zh-20k, dpo_en.json). Standard library only:
urllib follows the hub's redirect to its file CDN; the commit a branch name resolved to is read from the hub's
X-Repo-Commit header on the first response, so a download of "main" can be pinned to that exact commit afterwards.
"""
import hashlib
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .common import sha256_of

RETRY_HTTP = {429, 500, 502, 503, 504}


class FetchError(RuntimeError):
    pass


def file_url(endpoint, dataset, revision, filename):
    return f"{endpoint.rstrip('/')}/datasets/{dataset}/resolve/{revision}/{filename}"


class _KeepCommit(urllib.request.HTTPRedirectHandler):
    """Remembers X-Repo-Commit from a redirect response (the CDN's final response does not carry it)."""

    def __init__(self):
        self.commit = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.commit = self.commit or headers.get("X-Repo-Commit")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url, dest, expected_sha256=None, timeout=30, retries=3, backoff=2.0):
    """Stream url to dest (via dest.part, renamed only when complete and verified).

    Returns {"sha256", "bytes", "commit"}. Raises FetchError: unreachable after `retries` tries, an HTTP error that
    retrying cannot fix (404, 401, ...), or a sha256 other than expected_sha256 (the partial file is removed and an
    existing dest is left untouched).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last = None
    for attempt in range(1, retries + 1):
        keep = _KeepCommit()
        opener = urllib.request.build_opener(keep)
        req = urllib.request.Request(url, headers={"User-Agent": "ernie-dpo-fetch"})
        try:
            with opener.open(req, timeout=timeout) as resp, open(part, "wb") as out:
                commit = keep.commit or resp.headers.get("X-Repo-Commit")
                total = int(resp.headers.get("Content-Length") or 0) or None
                h, size = hashlib.sha256(), 0
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        out.write(chunk)
                        h.update(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
            if total is not None and size != total:
                raise ConnectionError(f"connection closed after {size} of {total} bytes")
            break
        except urllib.error.HTTPError as e:
            part.unlink(missing_ok=True)
            if e.code not in RETRY_HTTP:
                raise FetchError(f"{url}: HTTP {e.code} {e.reason} (wrong dataset, file or revision? private repo?)")
            last = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            part.unlink(missing_ok=True)
            last = str(getattr(e, "reason", e))
        if attempt < retries:
            time.sleep(backoff * 2 ** (attempt - 1))
    else:
        raise FetchError(f"cannot download {url} after {retries} tries: {last}")
    digest = h.hexdigest()
    if expected_sha256 and digest != expected_sha256.lower():
        part.unlink(missing_ok=True)
        raise FetchError(f"checksum mismatch for {url}: expected sha256 {expected_sha256}, got {digest} "
                         f"({size} bytes); nothing was written to {dest}")
    os.replace(part, dest)
    return {"sha256": digest, "bytes": size, "commit": commit}


# ------------------------------------------------------------------------------------------ ernie-dpo fetch

FETCH_HELP = """Download the cookbook's real data once, pin it, verify it, and hand it to DVC.

    ernie-dpo fetch                  # llamafactory/DPO-En-Zh-20k dpo_en.json -> data/raw/dpo_en.json + dvc add
    HF_ENDPOINT=https://hf-mirror.com ernie-dpo fetch      # through a mirror

Pinning: the first download resolves fetch.revision (a branch such as "main") to the commit the hub served and
records that commit and the file's sha256 in data/raw/dpo_en.source.json (commit it). Every later fetch downloads
that exact commit and refuses a file with another sha256. This project could not pin the values itself: no model or
dataset hub is reachable from where it was built, so the pin is made by the first user who fetches.

`dvc add` then tracks data/raw/dpo_en.json (commit the .dvc file): teammates get it with `dvc pull` from the DVC
remote instead of downloading it again.

No network? Download dpo_en.json on another machine and either copy it to data/raw/dpo_en.json and run
`dvc add data/raw/dpo_en.json`, or point the pipeline at it: `dvc exp run -S profile=cookbook -S data.raw_path=/path/dpo_en.json`.
"""
OFFLINE_HELP = (
    "What to do: check the network (or set HF_ENDPOINT to a reachable mirror); or download {file} elsewhere, copy it "
    "to {dest} and run `dvc add {dest}`; or run the pipeline on a local copy: "
    "`dvc exp run -S profile=cookbook -S data.raw_path=/path/to/{file}`."
)


def main(argv=None):
    """`ernie-dpo fetch`: the cookbook's data, downloaded once, pinned, verified, `dvc add`ed."""
    import argparse
    import json
    import subprocess
    import sys

    from .common import get_logger, load_params

    log = get_logger("fetch")
    ap = argparse.ArgumentParser(prog="ernie-dpo fetch", description=FETCH_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", default=None, help="hub URL (default: $HF_ENDPOINT, else params fetch.endpoint)")
    ap.add_argument("--no-dvc-add", action="store_true", help="only download and verify")
    ap.add_argument("--retries", type=int, default=3)
    args = ap.parse_args(argv)
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
