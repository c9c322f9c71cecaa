"""Beyond one CPU: the GPU guard (checked on this CPU machine), multi-GPU / multi-node launch commands and engine YAML."""
import sys
import time

import pytest
from test_engine import TRAIN

from ernie_dpo import devices, engine, launch

ENGINE = dict(gpus=1, nnodes=1, tensor_parallel=1, sharding_parallel=1, sharding_stage="stage1")


def test_gpu_guard_names_the_problem_and_the_demo_on_a_cpu_build():
    import paddle

    if paddle.is_compiled_with_cuda():
        pytest.skip("this PaddlePaddle has CUDA: the guard's CPU message cannot be seen here")
    with pytest.raises(devices.DeviceError) as e:
        devices.check_device("gpu")
    assert "CPU-only build" in str(e.value) and "profile=demo" in str(e.value) and "paddlepaddle-gpu" in str(e.value)
    devices.check_device("cpu")  # no error
    with pytest.raises(devices.DeviceError, match="must be 'cpu' or 'gpu'"):
        devices.check_device("tpu")


@pytest.mark.parametrize("stage, args", [("base_model", []), ("train", []), ("merge", []),
                                         ("infer", ["--model", "models/base", "--out", "data/infer/baseline.jsonl"])])
def test_cookbook_on_this_cpu_stops_before_any_heavy_work(run_stage, stage, args):
    import paddle

    if paddle.is_compiled_with_cuda():
        pytest.skip("needs a CPU-only PaddlePaddle")
    run_stage.set_param("engine.device", "gpu")
    run_stage.set_param("model.name_or_path", "baidu/ERNIE-4.5-0.3B-Paddle")
    start = time.time()
    r = run_stage(stage, check=False, args=args)
    assert r.returncode != 0 and f"{stage}: engine.device is 'gpu'" in r.stderr and "profile=demo" in r.stderr
    assert "Traceback" not in r.stderr and time.time() - start < 60
    assert not (run_stage.root / "models/base").exists() and not (run_stage.root / "models/train").exists()


def test_one_device_adds_no_parallel_keys():
    cfg = engine.dpo_config("m", "t", "o", "gpu", TRAIN, ENGINE)
    assert "tensor_model_parallel_size" not in cfg and cfg["per_device_train_batch_size"] == 4


def test_four_gpus_data_parallel_split_the_global_batch():
    cfg = engine.dpo_config("m", "t", "o", "gpu", {**TRAIN, "global_batch_size": 16}, {**ENGINE, "gpus": 4})
    assert cfg["global_batch_size"] == 16 and cfg["per_device_train_batch_size"] == 4
    assert (cfg["tensor_model_parallel_size"], cfg["sharding_parallel_size"], cfg["sharding"]) == (1, 1, "stage1")
    cmd = launch.launch_command("train", "logs/train/dpo.yaml", "gpu", 4, 1, env={})
    assert cmd[cmd.index("--gpus") + 1] == "0,1,2,3" and "--nnodes" not in cmd


def test_the_held_out_pairs_are_evaluated_one_pair_a_batch_on_every_device():
    """The engine averages eval metrics over batches: one pair a batch makes each eval_* value the mean over pairs
    (never the global batch, which no device could hold)."""
    e = {**ENGINE, "gpus": 4}
    cfg = engine.dpo_config("m", "t", "o", "gpu", {**TRAIN, "global_batch_size": 16}, e, eval_path="eval.jsonl")
    assert cfg["do_eval"] and cfg["per_device_train_batch_size"] == 4 and cfg["per_device_eval_batch_size"] == 1


def test_tensor_and_sharding_parallel_over_two_nodes():
    e = {**ENGINE, "gpus": 8, "nnodes": 2, "tensor_parallel": 2, "sharding_parallel": 4,
         "sharding_stage": "stage2"}
    cfg = engine.dpo_config("m", "t", "o", "gpu", {**TRAIN, "global_batch_size": 32}, e)
    # 16 devices / tensor 2 = 8 data ranks, 4 of which shard the optimizer state; 32 / 8 = 4 per device
    assert (cfg["tensor_model_parallel_size"], cfg["sharding_parallel_size"], cfg["sharding"]) == (2, 4, "stage2")
    assert cfg["per_device_train_batch_size"] == 4
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "8090", "RANK": "1"}
    cmd = launch.launch_command("train", "logs/train/dpo.yaml", "gpu", e["gpus"], 2, env)
    assert cmd[cmd.index("--master") + 1] == "10.0.0.1:8090"
    assert (cmd[cmd.index("--nnodes") + 1], cmd[cmd.index("--rank") + 1]) == ("2", "1")
    assert cmd[1:3] == ["-m", "paddle.distributed.launch"] and cmd[-2:] == ["train", "logs/train/dpo.yaml"]
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        launch.launch_command("train", "x.yaml", "gpu", 2, 2, env={})


@pytest.mark.parametrize("change, message", [
    ({"gpus": 3}, "tensor_parallel 2 does not divide the 3 devices"),
    ({"gpus": 4, "sharding_parallel": 3}, "sharding_parallel 3 does not divide the 2 data ranks"),
    ({"gpus": 8}, "global_batch_size 2 is not a multiple of the 4 data ranks"),
    ({"gpus": 2, "sharding_stage": "stage4"}, "sharding_stage"),
])
def test_inconsistent_parallel_degrees_are_refused(change, message):
    e = {**ENGINE, "tensor_parallel": 2, **change}
    with pytest.raises(ValueError, match=message):
        engine.dpo_config("m", "t", "o", "gpu", {**TRAIN, "global_batch_size": 2}, e)


def test_a_cpu_runs_one_process():
    with pytest.raises(ValueError, match="one process"):
        engine.dpo_config("m", "t", "o", "cpu", TRAIN, {**ENGINE, "gpus": 2})
    assert launch.launch_command("train", "x.yaml", "cpu") == [sys.executable, "-m", "ernie_dpo.engine_main", "train", "x.yaml"]
