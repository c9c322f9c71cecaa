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
    m = re.search(r"python (\S+\.py)", cmd)
    return m.group(1) if m else None


def test_every_imported_project_module_is_a_dependency():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, st in stages.items():
        script = stage_script(st["cmd"])
        need = {script} | project_imports(ROOT / script)
        lacking = sorted(need - set(st.get("deps", [])))
        if lacking:
            missing[name] = lacking
    assert missing == {}, f"dvc.yaml deps lack what the stage imports: {missing}"


def test_the_derivation_finds_lazy_and_relative_imports():
    found = project_imports(ROOT / "stages/infer.py")
    assert {"ernie_dpo/generate.py", "ernie_dpo/decode.py", "ernie_dpo/engine.py", "ernie_dpo/common.py",
            "ernie_dpo/__init__.py"} <= found
