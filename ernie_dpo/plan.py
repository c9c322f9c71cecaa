"""`ernie-dpo run` and `ernie-dpo preview`: a `dvc exp run -S ...` whose overrides the project checks first, and
which stages it would run, and why, before anything runs.

Why these exist: DVC composes `-S` overrides with Hydra before any stage runs, so a misspelt key
(`-S train.lerning_rate=1e-5`) gets Hydra's answer ("Could not override ... To append to your config use
+train.lerning_rate=1e-5": wrong advice, since the appended key would be silently ignored) instead of the project's
did-you-mean. And DVC's own previews fail on a clean checkout (`dvc exp run --dry`, and
`dvc repro --dry --allow-missing` once a parameter changes), so nobody can see what a change would cost.

Usage:
    ernie-dpo run -S train.learning_rate=1e-5 [any other `dvc exp run` arguments]
    ernie-dpo preview -S trainset.min_ratio=2.0

Both check every override against ernie_dpo/params.py (the key exists, with the nearest known name if not; the value
composes and is allowed) and stop in seconds on a problem. `run` then runs `dvc exp run` with the same arguments.
`preview` compares the composed parameters, the code and data files and the outputs with dvc.lock and the DVC cache,
stage by stage, and prints the stages that would run with the reason for each.
"""
import difflib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import yaml

from .params import SCHEMA, flatten, problems

GROUPS = {"profile": "conf/profile", "server": "conf/server"}  # Hydra config groups: `-S profile=smol`


class PlanError(ValueError):
    pass


def split_args(argv):
    """(overrides, other arguments) from a `dvc exp run`-style argument list (-S / --set-param, `-S=k=v` too)."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("-S", "--set-param") and i + 1 < len(argv):
            overrides.append(argv[i + 1])
            i += 2
            continue
        for flag in ("-S=", "--set-param="):
            if a.startswith(flag):
                overrides.append(a[len(flag):])
                break
        else:
            rest.append(a)
        i += 1
    return overrides, rest


def check_keys(overrides, root="."):
    """Every override names a known parameter or config group; problems as sentences with the nearest name."""
    found = []
    for o in overrides:
        if "=" not in o:
            found.append(f"{o!r}: an override is key=value, e.g. -S train.learning_rate=1e-5")
            continue
        key, value = o.split("=", 1)
        plus = key.startswith("+")
        key = key.lstrip("+~")
        if key in GROUPS:
            options = sorted(p.stem for p in (Path(root) / GROUPS[key]).glob("*.yaml"))
            if value not in options:
                near = difflib.get_close_matches(value, options, n=1)
                found.append(f"{key}={value}: no such {key}; one of {', '.join(options)}"
                             + (f" (did you mean {key}={near[0]}?)" if near else ""))
            continue
        if key not in SCHEMA:
            near = difflib.get_close_matches(key, SCHEMA, n=1)
            found.append(f"{key}: unknown parameter" + (f" (did you mean {near[0]}?)" if near else "")
                         + ("; a '+' would add it as a new key that nothing reads" if plus else ""))
        elif plus:
            found.append(f"+{key}: the key exists, write -S {key}={value} (without '+')")
    return found


def compose(overrides, root="."):
    """params.yaml as `dvc exp run -S ...` would compose it (Hydra, conf/), as a dict; nothing is written to root."""
    from dvc.utils.hydra import compose_and_dump

    root = Path(root).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(str(out), str(root / "conf"), None, "config", str(root), list(overrides))
        return yaml.safe_load(out.read_text())


def checked_params(overrides, root="."):
    """The composed parameters, or PlanError naming every problem with the overrides."""
    found = check_keys(overrides, root)
    if not found:
        try:
            params = compose(overrides, root)
        except Exception as e:  # Hydra's own words for a value it cannot parse
            raise PlanError(f"the overrides do not compose: {e}") from None
        found = problems(params)
    if found:
        raise PlanError(f"{len(found)} problem(s) with the overrides, nothing was run:\n  " + "\n  ".join(found))
    return params


# ------------------------------------------------------------------------------------------------------ preview


def in_cache(root, md5):
    """Is an output with this md5 in the local DVC cache (DVC 3 layout: files/md5/ab/cdef...)?"""
    return bool(md5) and (Path(root) / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).exists()


def _interpolate(text, flat):
    return re.sub(r"\$\{([\w.]+)\}", lambda m: str(flat.get(m.group(1), m.group(0))), text)


def _paths(entries):
    """Paths of a dvc.yaml deps/outs/metrics list (plain strings or {path: options})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def same_value(recorded, now):
    """dvc.lock writes YAML 1.2 (`5e-05` is a number there, a string to a YAML 1.1 reader such as PyYAML)."""
    if recorded == now or str(recorded) == str(now):
        return True
    try:
        return not isinstance(now, str) and float(recorded) == float(now)
    except (TypeError, ValueError):
        return False


def dvc_status(params, root="."):
    """`dvc status --json` as it would be with these parameters: params.yaml is written with them for the call and
    put back byte for byte afterwards. DVC itself compares the code, data, outputs, commands and parameters with
    dvc.lock (directories, interpolated paths, frozen and always-changed stages included)."""
    import subprocess

    path = Path(root) / "params.yaml"
    saved = path.read_bytes() if path.exists() else None
    try:
        path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
        r = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True,
                           text=True)
    finally:
        if saved is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(saved)
    if r.returncode != 0:
        raise PlanError(f"dvc status failed: {r.stderr.strip()[-1000:]}")
    return json.loads(r.stdout or "{}")


def stages_to_run(params, root="."):
    """[(stage, [reasons])] for the stages `dvc exp run` with these parameters would run, in pipeline order.

    From DVC's own status with these parameters (dvc_status), in words, plus what DVC's status leaves out: a stage
    runs after a stage it reads from runs; an output that is only missing from the workspace is restored from the
    DVC cache, not recomputed."""
    root = Path(root)
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    lock_path = root / "dvc.lock"
    lock = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}) if lock_path.exists() else {}
    status = dvc_status(params, root)
    flat = flatten(params)
    produced, runs = {}, []
    for name, stage in spec.items():
        for entry in (stage.get("outs") or []) + (stage.get("metrics") or []) + (stage.get("plots") or []):
            produced[entry if isinstance(entry, str) else next(iter(entry))] = name
        locked = lock.get(name, {})
        recorded = locked.get("params", {}).get("params.yaml", {})
        locked_outs = {o["path"]: o.get("md5") for o in locked.get("outs", [])}
        reasons = [] if name in lock else ["no dvc.lock entry (never run in this repository)"]
        for item in status.get(name, []):
            if isinstance(item, str):  # "changed command", "always changed", ...
                reasons.append(item)
                continue
            for path, state in item.get("changed deps", {}).items():
                if isinstance(state, dict):  # params.yaml: {key: "modified" | "new" | "deleted"}
                    reasons += [f"{k}: {recorded.get(k)!r} -> {flat.get(k)!r}" for k in state
                                if not same_value(recorded.get(k), flat.get(k))]
                elif produced.get(path) not in dict(runs):
                    reasons.append(f"{path} {state}")
            for path, state in item.get("changed outs", {}).items():
                if state == "deleted" and in_cache(root, locked_outs.get(path)):
                    continue  # restored from the cache by DVC, not recomputed
                reasons.append(f"{path} is neither in the workspace nor in the DVC cache" if state in
                               ("deleted", "not in cache") else f"output {path} {state}")
        for dep in _paths(stage.get("deps")):
            upstream = produced.get(_interpolate(dep, flat))
            if upstream in dict(runs) and not any(r.startswith(f"after {upstream} ") for r in reasons):
                reasons.append(f"after {upstream} (reads its {_interpolate(dep, flat)})")
        if reasons:
            runs.append((name, sorted(reasons, key=lambda r: " -> " not in r)))  # parameter changes first
    return runs


def render_preview(overrides, runs, total):
    command = " ".join(["dvc exp run"] + [f"-S {o}" for o in overrides])
    if not runs:
        return f"{command}: nothing would run; every stage is up to date with dvc.lock and the cache."
    lines = [f"{command} would run {len(runs)} of {total} stages:"]
    for name, reasons in runs:
        lines.append(f"  {name}: " + "; ".join(reasons[:4]) + (f"; +{len(reasons) - 4} more" if len(reasons) > 4 else ""))
    # the first stage a parameter changes (else the first that runs): a cheap look before the expensive ones
    first = next((n for n, rs in runs if any(":" in r and "->" in r for r in rs)), runs[0][0])
    lines.append(f"Only the stages up to one of them (and what it needs): {command} {first}")
    return "\n".join(lines)


def main(argv=None, command="preview"):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    overrides, rest = split_args(argv)
    try:
        params = checked_params(overrides)
    except PlanError as e:
        sys.exit(f"ernie-dpo {command}: {e}")
    if command == "preview":
        if rest:
            sys.exit(f"ernie-dpo preview: only -S overrides are read, not {' '.join(rest)}")
        runs = stages_to_run(params)
        total = len(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])
        print(render_preview(overrides, runs, total))
        return
    cmd = ["dvc", "exp", "run"] + [x for o in overrides for x in ("-S", o)] + rest
    print("overrides checked; running: " + " ".join(cmd), flush=True)
    os.execvp(cmd[0], cmd)


def run_main(argv=None):
    main(argv, "run")


def preview_main(argv=None):
    main(argv, "preview")
