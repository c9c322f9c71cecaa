"""The GPU path, proven on a CPU with stand-ins (no GPU with PaddlePaddle is reachable from this project).

Each test names the defect it guards (issue 16) and fails on the code before the fix."""
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import yaml
from conftest import ROOT

from ernie_dpo import devices, engine, launch, weights
from ernie_dpo.common import write_jsonl

TRAIN = dict(max_steps=1, warmup_steps=0, global_batch_size=4, learning_rate=1e-4, fine_tuning="full",
             loss_type="sigmoid", beta=0.1, lora_rank=4, seed=42, max_seq_len=256, max_prompt_len=128)


def dpo_steps(model, pairs, out, extra=None, env=None, **p):
    cfg = engine.dpo_config(model, pairs, out, "cpu", {**TRAIN, **p})
    cfg.update(extra or {})
    steps = []
    launch.run(launch.launch_command("train", engine.write_config(cfg, out.parent / f"{out.name}.yaml"), "cpu"),
               out.parent / f"{out.name}.log", steps.append, env=env)
    return steps


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_base, sample_records):
    from paddleformers.transformers import AutoTokenizer

    from ernie_dpo import tokens

    kept, _, _ = tokens.fit_pairs(AutoTokenizer.from_pretrained(str(tiny_base)), sample_records[:8], 256, 128)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_jsonl(path, kept)
    return path


def test_full_fine_tuning_on_one_gpu_under_the_launcher(tiny_base, pairs, tmp_path):
    """(6) paddle.distributed.launch sets PADDLE_TRAINER_ENDPOINTS even for ONE GPU; the unwrapped-model fallback
    used to apply only when it was unset, so full DPO on one GPU failed like on a bare CPU. Here the launcher's
    one-GPU environment is set around a CPU run."""
    launcher_env = {"PADDLE_TRAINERS_NUM": "1", "PADDLE_TRAINER_ENDPOINTS": "127.0.0.1:61111",
                    "PADDLE_CURRENT_ENDPOINT": "127.0.0.1:61111"}
    steps = dpo_steps(tiny_base, pairs, tmp_path / "full", env=launcher_env)
    assert [s["global_step"] for s in steps] == [1]


def test_checkpointing_does_not_change_the_weights_training_starts_from(tiny_base, pairs, tmp_path):
    """Side finding of the GPU review: with train.save_steps > 0 the engine loaded the base model with
    load_checkpoint_format unified_checkpoint, which skips the conversion of ERNIE's fused layers: qkv_proj and
    up_gate_proj started random (and the reference copy with them), seen only as a warning. Step 1 must see the same
    log-probabilities with and without checkpoints."""
    plain = dpo_steps(tiny_base, pairs, tmp_path / "plain")
    saving = dpo_steps(tiny_base, pairs, tmp_path / "saving", save_steps=1)
    assert plain[0]["logps/chosen"] == pytest.approx(saving[0]["logps/chosen"], abs=1e-4)
    assert plain[0]["logps/rejected"] == pytest.approx(saving[0]["logps/rejected"], abs=1e-4)
    assert "newly initialized" not in (tmp_path / "saving.log").read_text()


LAUNCHER = textwrap.dedent("""
    # A stand-in for paddle.distributed.launch: workers in sessions of their own that ignore SIGTERM (as a worker
    # busy in a collective does), a launcher that waits 30 s for them on SIGTERM.
    import os, signal, subprocess, sys, time
    worker = "import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    procs = [subprocess.Popen([sys.executable, "-c", worker]) for _ in range(2)]
    print("workers", " ".join(str(p.pid) for p in procs), flush=True)
    signal.signal(signal.SIGTERM, lambda *a: time.sleep(30))
    time.sleep(600)
""")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0]
    return state != "Z"


def test_a_stopped_stage_leaves_no_worker_behind(tmp_path):
    """(4) Workers started with os.setsid are outside the launcher's process group; ending the group used to leave
    them running (holding GPUs, writing checkpoints)."""
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    code = textwrap.dedent(f"""
        import sys, threading, os, signal, time
        from ernie_dpo import launch
        def on_line():
            pass
        threading.Timer(3, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        try:
            launch.run([sys.executable, {str(script)!r}], {str(tmp_path / 'engine.log')!r})
        except KeyboardInterrupt:
            print("stopped", flush=True)
    """)
    start = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "stopped" in r.stdout, r.stderr[-2000:]
    pids = [int(p) for p in (tmp_path / "engine.log").read_text().split("workers", 1)[1].split()[:2]]
    assert not [p for p in pids if alive(p)], "workers outlived the stopped stage"
    assert time.time() - start < 60


def test_the_launch_environment_is_the_engine_clis(monkeypatch):
    """(3) paddleformers-cli clears stale PADDLE_* variables of an enclosing job and sets three flags."""
    monkeypatch.setenv("PADDLE_TRAINER_ENDPOINTS", "10.0.0.9:6170")
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "8")
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "1")  # a value the user set wins
    env = launch.launch_env()
    assert "PADDLE_TRAINER_ENDPOINTS" not in env and "PADDLE_TRAINERS_NUM" not in env
    assert env["FLAGS_set_to_1d"] == "False" and env["FLAGS_dataloader_use_file_descriptor"] == "False"
    assert env["NVIDIA_TF32_OVERRIDE"] == "1" and len(env[launch.RUN_MARK]) == 32


def test_gpu_settings_match_erniekits_mixed_precision():
    """(2) compute_type bf16 without fp16_opt_level gave O1 (fp32 weights under autocast, amp_master_grad ignored);
    ERNIEKit's 0.3B DPO configs and PaddleFormers' DPO examples use O2."""
    cfg = engine.dpo_config("m", "t", "o", "gpu", TRAIN)
    assert cfg["compute_type"] == "bf16" and cfg["fp16_opt_level"] == "O2" and cfg["amp_master_grad"] is True
    assert cfg["_attn_implementation"] == "flashmask"


@pytest.mark.parametrize("capability, expected", [((8, 0), ("bf16", "flashmask")), ((9, 0), ("bf16", "flashmask")),
                                                  ((7, 0), ("float32", "sdpa")), ((7, 5), ("float32", "sdpa"))])
def test_gpus_before_ampere_get_settings_they_can_run(capability, expected):
    """(7) bf16 and FlashMask need compute capability >= 8.0 (Paddle's AMP silently falls back to fp32 below it,
    and the flash kernels refuse): V100 / T4 get float32 and SDPA attention instead."""
    s = engine.device_settings("gpu", capability)
    assert (s["compute_type"], s["_attn_implementation"]) == expected
    assert ("fp16_opt_level" in s) == (expected[0] == "bf16")
    assert engine.inference_dtype("gpu", capability) == ("bfloat16" if expected[0] == "bf16" else "float32")
    assert engine.inference_dtype("cpu", None) == "float32"


def test_a_worker_dies_with_its_launcher(tmp_path):
    """(4) A worker of paddle.distributed.launch gets SIGKILL when the launcher dies (engine_main._engine_main)."""
    code = textwrap.dedent("""
        import os, subprocess, sys, time
        child = ("import os, time; os.setsid(); from ernie_dpo import launch; import signal; "
                 "launch._die_with_parent(signal.SIGKILL); time.sleep(600)")
        p = subprocess.Popen([sys.executable, "-c", child])
        print(p.pid, flush=True)
        time.sleep(2)
        os._exit(0)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(r.stdout.split()[0])
    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_served_requests_carry_the_models_stop_tokens_and_the_dev_server_honours_them(tiny_base):
    """(10) vLLM with --generation-config vllm drops the model's extra eos ids, and the client sent none: served
    replies could run past the end of turn local inference stops at. The request now carries stop_token_ids."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler

    from conftest import LoopbackServer

    from ernie_dpo import dev_server, generate, openai_client

    stops = generate.served_stop_ids(tiny_base)
    local = generate.LocalModel(tiny_base, "cpu")
    assert stops == sorted(local.stops)  # what local inference stops on: eos </s> and the end of turn
    seen = []

    class Capture(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = json.dumps({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = LoopbackServer(Capture, "/v1")
    try:
        openai_client.chat(srv.url, "m", [{"role": "user", "content": "hi"}], 0.7, 0.7, 8, 1, 10,
                           stop_token_ids=stops)
    finally:
        srv.close()
    assert seen[0]["stop_token_ids"] == stops

    # the dev server stops on the tokens the request names, as vLLM / FastDeploy do: naming the first token the
    # model answers with (greedy), the reply is empty and ends with "stop"
    from ernie_dpo import decode, tokens

    msgs = [{"role": "user", "content": "Tell me about the weather."}]
    first = decode.generate(local.model, [tokens.prompt_ids(local.tokenizer, msgs)], [0], [], 1, 0.0, 1.0, 1,
                            local.pad_id)[0][0][0]
    srv = dev_server.make_server(tiny_base, "127.0.0.1", 0, name="m", read_timeout=5)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}/v1"
    try:
        _, own_tokens, _ = openai_client.chat(url, "m", msgs, 1.0, 0.0, 8, 1, 60)
        _, tokens_, finish = openai_client.chat(url, "m", msgs, 1.0, 0.0, 8, 1, 60, stop_token_ids=[first])
        assert own_tokens >= 1 and (tokens_, finish) == (0, "eos")
    finally:
        srv.shutdown()
        srv.server_close()


def test_every_port_a_server_preset_opens_is_a_free_one():
    """(11) FastDeploy opens more ports than --port (metrics, engine worker queue, cache queue; 8001-8003 in older
    versions): a second server (parallel queued experiments) failed on them. Each is now a free port per stage."""
    import yaml
    from conftest import ROOT

    from ernie_dpo import managed

    command = yaml.safe_load((ROOT / "conf/server/fastdeploy.yaml").read_text())["infer"]["managed"]["command"]
    a, b = managed.command_fields("models/base"), managed.command_fields("models/merged")
    argv = [part.format(**a) for part in command]
    for flag, field in (("--port", "port"), ("--metrics-port", "metrics_port"),
                        ("--engine-worker-queue-port", "engine_worker_queue_port"),
                        ("--cache-queue-port", "cache_queue_port")):
        assert argv[argv.index(flag) + 1] == str(a[field])
    ports = [a[f] for f in managed.PORT_FIELDS]
    assert len(set(ports)) == 4 and all(p > 1024 for p in ports)
    assert a["name"] != b["name"]


def test_the_gpu_smoke_script_runs_its_whole_path_on_a_cpu():
    """benchmarks/gpu_smoke.py is what a GPU user runs first; run here with --device cpu so it cannot rot."""
    from conftest import ROOT, venv_env

    r = subprocess.run([sys.executable, "benchmarks/gpu_smoke.py", "--device", "cpu"], cwd=ROOT, env=venv_env(),
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0 and "VERDICT: every step passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    for line in ("train (lora, 5 DPO steps)", "train (full, 5 DPO steps)", "infer_tuned (full, local)"):
        assert line in r.stdout
    assert "float32" in r.stdout  # the CPU settings the engine used, reported per training run
    merge = next(line for line in r.stdout.splitlines() if line.startswith("merge (lora)"))
    assert "merged (float32) vs base + adapter: max |logit diff|" in merge  # checked, not only claimed
    probes = next(line for line in r.stdout.splitlines() if line.startswith("  length probes (lora)"))
    assert "0 failed; step 0 median" in probes


def test_a_worker_node_rebuilds_node_0s_engine_inputs_byte_for_byte(tiny_repo, tmp_path):
    """(5) Nodes 1..n-1 need node 0's logs/train/ files, which node 0 writes mid-stage: `train.py --worker-node`
    rebuilds them from params.yaml and the DVC-tracked inputs -- in another checkout, with relative paths, the same
    bytes -- and prints (here) the launch it would join."""
    import shutil

    repo = tiny_repo
    repo.set_param("trainset.eval_pairs", 8)
    repo("trainset")
    other = tmp_path / "node1"
    shutil.copytree(repo.root, other)  # what `git clone` + `dvc pull` give another node
    metrics_before = (repo.root / "metrics/train.json").read_bytes() if (repo.root / "metrics/train.json").exists() else None
    outs = {}
    for name, root in (("node0", repo.root), ("node1", other)):
        r = subprocess.run([sys.executable, "-m", "stages.train", "--worker-node", "--print-only"], cwd=root,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        files = sorted(p.name for p in (root / "logs/train").iterdir())
        outs[name] = {f: (root / "logs/train" / f).read_bytes() for f in files}
        outs[name + "_cmd"] = r.stdout.strip().split()[1:]  # the interpreter differs per checkout, nothing else
    assert set(outs["node0"]) >= {"dpo.yaml", "pairs.jsonl", "eval_pairs.jsonl", "length_probe.json"}
    assert outs["node0"] == outs["node1"] and outs["node0_cmd"] == outs["node1_cmd"]
    cfg = outs["node0"]["dpo.yaml"].decode()
    assert str(repo.root) not in cfg and "model_name_or_path: models/base" in cfg  # relative paths only
    metrics_after = (repo.root / "metrics/train.json").read_bytes() if (repo.root / "metrics/train.json").exists() else None
    assert not (repo.root / "models/train").exists() and metrics_after == metrics_before  # nothing trained


def paddle_layout_copy(tiny_base, dest):
    """The tiny model's checkpoint rewritten with PaddlePaddle's own ERNIE names (`ernie.` prefix, fused qkv_proj),
    as baidu/ERNIE-4.5-*-Paddle ships them."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(tiny_base, dest)
    for f in dest.glob("*.safetensors"):
        w = load_file(str(f))
        save_file({k.replace("model.", "ernie.", 1).replace(".q_proj.", ".qkv_proj."): v for k, v in w.items()},
                  str(f), metadata={"format": "np"})
    index = dest / "model.safetensors.index.json"
    if index.exists():
        idx = json.loads(index.read_text())
        idx["weight_map"] = {k.replace("model.", "ernie.", 1): v for k, v in idx["weight_map"].items()}
        index.write_text(json.dumps(idx))
    return dest


def test_a_checkpoint_in_the_paddle_layout_is_refused_naming_the_pt_repository(tiny_base, tmp_path):
    """Defect 1: PaddleFormers 1.2 loads ERNIE 4.5 only in the Hugging Face layout (-PT); the -Paddle layout failed
    deep in loading with "model.embed_tokens.weight should be assigned before!". It is refused at once, with the fix."""
    weights.check_layout(tiny_base, "baidu/ERNIE-4.5-0.3B-PT")  # the Hugging Face layout passes
    bad = paddle_layout_copy(tiny_base, tmp_path / "ERNIE-4.5-0.3B-Paddle")
    with pytest.raises(weights.LayoutError) as e:
        weights.check_layout(bad, "baidu/ERNIE-4.5-0.3B-Paddle")
    assert "baidu/ERNIE-4.5-0.3B-PT" in str(e.value) and "'ernie." in str(e.value)


def test_the_sanity_check_passes_a_good_model_and_stops_a_broken_one(tiny_base, tmp_path):
    """Every model source is loaded and looked at once after download or conversion (finite logits, a greedy reply):
    a broken checkpoint stops base_model, not an hour of inference later."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    from ernie_dpo import generate

    ok = generate.sanity_check(tiny_base, "cpu")
    assert ok["logits_finite"] and ok["greedy_tokens"] > 0
    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    for f in broken.glob("*.safetensors"):
        w = load_file(str(f))
        name = next(k for k in w if "embed_tokens" in k)
        w[name] = np.full_like(w[name], np.nan)
        save_file(w, str(f), metadata={"format": "np"})
    with pytest.raises(RuntimeError, match="not finite"):
        generate.sanity_check(broken, "cpu")


# made at run time, so no file of the repository (this one included) holds them
CANARY = {name: f"canary-{uuid.uuid4().hex}" for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MY_PROVIDER_API_KEY",
                                                           "GIT_TOKEN")}

# What Paddle's launcher writes about its environment (paddle/distributed/launch: process_context._start writes
# backup_env.<rank>.json, controller._save_container_env writes envlog.<rank>, and the pod log prints it), done by a
# stand-in that takes the launcher's own arguments, so the GPU launch path runs as far as a CPU allows.
STAND_IN_LAUNCHER = textwrap.dedent("""
    import json, os, sys
    argv = sys.argv[1:]
    log_dir = argv[argv.index("--log_dir") + 1]
    os.makedirs(log_dir, exist_ok=True)
    json.dump(dict(os.environ), open(os.path.join(log_dir, "backup_env.0.json"), "w"))
    open(os.path.join(log_dir, "envlog.0"), "w").write("\\n".join(f"{k}={v}" for k, v in os.environ.items()))
    print("pod environment:", dict(os.environ), flush=True)
""")


def test_no_secret_reaches_the_launchers_files_a_dvc_output_or_the_cache(tmp_path, monkeypatch):
    """(31.1) Credentials in the user's shell never reach the engine: the launcher (a stand-in writing what Paddle's
    writes) gets an environment without them, its log folder is outside every DVC output, and the engine log (a DVC
    output) holds none. The whole pipeline's outputs and DVC cache are searched for the same canaries in
    tests/test_pipeline.py."""
    for k, v in CANARY.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    cmd = launch.launch_command("train", "logs/train/dpo.yaml", "gpu", "0", 1)
    log_dir = cmd[cmd.index("--log_dir") + 1]
    assert not log_dir.startswith("logs/train") and log_dir.startswith(str(launch.LAUNCHER_LOGS))
    outs = [o if isinstance(o, str) else next(iter(o)) for st in
            yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
            for o in st.get("outs", [])]
    assert not any(log_dir == o or log_dir.startswith(o.rstrip("/") + "/") for o in outs), outs
    (tmp_path / "launch.py").write_text(STAND_IN_LAUNCHER)
    standin = [sys.executable, str(tmp_path / "launch.py")] + cmd[cmd.index("-m") + 2:]
    launch.run(standin, "logs/train/engine.log")
    written = [f for f in tmp_path.rglob("*") if f.is_file() and f.name != "launch.py"]
    assert {f.name for f in written} >= {"backup_env.0.json", "envlog.0", "engine.log"}
    assert "PATH" in (tmp_path / log_dir / "backup_env.0.json").read_text()  # the stand-in did write the environment
    leaks = [(f.name, k) for f in written for k, v in CANARY.items() if v in f.read_text(errors="replace")]
    assert leaks == []
    assert launch.without_secrets({"HF_TOKEN": "x", "PATH": "/bin", "OPENAI_API_KEY": "y", "KAGGLE_KEY": "k",
                                   "AZURE_STORAGE_CONNECTION_STRING": "c", "QIANFAN_SK": "s", "GITHUB_PAT": "p",
                                   "TOKENIZERS_PARALLELISM": "false", "FLAGS_use_mkldnn": "1",
                                   "HTTPS_PROXY": "http://me:pw@proxy:3128"}) == {
        "PATH": "/bin", "TOKENIZERS_PARALLELISM": "false", "FLAGS_use_mkldnn": "1", "HTTPS_PROXY": "http://proxy:3128"}


def test_a_failing_length_probe_is_reported_and_training_goes_on(tiny_base, pairs, tmp_path):
    """(31.5) The step-0 length probe runs the project's decode loop on the engine's (on a GPU: O2, LoRA-wrapped)
    model before step 1, the least-tested code first: whatever it raises is reported and the run goes on."""
    from ernie_dpo import length_probe

    # a prompt id far outside the vocabulary: the probe's forward pass fails, as any probe failure would
    length_probe.write_spec(tmp_path / length_probe.SPEC_NAME, [[10 ** 7]], [1], [2], 0, 1, 4, 0.7, 0.7, 1, 0.0, 2)
    steps = dpo_steps(tiny_base, pairs, tmp_path / "probed")
    assert [s["global_step"] for s in steps] == [1]  # trained to the end
    failed = [length_probe.parse_line(line) for line in (tmp_path / "probed.log").read_text().splitlines()]
    failed = [data for kind, data in filter(None, failed) if kind == "failed"]
    assert [f["step"] for f in failed] == [0, 1] and failed[0]["error"]


def test_the_capability_check_looks_at_every_gpu_trained_on(monkeypatch):
    """(31.5) An A100 and a T4 visible to one experiment (CUDA_VISIBLE_DEVICES=0,3: Paddle then counts them as 0
    and 1): training on both must get the settings the T4 can run (float32, SDPA), not the first GPU's bf16 and
    FlashMask; training on the first only gets bf16."""
    import paddle

    caps = {0: (8, 0), 1: (7, 5)}
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(paddle.device.cuda, "get_device_capability", lambda i=0: caps[i])
    assert devices.gpu_capability(1) == (8, 0) and devices.gpu_capability(2) == (7, 5)
    assert engine.device_settings("gpu", gpus=2)["compute_type"] == "float32"
    assert engine.device_settings("gpu", gpus=1)["compute_type"] == "bf16"
    with pytest.raises(devices.DeviceError, match="engine.gpus is 3 but this process sees 2"):
        devices.check_device("gpu", 3)
    cfg = engine.dpo_config("m", "t", "o", "gpu", TRAIN, {"gpus": 2, "nnodes": 1, "tensor_parallel": 1,
                                                          "sharding_parallel": 1, "sharding_stage": "stage1"})
    assert cfg["_attn_implementation"] == "sdpa"
