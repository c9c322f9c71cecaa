"""Small helpers every stage needs: params, jsonl, json metrics, logging."""
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import yaml


def load_params(path="params.yaml", check=True):
    """params.yaml as a dict (safe_load: params are data, never code), checked against ernie_dpo.params.SCHEMA:
    a wrong value or an unknown key ends the stage at once, naming the key, the value and what is allowed."""
    import sys

    from .params import ParamError, validate

    with open(path, encoding="utf-8") as f:
        params = yaml.safe_load(f)
    if check:
        try:
            validate(params, path)
        except ParamError as e:
            sys.exit(str(e))
    return params


def stage_parser(script, doc):
    """The command line of a stage script: `--help` prints what the stage does (its docstring) and, read from
    dvc.yaml, the stages that run it with their inputs, outputs and params -- and runs nothing."""
    import argparse

    name = Path(script).stem
    return argparse.ArgumentParser(prog=f"python -m stages.{name}", description=doc, epilog=dvc_stage_summary(name),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def dvc_stage_summary(script_name, dvc_yaml="dvc.yaml"):
    """'In dvc.yaml: stage X: inputs ..., outputs ..., params ...' for every stage whose command runs the script."""
    try:
        with open(dvc_yaml, encoding="utf-8") as f:
            stages = yaml.safe_load(f)["stages"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "(run from the repository root to see its stages in dvc.yaml)"

    def names(items):
        return ", ".join(next(iter(i)) if isinstance(i, dict) else str(i) for i in items or [])

    lines = []
    for stage, spec in stages.items():
        if not re.search(rf"-m stages\.{script_name}\b", str(spec.get("cmd", ""))):
            continue
        outs = (spec.get("outs") or []) + (spec.get("metrics") or []) + (spec.get("plots") or [])
        lines += [f"dvc.yaml stage {stage!r}: {' '.join(str(spec['cmd']).split())}",
                  f"  inputs:  {names(spec.get('deps'))}", f"  outputs: {names(outs)}",
                  f"  params:  {names(spec.get('params'))}", ""]
    return "\n".join(lines) or f"(no stage in {dvc_yaml} runs stages.{script_name})"


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
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, sort_keys=False)
        f.write("\n")


def labels(params):
    """What every metrics file says it is about: which model and which data produced its numbers."""
    return {"model": params["model"]["name_or_path"], "data": params["data"]["raw_path"]}


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def get_logger(name):
    """This project's logger for a stage. The engine's own INFO lines (one per weight saved or loaded, in colour) are
    kept out of a stage's terminal; its warnings and errors still show, and the engine subprocess's whole output
    goes to its log file (logs/...)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine_logger = logging.getLogger("PaddleFormers")
    if not any(getattr(f, "ernie_dpo", False) for f in engine_logger.filters):
        quiet = logging.Filter()
        quiet.filter = lambda record: (record.levelno >= logging.WARNING and  # and not its torch notice, every time
                                       "compatibility issues between PaddlePaddle and PyTorch" not in record.getMessage())
        quiet.ernie_dpo = True
        engine_logger.addFilter(quiet)
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


# ------------------------------------------------------------------ inference progress (local and served alike)


def reply_record(test, reply, tokens, finish):
    """One answered prompt: the test messages + the reply as the last (assistant) message."""
    return {"id": test["id"], "messages": test["messages"] + [{"role": "assistant", "content": reply}],
            "reply": reply, "tokens": tokens, "finish_reason": finish}


def append_progress(f, rec):
    """Append one finished reply to an open progress file, on disk at once (a kill loses no finished reply)."""
    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_progress(out_path):
    """{id: record} of the complete lines of a previous (maybe interrupted) run; a torn last line is cut off."""
    done = {}
    path = Path(out_path)
    if not path.exists():
        return done
    good_bytes = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # killed mid-write: drop the partial line
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                break
            done[rec["id"]] = rec
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return done
