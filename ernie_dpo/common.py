"""Small helpers every stage needs: params, jsonl, json metrics, logging."""
import hashlib
import json
import logging
import os
from pathlib import Path

import yaml


def load_params(path="params.yaml"):
    """params.yaml as a dict (safe_load: params are data, never code)."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def read_jsonl(path):
    """List of records from a jsonl file; a bad line is an error naming file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return records


def write_jsonl(path, records):
    """Write records one per line, keys in insertion order, UTF-8 kept readable.

    Written to a temp file and renamed so a killed stage never leaves half a file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def get_logger(name):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return logging.getLogger(name)


def fingerprint(paths, params):
    """A short hash of some files (directories walked, sorted) and a params dict: names a resumable work folder.

    Progress kept under such a name (partial inference, training checkpoints) is only ever reused by a run with the
    same inputs; any change of model, data or params starts afresh.
    """
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
        for f in files:
            if f.name == "flex-ckpt.auto_generated.metadata":  # rewritten by the engine on every load
                continue
            h.update(str(f.relative_to(root.parent)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]
