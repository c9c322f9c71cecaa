"""Starting the engine and reading what it prints: the launch command (one process on a CPU, PaddlePaddle's
distributed launcher on GPUs), the environment it gets (no credentials), process control, and log parsing.

A run's YAML is written next to its log, and the stage logs the exact launch command: `python -m ernie_dpo.engine_main
train <that yaml>` on a CPU, `ernie-dpo engine train <that yaml>` under `python -m paddle.distributed.launch` on GPUs.
Never `paddleformers-cli train <that yaml>`: it skips engine_main (the pairs' token ids, the checkpoint-load and
one-GPU fixes), and it always relaunches itself through the launcher with the GPUs GPUtil finds -- none on a CPU, so
it fails there.
"""
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .devices import DeviceError, visible_gpus


def engine_skips(log_text):
    """Pairs the engine itself reported skipping in its log (it should be none: tokens.fit_pairs removed them first)."""
    return log_text.count("[SKIP]")


def console_script():
    """The `ernie-dpo` executable of this environment (installed with the package: `pip install -e .`)."""
    path = Path(sys.executable).parent / "ernie-dpo"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: install the project into this environment (`make install`, or "
                                "`pip install --no-deps -e .`)")
    return str(path)


# The launcher's own log folder: outside every DVC output (logs/train is one), so nothing it writes reaches the DVC
# cache, a remote or a checkpoint bucket; git-ignored (logs/.gitignore). The engine's output is in logs/train/engine.log.
LAUNCHER_LOGS = Path("logs/launcher")


def launch_command(command, cfg_path, device, gpus=1, nnodes=1, env=None):
    """The argument list that runs `command` (train | export) on `cfg_path`.

    gpu: PaddlePaddle's distributed launcher, as paddleformers-cli builds it: one process per GPU, on the first
    `gpus` GPUs this process sees. The launcher names GPUs by the entries of CUDA_VISIBLE_DEVICES (context/device.py:
    its labels) and gives each worker its index among them, so `--gpus` lists those entries ("2,3" under
    CUDA_VISIBLE_DEVICES=2,3), or 0..gpus-1 when nothing is hidden. With nnodes > 1 every node runs this same command
    with its own RANK; MASTER_ADDR / MASTER_PORT name node 0 (the environment paddleformers-cli reads too).
    cpu: one process running engine_main, which starts the engine's launcher in-process.
    """
    env = os.environ if env is None else env
    if device == "gpu":
        visible = visible_gpus(env)
        names = visible if visible is not None else [str(i) for i in range(int(gpus))]
        if len(names) < int(gpus):
            raise DeviceError(f"engine.gpus is {gpus} but CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')} "
                              f"names {len(names)} GPU(s)")
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(LAUNCHER_LOGS / command),
               "--gpus", ",".join(names[:int(gpus)])]
        if int(nnodes) > 1:
            if not env.get("MASTER_ADDR"):
                raise ValueError(f"engine.nnodes is {nnodes}: set MASTER_ADDR (node 0's address), MASTER_PORT and "
                                 "RANK (0 on node 0, 1..n-1 on the others) on every node")
            cmd += ["--master", f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '8080')}", "--nnodes", str(nnodes),
                    "--rank", str(env.get("RANK", "0"))]
        # each worker runs `ernie-dpo engine` (the installed console script: the launcher runs a non-.py script as
        # an executable), not the engine's launcher directly, for engine_main's settings
        return cmd + ["--run_mode=collective", console_script(), "engine", command, str(cfg_path)]
    return [sys.executable, "-m", "ernie_dpo.engine_main", command, str(cfg_path)]


# One logged training step, e.g. "loss: 0.6931, learning_rate: 1e-05, global_step: 3, rewards/chosen: 0.01, ..."
_STEP = re.compile(r"(?:^|[\s,])(loss|\w+_loss|learning_rate|global_step|rewards/\w+|logps/\w+|train_\w+|eval_\w+(?:/\w+)?|"
                   r"interval_tokens_per_second_per_device): ?(-?[0-9.]+(?:e[-+]?\d+)?|-?nan|-?inf)")  # nan: a diverged run, kept


def parse_log_line(line):
    """A dict of the numbers on a PaddleFormers step line (training: with global_step and loss) or eval line (with
    eval_loss; the engine prints no step on it), or None for any other line."""
    if "global_step" not in line and "eval_loss" not in line:
        return None
    found = {k: float(v) for k, v in _STEP.findall(line)}
    if "eval_loss" in found:
        return found
    if "global_step" not in found or not {"loss", "train_loss"} & found.keys():
        return None
    found["global_step"] = int(found["global_step"])
    return found


# What paddleformers-cli does to the environment before it launches (paddleformers/cli/cli.py, 1.2.0): variables a
# previous or enclosing distributed job left behind would make paddle.distributed.launch join the wrong job, and
# three flags change numerics or the data loader.
STALE_LAUNCH_ENV = ("PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ID", "PADDLE_WORKERS_IP_PORT_LIST", "PADDLE_TRAINERS",
                    "PADDLE_NUM_GRADIENT_SERVERS", "PADDLE_ELASTIC_JOB_ID", "PADDLE_TRAINER_ENDPOINTS",
                    "DISTRIBUTED_TRAINER_ENDPOINTS", "FLAGS_START_PORT", "PADDLE_ELASTIC_TIMEOUT")
LAUNCH_FLAGS = {"FLAGS_set_to_1d": "False", "NVIDIA_TF32_OVERRIDE": "0", "FLAGS_dataloader_use_file_descriptor": "False"}
RUN_MARK = "ERNIE_DPO_ENGINE_RUN"  # in every engine process's environment: how run() finds them all to stop them


# Names of variables that carry credentials. The engine and the inference servers need none of them (models and data
# are local files by then), and Paddle's GPU launcher writes its whole environment into its log folder
# (backup_env.<rank>.json, envlog.<rank>, the pod log): what the engine never receives, it cannot write anywhere.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH|COOKIE|SESSION|"
                         r"CONNECTION_STRING|DATABASE_URL|(^|_)(KEY|PAT|AK|SK|PWD|DSN)$", re.IGNORECASE)
NOT_SECRET = {"TOKENIZERS_PARALLELISM", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "AISTUDIO_HUB_DISABLE_IMPLICIT_TOKEN"}
_PROXY_USER = re.compile(r"(://)[^/@\s]+@")  # http://user:password@proxy:3128 -> http://proxy:3128


def without_secrets(env):
    """env without the variables whose names say they carry a credential (SECRET_NAME, except NOT_SECRET's
    switches), and proxies without their user:password."""
    out = {k: v for k, v in env.items() if k in NOT_SECRET or not SECRET_NAME.search(k)}
    return {k: _PROXY_USER.sub(r"\1", v) if k.lower().endswith("_proxy") else v for k, v in out.items()}


def launch_env(env=None):
    """The environment the engine starts with: the CLI's (stale PADDLE_* cleared, its flags set unless the user set
    them), no credentials (without_secrets), unbuffered output, and a mark naming this run."""
    full = {k: v for k, v in without_secrets(os.environ).items() if k not in STALE_LAUNCH_ENV}
    full.update(env or {})
    for k, v in LAUNCH_FLAGS.items():
        full.setdefault(k, v)
    full.setdefault("PYTHONUNBUFFERED", "1")
    # the engine imports ernie_dpo (its hooks) from the checkout it runs in, as the stages do, not from wherever the
    # editable install points: DVC runs queued experiments in copies of the repository
    full["PYTHONPATH"] = os.pathsep.join([os.getcwd()] + [p for p in [full.get("PYTHONPATH")] if p])
    full[RUN_MARK] = uuid.uuid4().hex
    return full


def run(cmd, log_path, on_step=None, env=None, on_line=None):
    """Run the engine, tee its output to `log_path`, call on_step(dict) for each logged step (training or eval) and
    on_line(line) for every line. Raises on failure.

    Stopping: the engine runs in its own process group. If this process is stopped (Ctrl-C, SIGTERM from `dvc` or a
    scheduler) or anything here fails, the group is ended (stop_group) and then every process that carries this
    run's mark in its environment: paddle.distributed.launch starts each GPU worker in a session of its own
    (os.setsid), outside the group, and waits 30 s for them itself, so the group alone can leave workers behind
    holding GPUs and writing checkpoints. If this process is killed outright (SIGKILL), the kernel ends the launcher
    (_die_with_parent) and each worker with it (engine_main sets the same on workers).
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = launch_env(env)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    proc = None
    try:
        with open(log_path, "a", encoding="utf-8", buffering=1) as log:  # line-buffered: `tail -f` shows each step
            # errors="replace": one undecodable byte in the engine's output must not end a training run
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                                    encoding="utf-8", errors="replace",
                                    bufsize=1, start_new_session=True, preexec_fn=_die_with_parent)
            for line in proc.stdout:
                log.write(line)
                if on_line is not None:
                    on_line(line)
                step = parse_log_line(line)
                if step is not None and on_step is not None:
                    on_step(step)
            rc = proc.wait()
    finally:
        if proc is not None and proc.poll() is None:
            stop_group(proc)
        if proc is not None:
            kill_marked(full_env[RUN_MARK])
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if rc != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
        raise RuntimeError(f"engine command failed (exit {rc}): {' '.join(cmd)}\n--- last lines of {log_path} ---\n{tail}")


def stop_group(proc, grace_s=10):
    """SIGTERM the engine's process group, then SIGKILL what is left after grace_s seconds."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def marked_pids(mark):
    """Processes of this user whose environment carries RUN_MARK=mark (Linux /proc; elsewhere none are found)."""
    needle = f"{RUN_MARK}={mark}".encode()
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if d.stat().st_uid == os.getuid() and needle in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def kill_marked(mark, grace_s=5):
    """End every process left from one engine run (workers that left the launcher's group): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in marked_pids(mark) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(p in marked_pids(mark) for p in pids):
            time.sleep(0.2)


def _die_with_parent(sig=signal.SIGTERM):
    """(Linux) `sig` to this process when its parent dies, even by SIGKILL: in the engine child (before exec) when
    the stage dies, in a GPU worker when the launcher dies. Their own sessions keep them out of a terminal's Ctrl-C,
    so this is what ends an orphan."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()
