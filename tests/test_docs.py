"""Every command the README and docs/ tell a user to type is parsed here the way its tool parses it: `dvc …` by DVC's
own argument parser, each `-S` override by Hydra's override parser, then composed against conf/ and checked against
the parameter schema (so a key that does not exist, a wrong value, a sweep, or a profile that does not compose fails
here, not in a user's shell), `python <script>` by the script's existence, `make <target>` by make's dry run,
`ernie-dpo <command>` by the command's own parser. `make demo` / `make test` themselves run in .ci/run and
test_pipeline.py."""
import re
import shlex

import pytest
import yaml
from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands():
    """(file, command) for each command line in an indented or fenced code block; `\\` continuations joined."""
    out = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        k = 0
        while k < len(lines):
            line = lines[k].strip()
            while line.endswith("\\") and k + 1 < len(lines):
                k += 1
                line = line[:-1] + " " + lines[k].strip()
            for part in re.split(r"\s&&\s", line.split("  #")[0]):
                part = part.strip()
                if part.startswith(("dvc ", "python ", "make ", "ernie-dpo ")) and lines[k].startswith(("    ", "\t")):
                    out.append((doc.name, part))
            k += 1
    return out


def overrides_of(argv):
    return [argv[i + 1] for i, a in enumerate(argv) if a in ("-S", "--set-param")]


def compose(overrides, tmp_path):
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(ROOT), overrides)
    return yaml.safe_load(out.read_text())


CMDS = commands()


def test_the_docs_have_commands_to_check():
    text = " ".join(c for _, c in CMDS)
    assert len(CMDS) > 15 and "dvc exp run -S profile=smol" in text and "dvc repro" in text


@pytest.mark.parametrize("doc,cmd", CMDS, ids=[f"{d}:{c[:60]}" for d, c in CMDS])
def test_documented_command_parses_and_composes(doc, cmd, tmp_path):
    argv = shlex.split(cmd)
    if argv[0] == "make":
        import subprocess

        r = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"{doc}: {cmd}: {r.stderr}"
        return
    if argv[0] == "ernie-dpo":
        import subprocess
        import sys
        from pathlib import Path

        exe = Path(sys.executable).parent / "ernie-dpo"
        r = subprocess.run([str(exe), *argv[1:], "--help"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), f"{doc}: {cmd}: {r.stdout[-500:]}{r.stderr[-500:]}"
        return
    if argv[0] == "python":
        if argv[1] == "-m":  # a module of this project (or an installed one)
            import importlib.util

            assert importlib.util.find_spec(argv[2]) is not None, f"{doc}: {cmd}: no module {argv[2]}"
        else:
            assert (ROOT / argv[1]).is_file(), f"{doc}: {cmd}: no such script {argv[1]}"
        return
    from dvc.cli import parse_args

    parse_args(argv[1:])  # DVC's own parser: unknown subcommands or flags raise here
    sets = overrides_of(argv)
    if sets:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        for o in OverridesParser.create().parse_overrides(sets):
            assert not o.is_sweep_override(), f"{doc}: {cmd}: {o.input_line} is a sweep (quote lists: 'k=\"0,1\"')"
        from ernie_dpo.params import problems

        composed = compose(sets, tmp_path)  # every key exists, every profile composes
        assert not problems(composed), f"{doc}: {cmd}: {problems(composed)}"  # and every value is allowed


def test_a_removed_or_misspelt_parameter_fails_to_compose(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose(["train.lora_alpha=16"], tmp_path)  # PaddleFormers ignores lora_alpha: it is no parameter here
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parse = OverridesParser.create().parse_overrides
    assert parse(["infer.stop_tokens=[a,b]"])[0].value() == ["a", "b"]  # a list value, not a sweep
    assert parse(["train.beta=0.1,0.5"])[0].is_sweep_override()  # a comma is a sweep: DVC queues one run per value
    with pytest.raises(ConfigCompositionException):
        compose(['engine.devices="0,1"'], tmp_path)  # GPU ids are no parameter (CUDA_VISIBLE_DEVICES, docs/scaling.md)


def test_profiles_compose_with_the_recipes_values(tmp_path):
    p = compose(["profile=cookbook"], tmp_path)
    assert p["trainset"]["baseline_tolerance"] == 0.4 and p["trainset"]["keep_system"] is False
    assert p["testset"]["size"] == 200 and p["testset"]["seed"] == 2025 and p["testset"]["keep_system"] is False
    assert (p["infer"]["top_p"], p["infer"]["temperature"], p["infer"]["max_dec_len"]) == (0.7, 0.7, 8192)
    assert p["model"]["revision"] != "" and p["train"]["max_steps"] == 614 and p["train"]["warmup_steps"] == 50
    smol = compose(["profile=smol"], tmp_path)
    assert smol["model"]["name_or_path"] == "smollm2-135m" and smol["engine"]["device"] == "cpu"


NUMBER = re.compile(r"([-+−]?\d[\d,]*(?:\.\d+)?)(%?)\s*<!--\s*(\S+?)\s+([\w.\[\]-]+)\s*-->")


def quoted_numbers():
    """(doc, shown text, file, key) for every number the docs quote from a results file: `77.5<!-- f.json k -->`."""
    return [(d.name, m.group(0), m.group(1) + m.group(2), m.group(3), m.group(4))
            for d in DOCS for m in NUMBER.finditer(d.read_text())]


def lookup(path, key):
    import json

    value, parts, i = json.loads((ROOT / path).read_text()), key.split("."), 0
    while i < len(parts):  # list index, or the longest key at this level (flat keys hold dots: "tuned.chars_mean")
        if isinstance(value, list):
            value, i = value[int(parts[i])], i + 1
            continue
        j = next(j for j in range(len(parts), i, -1) if ".".join(parts[i:j]) in value)
        value, i = value[".".join(parts[i:j])], j
    return value


def test_the_docs_quote_numbers_from_results_files():
    found = quoted_numbers()
    assert len(found) >= 20 and {f for _, _, _, f, _ in found} >= {"metrics/baseline.json", "metrics/tuned.json"}


@pytest.mark.parametrize("doc,text,shown,path,key", quoted_numbers(), ids=[f"{d}:{k}" for d, _, _, _, k in quoted_numbers()])
def test_every_quoted_number_is_the_one_in_its_file(doc, text, shown, path, key):
    """A number in README.md or docs/ that names its source must show that source's value, rounded as shown: results
    change in one place (the metrics file a run writes), and a stale or hand-edited number fails here."""
    value = float(lookup(path, key))
    number = shown.replace("−", "-").replace(",", "")
    if number.endswith("%"):
        number, value = number[:-1], value * 100
    decimals = len(number.split(".")[1]) if "." in number else 0
    assert round(value, decimals) == pytest.approx(float(number)), f"{doc} shows {text!r}: {path} {key} is {value}"


def test_the_gpu_lock_is_the_cpu_lock_with_paddlepaddle_gpu():
    """requirements-gpu.txt differs from requirements.txt only in the PaddlePaddle build (docs/gpu.md)."""
    def pins(name):
        return {line.strip() for line in (ROOT / name).read_text().splitlines() if line.strip() and "#" not in line}

    cpu, gpu = pins("requirements.txt"), pins("requirements-gpu.txt")
    assert cpu - gpu == {"paddlepaddle==3.3.1"} and gpu - cpu == {"paddlepaddle-gpu==3.3.1"}
    assert all("==" in p for p in cpu)  # a complete lock: every package pinned


def test_the_makefile_installs_each_lock_with_no_deps_and_the_project():
    import subprocess

    for target, lock in (("install", "requirements.txt"), ("install-gpu", "requirements-gpu.txt")):
        r = subprocess.run(["make", "-n", "-B", target, "VENV=/tmp/ernie-dpo-make-n"], cwd=ROOT, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        assert f"--no-deps -r {lock}" in r.stdout and "--no-deps --no-build-isolation -e ." in r.stdout, r.stdout
    assert "www.paddlepaddle.org.cn/packages/stable/cu126/" in r.stdout  # GPU builds from PaddlePaddle's own index
    assert "-c requirements-nvidia/cu126.txt" in r.stdout  # its NVIDIA runtime wheels pinned
    for cuda in ("cu118", "cu126", "cu129"):  # each build's pins: every runtime library Paddle loads, exact versions
        pins = [x for x in (ROOT / f"requirements-nvidia/{cuda}.txt").read_text().splitlines() if x and x[0] != "#"]
        names = {p.split("==")[0].rsplit("-", 1)[0] for p in pins}
        assert all(re.fullmatch(r"nvidia-[a-z-]+-cu1[12]==[0-9.]+", p) for p in pins), pins
        assert {"nvidia-cuda-runtime", "nvidia-cudnn", "nvidia-cublas", "nvidia-nccl"} <= names, names


def test_no_file_edits_sys_path_and_dvc_runs_every_stage_as_a_module_of_its_checkout():
    """The project is an installed package (pyproject.toml, `make install`): benchmarks, experiments and tests import
    `ernie_dpo` as installed. Stages are run as `python -m stages.<name>` from the repository root, so they import the
    ernie_dpo of the checkout they run in (DVC runs queued experiments in copies of the repository, and the editable
    install points at the workspace: tests/test_dvc_deps.py) without any file editing sys.path."""
    from conftest import repo_files

    offenders = [f for f in repo_files() if f.endswith(".py") and f != "tests/test_docs.py"
                 and any(re.search(r"sys\.path\s*(\.|\[|=)", line) for line in (ROOT / f).read_text().splitlines())]
    assert offenders == []
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert all(re.match(r"python -m stages\.\w+( |$)", " ".join(s["cmd"].split())) for s in stages.values())


def test_every_ernie_dpo_command_answers_help_without_running():
    import subprocess
    import sys
    from pathlib import Path

    from ernie_dpo.cli import COMMANDS

    exe = Path(sys.executable).parent / "ernie-dpo"
    top = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and all(name in top.stdout for name in COMMANDS)
    for name in COMMANDS:
        r = subprocess.run([str(exe), name, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (name, r.stdout[-500:], r.stderr[-500:])
