"""The GPU path, proven on a CPU with stand-ins (no GPU with PaddlePaddle is reachable from this project).

Each test names the defect it guards (issue 16) and fails on the code before the fix."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from ernie_dpo import engine
from ernie_dpo.common import write_jsonl

TRAIN = dict(max_steps=1, warmup_steps=0, global_batch_size=4, learning_rate=1e-4, fine_tuning="full",
             loss_type="sigmoid", beta=0.1, lora_rank=4, seed=42, max_seq_len=256, max_prompt_len=128)


def dpo_steps(model, pairs, out, extra=None, env=None, **p):
    cfg = engine.dpo_config(model, pairs, out, "cpu", {**TRAIN, **p})
    cfg.update(extra or {})
    steps = []
    engine.run(engine.launch_command("train", engine.write_config(cfg, out.parent / f"{out.name}.yaml"), "cpu"),
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
        from ernie_dpo import engine
        def on_line():
            pass
        threading.Timer(3, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        try:
            engine.run([sys.executable, {str(script)!r}], {str(tmp_path / 'engine.log')!r})
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
    env = engine.launch_env()
    assert "PADDLE_TRAINER_ENDPOINTS" not in env and "PADDLE_TRAINERS_NUM" not in env
    assert env["FLAGS_set_to_1d"] == "False" and env["FLAGS_dataloader_use_file_descriptor"] == "False"
    assert env["NVIDIA_TF32_OVERRIDE"] == "1" and len(env[engine.RUN_MARK]) == 32


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
    """(4) A worker of paddle.distributed.launch gets SIGKILL when the launcher dies (engine._engine_main)."""
    code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        child = ("import os, time; os.setsid(); from ernie_dpo import engine; import signal; "
                 "engine._die_with_parent(signal.SIGKILL); time.sleep(600)")
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

    # the dev server ends a reply at a token the request names, as vLLM / FastDeploy do
    srv = dev_server.make_server(tiny_base, "127.0.0.1", 0, name="m", read_timeout=5)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}/v1"
    try:
        msgs = [{"role": "user", "content": "Tell me about the weather."}]
        free, tokens, _ = openai_client.chat(url, "m", msgs, 1.0, 0.0, 24, 1, 60)
        first = local.tokenizer(free, add_special_tokens=False)["input_ids"][0]
        cut, cut_tokens, finish = openai_client.chat(url, "m", msgs, 1.0, 0.0, 24, 1, 60, stop_token_ids=[first])
        assert cut == "" and cut_tokens == 0 and finish == "eos"
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
