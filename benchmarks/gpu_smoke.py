"""The first command to run on a GPU machine: the whole GPU path on the tiny model, in minutes, with a one-screen verdict.

    python benchmarks/gpu_smoke.py                 # engine.device=gpu (bf16 from compute capability 8.0 on)
    python benchmarks/gpu_smoke.py --device cpu    # the same path on a CPU (what CI runs, so this script cannot rot)
    python benchmarks/gpu_smoke.py --server vllm   # also serve the tuned model through a managed vLLM / FastDeploy

What it runs, in a temporary copy of this repository (the real stage scripts, nothing mocked): prepare -> testset ->
base_model (the tiny ERNIE-4.5-architecture model, built and warmed up on the device) -> infer_baseline (16
prompts) -> trainset -> for LoRA and for full fine-tuning: train (5 DPO steps) -> merge -> infer_tuned -> evaluate;
then, with --server, infer_tuned again through the managed server preset. Every step's seconds, and a verdict:
finite losses, replies written, merged == trained (LoRA), the precision the engine used. Exit code 0 only if all
passed. Expected on one Ampere-or-later GPU: a few minutes (unverified on a GPU: none was available to this project).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def copy_repo(dest):
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)


def compose(repo, overrides):
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(repo / "params.yaml", str(repo / "conf"), None, "config", str(repo), overrides)


MERGE_CHECK = """
import json, sys, tempfile
import paddle
from paddleformers.peft import LoRAModel
from paddleformers.transformers import AutoModelForCausalLM
from ernie_dpo import devices, weights
paddle.set_device(devices.inference_device(sys.argv[1]))
x = paddle.to_tensor([[5, 20, 30, 40, 50, 60, 70]])
def logits(model):
    model.eval()
    with paddle.no_grad():
        o = model(input_ids=x)
    return (o[0] if isinstance(o, tuple) else o.logits).astype("float32").numpy()
with tempfile.TemporaryDirectory() as tmp:
    adapter = logits(LoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained("models/base", dtype="float32"),
                                               str(weights.float32_copy("models/train", tmp))))
config = json.load(open("models/merged/config.json"))
dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
merged = logits(AutoModelForCausalLM.from_pretrained("models/merged", dtype="float32"))
print(json.dumps([float(abs(merged - adapter).max()), float(abs(adapter).max()), dtype]))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--server", choices=["vllm", "fastdeploy", "dev"], help="also run inference through this preset")
    ap.add_argument("--keep", action="store_true", help="keep the temporary repository (its path is printed)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ernie-dpo-smoke-"))
    repo = tmp / "repo"
    copy_repo(repo)
    base = ["profile=demo", f"engine.device={args.device}", "testset.size=16", "infer.max_dec_len=32",
            "infer.batch_size=8", "model.tiny.warmup_steps=30", "train.max_steps=5", "train.warmup_steps=1",
            "train.global_batch_size=4", "train.eval_steps=5", "train.length_probe_steps=5",
            "train.length_probe_prompts=4", "train.length_probe_max_dec_len=16", "probes.samples=1",
            "trainset.size=40"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    rows, ok = [], True

    def step(label, script, *extra, check=None):
        nonlocal ok
        start = time.time()
        r = subprocess.run([sys.executable, "-m", f"stages.{script}", *extra], cwd=repo, env=env, capture_output=True,
                           text=True)
        secs = time.time() - start
        passed = r.returncode == 0
        note = ""
        if passed and check is not None:
            passed, note = check()
        elif not passed:
            note = (r.stderr.strip().splitlines() or ["(no output)"])[-1][:110]
        ok &= passed
        rows.append((label, "ok" if passed else "FAILED", f"{secs:6.1f} s", note))
        print(f"{label:34s} {'ok' if passed else 'FAILED':6s} {secs:6.1f} s  {note}", flush=True)
        return passed

    def metrics(name):
        return json.loads((repo / f"metrics/{name}.json").read_text())

    def replies(path):
        rows_ = [json.loads(x) for x in (repo / path).read_text().splitlines()]
        return len(rows_) == 16, f"{len(rows_)} replies, {sum(bool(r['reply']) for r in rows_)} non-empty"

    def trained():
        m = metrics("train")["dpo"]
        cfg = yaml.safe_load((repo / "logs/train/dpo.yaml").read_text())
        finite = all(abs(v) < 1e6 for v in m["last_step"].values())
        return finite and m["steps_done"] == 5, (f"{m['steps_done']} steps, loss {m['last_step']['loss']:.3f}, "
                                                 f"{cfg['compute_type']} {cfg.get('fp16_opt_level', '')} "
                                                 f"{cfg['_attn_implementation']}")

    def merged_equals_adapter():
        """The merged model's logits against base + the trained adapter on the same prompt (in a child process, on
        the device the stages use): equal up to the merged weights' dtype (bf16 on a GPU: one bf16 step)."""
        r = subprocess.run([sys.executable, "-c", MERGE_CHECK, args.device], cwd=repo, env=env, capture_output=True,
                           text=True)
        if r.returncode != 0:
            return False, (r.stderr.strip().splitlines() or ["(no output)"])[-1][:110]
        diff, scale, dtype = json.loads(r.stdout.strip().splitlines()[-1])
        tolerance = (1e-4 if dtype == "float32" else 0.05) * max(1.0, scale)
        return diff <= tolerance, f"merged ({dtype}) vs base + adapter: max |logit diff| {diff:.2e} (<= {tolerance:.0e})"

    def probed():
        """The step-0 length probe (the project's decode loop on the engine's model, before step 1) ran on the device:
        a failing probe only warns and training goes on, so the smoke test is where it is seen."""
        m = metrics("train")["dpo"]
        lp, failures = m.get("length_probe") or {}, m.get("length_probe_failures", 0)
        return "step0_chars_median" in lp and not failures, (
            f"length probes: {lp.get('probes', 0)} ran, {failures} failed; step 0 median "
            f"{lp.get('step0_chars_median')} chars, last {lp.get('final_chars_median')}")

    print(f"smoke test of the {args.device.upper()} path in {repo}", flush=True)
    compose(repo, base)
    for label, script, extra in (("prepare", "prepare", ()), ("testset", "testset", ()),
                                 ("base_model (tiny, on the device)", "base_model", ())):
        if not step(label, script, *extra):
            break
    else:
        info = metrics("base_model")["base_model"]
        print(f"{'':34s} sanity: greedy reply {info['sanity']['greedy_reply']!r}")
        step("infer_baseline (16 prompts)", "infer", "--model", "models/base", "--out", "data/infer/baseline.jsonl",
             check=lambda: replies("data/infer/baseline.jsonl"))
        step("evaluate_baseline", "evaluate", "--name", "baseline", "--replies", "data/infer/baseline.jsonl",
             "--out", "metrics/baseline.json")
        step("trainset", "trainset")
        for mode in ("lora", "full"):
            compose(repo, base + [f"train.fine_tuning={mode}"])
            if not step(f"train ({mode}, 5 DPO steps)", "train", check=trained):
                continue
            passed, note = probed()
            ok &= passed
            rows.append((f"length probes ({mode})", "ok" if passed else "FAILED", "", note))
            print(f"{'  length probes (' + mode + ')':34s} {'ok' if passed else 'FAILED':6s} {'':8s} {note}")
            step(f"merge ({mode})", "merge", check=merged_equals_adapter if mode == "lora" else None)
            step(f"infer_tuned ({mode}, local)", "infer", "--model", "models/merged", "--out",
                 f"data/infer/tuned_{mode}.jsonl", check=lambda m=mode: replies(f"data/infer/tuned_{m}.jsonl"))
        if args.server:
            compose(repo, base + ["train.fine_tuning=full", "infer.backend=managed", f"server={args.server}"])
            step(f"infer_tuned (managed {args.server})", "infer", "--model", "models/merged", "--out",
                 "data/infer/tuned_served.jsonl", check=lambda: replies("data/infer/tuned_served.jsonl"))
    print("\nVERDICT: " + ("every step passed" if ok else "FAILED: " + ", ".join(r[0] for r in rows if r[1] != "ok")))
    if not args.keep and ok:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
