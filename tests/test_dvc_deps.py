"""dvc.yaml lists every project file a stage's code imports (derived from the imports, not written by hand), and
every parameter a stage reads: a change there must rerun what it affects."""
import ast
import re
from pathlib import Path

import yaml
from conftest import ROOT


def project_imports(path, seen=None):
    """The project's .py files that `path` imports, directly or through other project modules (lazy imports too)."""
    seen = set() if seen is None else seen
    tree = ast.parse(Path(path).read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                base = Path(path).parent
                mod = node.module.split(".") if node.module else []
                names = [".".join(base.relative_to(ROOT).parts + tuple(mod))]
                if not node.module:
                    names = [".".join(base.relative_to(ROOT).parts + (a.name,)) for a in node.names]
            else:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            f = ROOT / (name.replace(".", "/") + ".py")
            if f.is_file() and f.parent != ROOT:  # a package module: its package's __init__.py runs first
                seen.add(str((f.parent / "__init__.py").relative_to(ROOT)))
            if f.is_file() and f.name != "__init__.py":
                rel = str(f.relative_to(ROOT))
                if rel not in seen:
                    seen.add(rel)
                    project_imports(f, seen)
    return seen


def stage_script(cmd):
    m = re.search(r"python -m stages\.(\w+)", cmd)
    return f"stages/{m.group(1)}.py" if m else None


def test_every_imported_project_module_is_a_dependency():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, st in stages.items():
        script = stage_script(st["cmd"])
        # -m stages.x runs the package (and what it imports) first
        need = {script, "stages/__init__.py"} | project_imports(ROOT / script) | project_imports(ROOT / "stages/__init__.py")
        lacking = sorted(need - set(st.get("deps", [])))
        if lacking:
            missing[name] = lacking
    assert missing == {}, f"dvc.yaml deps lack what the stage imports: {missing}"


def test_the_derivation_finds_lazy_and_relative_imports():
    found = project_imports(ROOT / "stages/infer.py")
    assert {"ernie_dpo/generate.py", "ernie_dpo/decode.py", "ernie_dpo/engine.py", "ernie_dpo/common.py",
            "ernie_dpo/__init__.py"} <= found


def test_a_copy_of_the_repository_runs_its_own_ernie_dpo(tmp_path, monkeypatch):
    """DVC runs queued experiments in copies of the repository (.dvc/tmp/exps/...): their stages and the engine they
    launch must import the copy's ernie_dpo (whose hashes DVC records), not the workspace's the editable install
    points at."""
    import shutil
    import subprocess
    import sys

    from ernie_dpo import launch

    shutil.copytree(ROOT / "ernie_dpo", tmp_path / "ernie_dpo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    init = tmp_path / "ernie_dpo" / "__init__.py"
    init.write_text(init.read_text() + "\nprint('ernie_dpo from', __file__)\n")
    r = subprocess.run([sys.executable, "-m", "stages.evaluate", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and f"ernie_dpo from {tmp_path / 'ernie_dpo'}" in r.stdout, r.stdout + r.stderr
    monkeypatch.chdir(tmp_path)
    env = launch.launch_env()
    r = subprocess.run([sys.executable, "-c", "import ernie_dpo"], cwd="/", env=env, capture_output=True, text=True)
    assert f"ernie_dpo from {tmp_path / 'ernie_dpo'}" in r.stdout, r.stdout + r.stderr


def write_deps(path=ROOT / "dvc.yaml"):
    """Rewrite each stage's code dependencies in dvc.yaml from its imports (data and model deps kept as they are):
    `python tests/test_dvc_deps.py --write` after adding or moving a module."""
    import textwrap

    text = Path(path).read_text()
    for name, st in yaml.safe_load(text)["stages"].items():
        script = stage_script(st["cmd"])
        code = {script, "stages/__init__.py"} | project_imports(ROOT / script) | project_imports(ROOT / "stages/__init__.py")
        code = [script, "stages/__init__.py"] + sorted(code - {script, "stages/__init__.py"})
        data = [f'"{d}"' if "$" in d else d for d in st["deps"] if not d.endswith(".py")]
        m = re.search(r"(\n  " + re.escape(name) + r":.*?\n    deps: )\[(.*?)\]\n", text, re.S)
        block = ("\n" + " " * 11).join(textwrap.wrap("[" + ", ".join(code + data) + "]", width=107,
                                                     break_on_hyphens=False, break_long_words=False))
        text = text[:m.start()] + m.group(1) + block + "\n" + text[m.end():]
    Path(path).write_text(text)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        write_deps()
    else:
        print("python tests/test_dvc_deps.py --write   rewrites dvc.yaml's code deps from the stages' imports")
