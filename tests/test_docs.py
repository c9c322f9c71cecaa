"""Every command the README and docs/ tell a user to type is parsed here the way its tool parses it: `dvc …` by DVC's
own argument parser, each `-S` override by Hydra's override parser and then composed against conf/ (so a key that
does not exist, a sweep, or a profile that does not compose fails here, not in a user's shell), `python <script>` by
the script's existence. `dvc repro` and the test command themselves run in test_pipeline.py and .ci/run."""
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
                if part.startswith(("dvc ", "python ")) and lines[k].startswith(("    ", "\t")):
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
        compose(sets, tmp_path)  # every key exists, every profile composes


def test_a_removed_or_misspelt_parameter_fails_to_compose(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose(["train.lora_alpha=16"], tmp_path)  # PaddleFormers ignores lora_alpha: it is no parameter here
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parse = OverridesParser.create().parse_overrides
    assert parse(["engine.devices=0,1,2,3"])[0].is_sweep_override()  # what the README once told users to type
    quoted = parse(['engine.devices="0,1,2,3"'])[0]
    assert not quoted.is_sweep_override() and compose(['engine.devices="0,1,2,3"'], tmp_path)["engine"]["devices"] == "0,1,2,3"


def test_profiles_compose_with_the_recipes_values(tmp_path):
    p = compose(["profile=cookbook"], tmp_path)
    assert p["trainset"]["baseline_tolerance"] == 0.4 and p["trainset"]["keep_system"] is False
    assert p["testset"]["size"] == 200 and p["testset"]["seed"] == 2025 and p["testset"]["keep_system"] is False
    assert (p["infer"]["top_p"], p["infer"]["temperature"], p["infer"]["max_dec_len"]) == (0.7, 0.7, 8192)
    assert p["model"]["revision"] != "" and p["train"]["max_steps"] == 614 and p["train"]["warmup_steps"] == 50
    smol = compose(["profile=smol"], tmp_path)
    assert smol["model"]["name_or_path"] == "smollm2-135m" and smol["engine"]["device"] == "cpu"
