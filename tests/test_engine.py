"""Engine YAML, launch commands and log parsing (no engine run here; see test_model.py for real runs)."""
import math
import sys

import pytest

from ernie_dpo import devices, engine, engine_main, launch

TRAIN = dict(max_steps=10, warmup_steps=2, global_batch_size=4, learning_rate=1e-4, fine_tuning="lora",
             loss_type="sigmoid", beta=0.1, lora_rank=8, seed=42, max_seq_len=256, max_prompt_len=128)


def test_cpu_dpo_lora_config_has_the_settings_a_cpu_needs():
    cfg = engine.dpo_config("models/base", "train.jsonl", "out", "cpu", TRAIN)
    assert cfg["stage"] == "DPO" and cfg["fine_tuning"] == "LoRA" and cfg["lora"] is True
    assert cfg["device"] == "cpu" and cfg["compute_type"] == "float32" and cfg["amp_master_grad"] is False
    assert cfg["_attn_implementation"] == "eager"
    assert cfg["per_device_train_batch_size"] == cfg["global_batch_size"] == 4
    assert cfg["train_dataset_type"] == "erniekit" and cfg["save_strategy"] == "no"
    assert "batch_size" not in cfg  # a bare batch_size key is rejected by the engine


def test_gpu_full_config_uses_bf16_and_flash_attention():
    cfg = engine.dpo_config("m", "t", "o", "gpu", {**TRAIN, "fine_tuning": "full"})
    assert cfg["fine_tuning"] == "full" and "lora_rank" not in cfg
    assert cfg["compute_type"] == "bf16" and cfg["_attn_implementation"] == "flashmask"


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="fine_tuning"):
        engine.dpo_config("m", "t", "o", "cpu", {**TRAIN, "fine_tuning": "qlora"})
    with pytest.raises(ValueError, match="device"):
        engine.device_settings("tpu")


def test_launch_commands():
    assert launch.launch_command("train", "x.yaml", "cpu") == [sys.executable, "-m", "ernie_dpo.engine_main", "train",
                                                               "x.yaml"]
    gpu = launch.launch_command("train", "logs/x.yaml", "gpu", gpus=2, env={})
    assert gpu[1:3] == ["-m", "paddle.distributed.launch"] and gpu[gpu.index("--gpus") + 1] == "0,1"
    # each worker runs the installed console script (the launcher runs a non-.py script as an executable)
    assert gpu[-4].endswith("/ernie-dpo") and gpu[-3:] == ["engine", "train", "logs/x.yaml"]


def test_parse_a_real_dpo_step_line():
    line = ("[2026-11-24 17:33:01,123] [    INFO] - loss: 0.51459312, learning_rate: 5e-05, global_step: 40, "
            "interval_runtime: 0.51, interval_samples_per_second: 15.6, interval_tokens_per_second_per_device: 4206.5, "
            "rewards/chosen: 0.04634, rewards/rejected: -0.36391, rewards/accuracies: 1.0, rewards/margins: 0.41025, "
            "logps/rejected: -17.48512, logps/chosen: -3.73312, progress_or_epoch: 1.5")
    s = launch.parse_log_line(line)
    assert s["global_step"] == 40 and s["loss"] == pytest.approx(0.51459312) and s["learning_rate"] == 5e-05
    assert s["rewards/margins"] == pytest.approx(0.41025) and s["logps/chosen"] == pytest.approx(-3.73312)
    assert launch.parse_log_line("global_step is mentioned but no numbers") is None
    assert launch.parse_log_line("loss: 0.3") is None
    # a diverged run: the step is kept with its nan loss (train stops on it), not dropped as an unparsed line
    nan = launch.parse_log_line("- loss: nan, learning_rate: 5e-05, global_step: 41, rewards/margins: nan")
    assert nan["global_step"] == 41 and math.isnan(nan["loss"]) and math.isnan(nan["rewards/margins"])


def test_checkpoints_use_one_resumable_format_on_every_device():
    """flex_checkpoint (the engine's default) on a GPU left no optimizer index, so train removed every checkpoint."""
    for device in ("cpu", "gpu"):
        cfg = engine.dpo_config("m", "t", "o", device, {**TRAIN, "save_steps": 5})
        assert cfg["save_checkpoint_format"] == cfg["load_checkpoint_format"] == "unified_checkpoint", device
        assert cfg["save_steps"] == 5


def test_lora_alpha_is_not_passed_the_engine_ignores_it():
    cfg = engine.dpo_config("m", "t", "o", "cpu", TRAIN)
    assert "lora_alpha" not in cfg and cfg["lora_rank"] == 8  # (-S train.lora_alpha=... fails: tests/test_docs.py)


def test_which_gpus_come_from_cuda_visible_devices_not_from_a_parameter():
    """(31.2) A 4-GPU node where this experiment was given GPUs 2 and 3 (`CUDA_VISIBLE_DEVICES=2,3`, as a Slurm
    allocation or `ernie-dpo series --gpus` sets it): Paddle's launcher names GPUs by CUDA_VISIBLE_DEVICES' entries
    (context/device.py: `--gpus 0,1` there is "ValueError: '0' is not in list") and gives each worker its index
    among them; inference and the merge use the first visible GPU, gpu:0."""
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    cmd = launch.launch_command("train", "x.yaml", "gpu", gpus=2, env=env)
    assert cmd[cmd.index("--gpus") + 1] == "2,3"
    one = launch.launch_command("train", "x.yaml", "gpu", gpus=1, env=env)
    assert one[one.index("--gpus") + 1] == "2"
    uuids = {"CUDA_VISIBLE_DEVICES": "GPU-8f1c,GPU-77aa"}  # UUIDs are valid entries too
    by_uuid = launch.launch_command("train", "x", "gpu", gpus=2, env=uuids)
    assert by_uuid[by_uuid.index("--gpus") + 1] == "GPU-8f1c,GPU-77aa"
    with pytest.raises(devices.DeviceError, match="names 2 GPU"):
        launch.launch_command("train", "x.yaml", "gpu", gpus=4, env=env)
    assert devices.visible_gpus(env) == ["2", "3"] and devices.visible_gpus({}) is None
    assert devices.inference_device("gpu") == "gpu:0" and devices.inference_device("cpu") == "cpu"


def test_the_cheaper_cpu_layers_train_to_the_same_losses(tiny_base, sample_records, tmp_path):
    """fast_cpu (RMSNorm with x * x, rotate_half as a matmul) is kept only because a fixed 10-step run gives the same
    losses as the engine's own layers, within float32 noise."""
    from paddleformers.transformers import AutoTokenizer

    from ernie_dpo import tokens
    from ernie_dpo.common import write_jsonl

    kept, _, _ = tokens.fit_pairs(AutoTokenizer.from_pretrained(str(tiny_base)), sample_records[:40], 256, 128)
    write_jsonl(tmp_path / "pairs.jsonl", kept)
    losses = {}
    for fast in ("1", "0"):
        cfg = engine.dpo_config(tiny_base, tmp_path / "pairs.jsonl", tmp_path / f"out{fast}", "cpu",
                                {**TRAIN, "max_steps": 10, "fine_tuning": "full", "learning_rate": 1e-3})
        steps = []
        launch.run(launch.launch_command("train", engine.write_config(cfg, tmp_path / f"dpo{fast}.yaml"), "cpu"),
                   tmp_path / f"engine{fast}.log", steps.append, env={"ERNIE_DPO_FAST_CPU": fast})
        losses[fast] = [s["loss"] for s in steps]
    assert len(losses["1"]) == 10 and losses["1"][-1] != losses["1"][0]  # it trained
    assert losses["1"] == pytest.approx(losses["0"], rel=1e-4, abs=1e-5)


def test_each_pair_is_yielded_once_per_pass_and_a_held_out_pass_is_counted(capsys):
    """PaddleFormers 1.2's DPO dataset yields the last pair of a pass twice (its loop yields every pair, then
    `if len(batch_sequence) > 0: yield batch_sequence` yields the last list again). engine_main._each_pair_once removes
    the repeat and prints how many pairs a held-out pass yielded (the train stage checks it against the file)."""
    from types import SimpleNamespace

    from paddleformers.datasets.DPODataset import BaseDPODataSet

    fake = SimpleNamespace(packing=False, is_valid=True, mix_datasets=[{"n": i} for i in range(5)],
                           _postprocess_sequence=lambda ex: SimpleNamespace(token_ids=[1, 2, 3], n=ex["n"]))
    engine_main._each_pair_once()
    ours = BaseDPODataSet._generate_sequences
    upstream = [b[0].n for b in ours.original(fake)]
    assert upstream == [0, 1, 2, 3, 4, 4]  # the engine's own: the day this fails, the engine was fixed upstream
    assert [b[0].n for b in ours(fake)] == [0, 1, 2, 3, 4]
    assert engine_main.EVAL_PASS_MARK + '{"pairs": 5}' in capsys.readouterr().out


def test_a_run_is_stopped_for_longer_replies_only_when_the_probe_can_tell():
    """train.stop_if_longer: the last N probes' medians above (1 + share) x step 0's, each with a paired interval
    above 0; a failed probe (None) breaks the run of N; with no step 0 there is nothing to compare with."""
    from ernie_dpo.length_probe import should_stop

    grew = [(0, 100.0, 0.0), (10, 150.0, 20.0), (20, 160.0, 30.0)]
    assert should_stop(grew, 0.3, 2)
    assert not should_stop([(0, 100.0, 0.0), (10, 150.0, -5.0), (20, 160.0, 30.0)], 0.3, 2)  # noise, not growth
    assert not should_stop([(0, 100.0, 0.0), (10, 150.0, 20.0), (20, None, None), (30, 160.0, 30.0)], 0.3, 2)
    assert not should_stop([(10, 100.0, 0.0), (20, 150.0, 20.0), (30, 160.0, 30.0)], 0.3, 2)  # no step 0
    assert not should_stop(grew, 0.0, 2)  # share 0: never
