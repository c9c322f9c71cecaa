"""Download one file of a Hugging Face dataset repo over plain HTTPS, checked against a sha256.

Used by data/fetch.py for the cookbook's real data (llamafactory/DPO-En-Zh-20k, dpo_en.json). Standard library only:
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


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
