"""`ernie-dpo`: what users do besides `dvc` (the pipeline itself is `dvc repro` / `dvc exp run`).

    ernie-dpo run -S key=value ...          `dvc exp run` after checking every -S key and value (did-you-mean)
    ernie-dpo preview -S key=value ...      which stages that experiment would run, and why; runs nothing
    ernie-dpo series [--jobs N] [--dry]     the recipe's exp1-exp4 as named DVC experiments, then the report
    ernie-dpo report [--names ...]          metrics/report.md + bar chart from `dvc exp show`
    ernie-dpo serve --model DIR             OpenAI-compatible dev server for a model directory (CPU)
    ernie-dpo fetch                         the cookbook's real data (download once, pin, verify, dvc add)
    ernie-dpo engine train|export CFG       run PaddleFormers on an engine config (what the stages launch)

`ernie-dpo <command> --help` describes a command and runs nothing.
"""
import importlib
import sys

COMMANDS = {  # name: (module[:function, default main], help)
    "run": ("ernie_dpo.plan:run_main", "check the -S overrides, then `dvc exp run` with the same arguments"),
    "preview": ("ernie_dpo.plan:preview_main", "which stages a `dvc exp run -S ...` would run, and why"),
    "series": ("ernie_dpo.series", "run the recipe's exp1-exp4 as DVC experiments, then the report"),
    "report": ("ernie_dpo.report", "write metrics/report.md and the bar chart from `dvc exp show`"),
    "serve": ("ernie_dpo.dev_server", "serve a model directory with the OpenAI chat API (CPU dev server)"),
    "fetch": ("ernie_dpo.fetch", "download the cookbook's real data once, pin and verify it, `dvc add` it"),
    "engine": ("ernie_dpo.engine_main", "run PaddleFormers on an engine config (train|export CFG): what stages launch"),
}


def main(argv=None):
    from . import runtime

    runtime.setup()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"ernie-dpo: unknown command {argv[0]!r}; one of {', '.join(COMMANDS)}")
        return
    module, _, function = COMMANDS[argv[0]][0].partition(":")
    sys.argv = [f"ernie-dpo {argv[0]}"] + argv[1:]
    getattr(importlib.import_module(module), function or "main")(argv[1:])  # each command parses its own arguments


if __name__ == "__main__":
    main()
