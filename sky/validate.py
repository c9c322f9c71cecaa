"""Check a SkyPilot task file with SkyPilot's own loader, offline: no cloud account, no API server, no network.

    .venv-sky/bin/python sky/validate.py sky/experiment.yaml [KEY=VALUE ...]
    .venv-sky/bin/python sky/validate.py --launch "sky jobs launch sky/experiment.yaml -n ... --env KEY=VALUE ..."

Runs in .venv-sky (`make sky-venv`: skypilot 0.14.1), never in .venv. It loads the file the way `sky launch` and
`sky jobs launch` do (sky.utils.dag_utils.load_chain_dag_from_yaml: duplicate keys, the task schema, then the
resources and bucket-mount schemas and their constructors), then task.validate_name() and task.validate_run().
Not task.validate(): it downloads SkyPilot's GPU catalog from GitHub, so an unknown GPU name is only caught at launch.
Required envs (null in the file) that are not given as KEY=VALUE get a placeholder, as `--env` would give them.
With --launch, the command line (as `ernie-dpo series --launcher sky --dry` prints it) is first parsed by SkyPilot's
own CLI (`sky jobs launch`'s click command: parsed, never run); its task file, --env values and -n name are then
checked as above, with no placeholders: a required env the command does not set fails, as it would at launch. Its
other options (--gpus, --num-nodes, --secret, ...) are parsed and checked by click but not applied to the task.

Then this project's own rules for sky/experiment.yaml: the workdir is a git repository (a managed job copies a local
workdir without .git, and `dvc exp run` / `dvc exp push` need it), and $CKPT_MOUNT is one of the bucket mounts.

Prints one JSON line describing the loaded task and exits 0, or prints `INVALID: <reason>` and exits 1.
"""
import json
import sys

import click
import yaml


def placeholders(path):
    """A value for every required (null) env, so the file loads as it will with `--env KEY=...`."""
    with open(path, encoding="utf-8") as f:
        envs = (yaml.safe_load(f) or {}).get("envs") or {}
    fixed = {"CKPT_STORE": "s3"}  # a value the storage schema accepts
    return {k: fixed.get(k, f"placeholder-{k.lower().replace('_', '-')}") for k, v in envs.items() if v is None}


def load(path, env_overrides):
    from sky.utils import dag_utils

    dag = dag_utils.load_chain_dag_from_yaml(path, env_overrides=list(env_overrides.items()))
    if len(dag.tasks) != 1:
        raise ValueError(f"expected one task, found {len(dag.tasks)}")
    task = dag.tasks[0]
    task.validate_name()
    task.validate_run()
    return task


def project_rules(task):
    if not isinstance(task.workdir, dict) or "url" not in task.workdir:
        raise ValueError(f"workdir must be a git repository ({{url: ..., ref: ...}}), got {task.workdir!r}: a managed "
                         "job copies a local workdir without its .git, and `dvc exp run` / `dvc exp push` need it")
    mount = task.envs.get("CKPT_MOUNT")
    if mount not in task.storage_mounts:
        raise ValueError(f"envs.CKPT_MOUNT {mount!r} is not a bucket mount (file_mounts has "
                         f"{sorted(task.storage_mounts)})")


def parse_launch(command):
    """(task file, envs, job name) of a `sky jobs launch` command line, parsed by SkyPilot's own CLI."""
    import shlex

    from sky.client.cli import command as cli

    argv = shlex.split(command)
    if argv[1:3] != ["jobs", "launch"]:
        raise ValueError(f"not a `sky jobs launch` command: {command}")
    params = cli.jobs_launch.make_context("launch", argv[3:]).params  # click parses and checks; nothing runs
    if len(params["entrypoint"]) != 1:
        raise ValueError(f"expected one task file, got {params['entrypoint']}")
    return params["entrypoint"][0], dict(params["env"]), params["name"]


def describe(task):
    import sky

    res = next(iter(task.resources))
    return {
        "sky": sky.__version__, "name": task.name, "num_nodes": task.num_nodes,
        "accelerators": res.accelerators, "use_spot": res.use_spot, "disk_size": res.disk_size,
        "workdir": task.workdir, "envs": dict(task.envs),
        "storage_mounts": {dst: {"name": s.name, "mode": s.mode.value,
                                 "store": [str(getattr(t, "value", t)) for t in (s.stores or {})]}
                           for dst, s in task.storage_mounts.items()},
        "secrets": sorted(set(task.secrets) | {r.name for r in task.managed_secret_refs}),  # null ones: --secret
        "job_recovery": res.job_recovery,
        "setup": task.setup, "run": task.run,
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        if argv[0] == "--launch":
            path, envs, name = parse_launch(argv[1])
        else:
            path, name = argv[0], None
            envs = {**placeholders(path), **dict(a.split("=", 1) for a in argv[1:])}
        task = load(path, envs)
        if name is not None:
            task.name = name
            task.validate_name()
        project_rules(task)
    except (ValueError, yaml.YAMLError, click.UsageError) as e:  # InvalidSkyPilotConfigError is a ValueError
        print(f"INVALID: {type(e).__name__}: {e}")
        return 1
    print(json.dumps(describe(task), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
