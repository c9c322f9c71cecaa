"""The model half on the real engine (PaddleFormers) with a tiny ERNIE-4.5 model: DPO, merge, resumable generation."""
import numpy as np
import pytest

from ernie_dpo import engine, launch, tokens, weights
from ernie_dpo.common import read_jsonl, write_jsonl
from ernie_dpo.data import to_messages
from ernie_dpo.generate import generate_all

TRAIN = dict(max_steps=3, warmup_steps=1, global_batch_size=4, learning_rate=1e-3, fine_tuning="lora",
             loss_type="sigmoid", beta=0.1, lora_rank=4, seed=42, max_seq_len=128, max_prompt_len=64)


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory, sample_records):
    path = tmp_path_factory.mktemp("dpo") / "train.jsonl"
    write_jsonl(path, sample_records[:16])
    return path


def test_tokenizer_and_chat_template_load_like_the_real_model(tiny_base):
    from paddleformers.transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|begin_of_sentence|>User: Hi\nAssistant: "
    assert tok.eos_token_id == 2 and tok.convert_tokens_to_ids("<|end_of_sentence|>") not in (None, tok.unk_token_id)


def test_lora_dpo_logs_every_step_and_writes_an_adapter(tiny_base, dpo_data, tmp_path):
    out = tmp_path / "train"
    cfg_path = engine.write_config(engine.dpo_config(tiny_base, dpo_data, out, "cpu", TRAIN), tmp_path / "dpo.yaml")
    steps = []
    launch.run(launch.launch_command("train", cfg_path, "cpu"), tmp_path / "engine.log", steps.append)
    assert [s["global_step"] for s in steps] == [1, 2, 3]
    for key in ("loss", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert all(key in s for s in steps), key
    assert (out / "lora_config.json").exists() and list(out.glob("peft_model*.safetensors"))
    assert "global_step: 3" in (tmp_path / "engine.log").read_text()


def test_merge_gives_the_same_logits_as_base_plus_adapter(tiny_base, dpo_data, tmp_path):
    import paddle
    from paddleformers.peft import LoRAModel
    from paddleformers.transformers import AutoModelForCausalLM

    out = tmp_path / "train"
    cfg = engine.dpo_config(tiny_base, dpo_data, out, "cpu", {**TRAIN, "max_steps": 2, "learning_rate": 5e-3})
    launch.run(launch.launch_command("train", engine.write_config(cfg, tmp_path / "d.yaml"), "cpu"), tmp_path / "log")
    weights.merge_lora(tiny_base, out, tmp_path / "merged", "cpu")

    x = paddle.to_tensor([[5, 20, 30, 40, 50, 60, 70]])

    def logits(model):
        model.eval()
        with paddle.no_grad():
            o = model(input_ids=x)
        return (o[0] if isinstance(o, tuple) else o.logits).numpy()

    adapter = logits(LoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype="float32"), str(out)))
    merged = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype="float32"))
    plain = logits(AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype="float32"))
    assert np.abs(merged - adapter).max() < 1e-4
    assert np.abs(merged - plain).max() > 1e-3  # the adapter really changed the model
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()


def test_a_bf16_adapter_merges_in_float32_and_saves_in_the_servers_dtype(tiny_base, dpo_data, tmp_path):
    """After a GPU (O2) run the adapter's factors are bfloat16 while the merge loads the base in float32: the sum is
    formed in float32 (logits equal to base + the bf16 adapter's), and a bfloat16 save is what its config says."""
    import json

    import paddle
    from paddleformers.peft import LoRAModel
    from paddleformers.transformers import AutoModelForCausalLM
    from safetensors import safe_open
    from safetensors.paddle import load_file, save_file

    out = tmp_path / "train"
    cfg = engine.dpo_config(tiny_base, dpo_data, out, "cpu", {**TRAIN, "max_steps": 2, "learning_rate": 5e-3})
    launch.run(launch.launch_command("train", engine.write_config(cfg, tmp_path / "d.yaml"), "cpu"), tmp_path / "log")
    for f in out.glob("peft_model*.safetensors"):  # the adapter as an O2 run writes it: bf16 factors
        save_file({k: v.astype("bfloat16") for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "np"})
    with safe_open(str(next(out.glob("peft_model*.safetensors"))), "np") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())

    x = paddle.to_tensor([[5, 20, 30, 40, 50, 60, 70]])

    def logits(model):
        model.eval()
        with paddle.no_grad():
            o = model(input_ids=x)
        return (o[0] if isinstance(o, tuple) else o.logits).astype("float32").numpy()

    (tmp_path / "f32").mkdir()
    adapter = logits(LoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype="float32"),
                                               str(weights.float32_copy(out, tmp_path / "f32"))))
    plain = logits(AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype="float32"))
    weights.merge_lora(tiny_base, out, tmp_path / "m32", "cpu")
    merged = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "m32"), dtype="float32"))
    assert np.abs(merged - adapter).max() < 1e-4 and np.abs(merged - plain).max() > 1e-3

    weights.merge_lora(tiny_base, out, tmp_path / "m16", "cpu", save_dtype="bfloat16")
    config = json.loads((tmp_path / "m16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with safe_open(str(next((tmp_path / "m16").glob("*.safetensors"))), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    m16 = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "m16"), dtype="float32"))
    # bf16 weights: each within half a bf16 step of the float32 sum, so the logits agree to bf16 precision
    assert np.abs(m16 - merged).max() < 0.05 * max(1.0, np.abs(merged).max())
    # why merge_lora loads a float32 copy: the engine refuses bf16 factors for a float32 model (in a child process:
    # a failed load leaves the engine's loader unusable in the process that tried)
    import subprocess
    import sys

    code = ("import sys; from paddleformers.peft import LoRAModel; "
            "from paddleformers.transformers import AutoModelForCausalLM; "
            "LoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='float32'), sys.argv[2])")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_base), str(out)], capture_output=True, text=True)
    assert r.returncode != 0 and "Direct assignment of Tensors with different types is prohibited" in r.stderr


def test_full_dpo_runs_in_one_cpu_process(tiny_base, dpo_data, tmp_path):
    out = tmp_path / "full"
    cfg = engine.dpo_config(tiny_base, dpo_data, out, "cpu", {**TRAIN, "fine_tuning": "full", "max_steps": 2,
                                                          "learning_rate": 1e-5})
    steps = []
    launch.run(launch.launch_command("train", engine.write_config(cfg, tmp_path / "f.yaml"), "cpu"), tmp_path / "l",
               steps.append)
    assert [s["global_step"] for s in steps] == [1, 2] and list(out.glob("model*.safetensors"))


def test_engine_failure_raises_with_the_log_tail(tmp_path):
    cfg = engine.write_config({"stage": "DPO", "model_name_or_path": str(tmp_path / "no-such-model"), "device": "cpu"},
                              tmp_path / "bad.yaml")
    with pytest.raises(RuntimeError, match="engine command failed"):
        launch.run(launch.launch_command("train", cfg, "cpu"), tmp_path / "bad.log")


def test_generation_resumes_after_an_interruption(tiny_base, sample_records, tmp_path):
    tests = [{"id": r["id"], "messages": to_messages(r, False)} for r in sample_records[:6]]
    kwargs = dict(top_p=0.7, temperature=0.7, max_dec_len=12, batch_size=2, seed=5, device="cpu")
    full, info = generate_all(tests, tmp_path / "full.jsonl", tiny_base, **kwargs)
    assert info["prompts_generated"] == 6 and info["threads"] >= 1 and info["top_k"] == "off"
    assert [r["id"] for r in full] == [t["id"] for t in tests]
    assert all(r["messages"][-1] == {"role": "assistant", "content": r["reply"]} for r in full)
    assert all(r["finish_reason"] in ("eos", "length") and 0 <= r["tokens"] <= 12 for r in full)

    # an interrupted run: two replies written, then a line torn by the kill
    lines = (tmp_path / "full.jsonl").read_text().splitlines(True)
    (tmp_path / "cut.jsonl").write_text("".join(lines[:2]) + lines[2][:15])
    resumed, info = generate_all(tests, tmp_path / "cut.jsonl", tiny_base, **kwargs)
    assert info["prompts_generated"] == 4
    assert resumed == full  # per-prompt seeds: the resumed run writes what the uninterrupted one did
    assert len(read_jsonl(tmp_path / "cut.jsonl")) == 6

    # nothing left to do: the model is not even loaded (a missing model dir would fail otherwise)
    again, info = generate_all(tests, tmp_path / "cut.jsonl", tmp_path / "no-model-here", **kwargs)
    assert info["prompts_generated"] == 0
    assert again == full


def test_the_length_count_agrees_with_what_the_engine_skips(tiny_base, sample_records, tmp_path):
    """tokens.fit_pairs predicts the engine's own [SKIP]s: hand the engine the unfiltered pairs (its own encoding)
    and it skips the ones the count called too long; hand it the kept ones (with their token ids) and it skips none."""
    from paddleformers.transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    long_answer = " ".join(["This answer goes on and on."] * 60)
    too_long = [{**r, "id": f"long{k}", "response": [r["response"][0], [long_answer]]}
                for k, r in enumerate(sample_records[:3])]
    pairs = sample_records[3:11] + too_long
    kept, counts, cut = tokens.fit_pairs(tok, pairs, max_seq_len=256, max_prompt_len=128)
    assert counts["too_long"] == 3 and len(kept) == len(pairs) - 3 - counts["prompt_too_long"]
    assert 0 < cut["pair_tokens_max"] <= 256

    def skips(records, name):
        write_jsonl(tmp_path / f"{name}.jsonl", records)
        cfg = engine.dpo_config(tiny_base, tmp_path / f"{name}.jsonl", tmp_path / name, "cpu",
                                {**TRAIN, "max_steps": 2, "global_batch_size": 4, "max_seq_len": 256,
                                 "max_prompt_len": 128})
        launch.run(launch.launch_command("train", engine.write_config(cfg, tmp_path / f"{name}.yaml"), "cpu"),
                   tmp_path / f"{name}.log")
        return launch.engine_skips((tmp_path / f"{name}.log").read_text())

    assert skips(pairs, "unfiltered") >= 1  # the engine drops them, logging only the first few
    assert skips(kept, "filtered") == 0


def test_early_turns_that_do_not_fit_are_counted_as_truncated(tiny_base):
    from paddleformers.transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    history = " ".join(["An early turn with many words in it."] * 20)
    rec = {"id": "m", "src": [history, "Short question?"], "tgt": [history], "response": [["Yes."], ["No, not at all."]],
           "sort": [1, 0]}
    msgs = to_messages(rec, keep_system=True)
    pair = tokens.encode_pair(tok, msgs, "Yes.", "No, not at all.", max_seq_len=64, max_prompt_len=64)
    assert pair.status == "history_truncated" and pair.total <= 64 and pair.cut["prompt"] > 0
    assert tokens.encode_pair(tok, msgs, "Yes.", "No, not at all.", 4096, 4096).status == "fits"
    assert tokens.encode_pair(tok, msgs, "Yes.", "No, not at all.", 4096, 16).status == "prompt_too_long"


def test_a_run_that_makes_replies_longer_is_seen_and_stopped(tiny_repo):
    """The recipe's exp3 failure, made on purpose: DPO towards the LONG answers (chosen and rejected swapped). The
    length probes (validation prompts, step 0 included) show the replies growing, each probe's paired interval vs
    step 0 above 0, and stop_if_longer stops the run with a clear message, the curve saved."""
    import json

    repo = tiny_repo
    repo.set_param("trainset.eval_pairs", 12)
    repo("trainset")
    for name in ("train", "eval"):
        path = repo.root / f"data/trainset/{name}.jsonl"
        rows = [{**r, "response": r["response"][::-1]} for r in read_jsonl(path)]  # prefer the padded answers
        write_jsonl(path, rows)
    for key, value in (("train.max_steps", 30), ("train.warmup_steps", 0), ("train.learning_rate", 3e-3),
                       ("train.global_batch_size", 8), ("train.fine_tuning", "full"), ("train.eval_steps", 0),
                       ("train.length_probe_steps", 3), ("train.length_probe_prompts", 8),
                       ("train.length_probe_max_dec_len", 96), ("train.stop_if_longer", 0.3),
                       ("train.stop_if_longer_probes", 2)):
        repo.set_param(key, value)
    r = repo("train", check=False)
    assert r.returncode != 0 and "STOPPED at step" in r.stderr and "LONGER" in r.stderr, r.stderr[-3000:]
    rows = (repo.root / "metrics/dvclive/plots/metrics/length_probe/chars_median.tsv").read_text().splitlines()[1:]
    medians = [float(x.split("\t")[1]) for x in rows]
    assert rows[0].startswith("0\t") and medians[-1] > 1.3 * medians[0], medians
    metrics = json.loads((repo.root / "metrics/train.json").read_text())["dpo"]
    assert metrics["stopped_early"] is True and metrics["steps_done"] < 30
    assert (repo.root / "metrics/plots/dpo_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("fine_tuning", ["full", "lora"])
def test_reference_log_probs_computed_once_train_to_the_same_losses(tiny_base, dpo_data, tmp_path, fine_tuning):
    """(issue 33) The frozen reference's log-probs of every pair computed once before step 1 (engine_main.
    _reference_logps_once) instead of at every step: the same loss, margins and accuracies at every step (6 steps
    over 8 pairs, so pairs are seen again) and the same held-out metrics (4 held-out pairs, evaluated at steps 3 and
    6), in full fine-tuning (a reference copy, freed after the pass) and LoRA (the adapter disabled)."""
    import re

    from ernie_dpo import engine_main

    write_jsonl(tmp_path / "eval.jsonl", read_jsonl(dpo_data)[8:12])
    write_jsonl(tmp_path / "train.jsonl", read_jsonl(dpo_data)[:8])
    cfg = engine.dpo_config(tiny_base, tmp_path / "train.jsonl", tmp_path / "out", "cpu",
                            {**TRAIN, "fine_tuning": fine_tuning, "max_steps": 6, "global_batch_size": 4,
                             "eval_steps": 3, "max_seq_len": 512, "max_prompt_len": 256},
                            eval_path=tmp_path / "eval.jsonl")
    cmd = launch.launch_command("train", engine.write_config(cfg, tmp_path / "d.yaml"), "cpu")
    runs, held_out = {}, {}
    for once in ("0", "1"):
        steps = []
        launch.run(cmd, tmp_path / f"{once}.log", steps.append, env={engine_main.REF_ONCE_ENV: once})
        runs[once] = [[s[k] for k in ("global_step", "loss", "rewards/margins", "rewards/accuracies",
                                      "logps/chosen")] for s in steps if "loss" in s]
        held_out[once] = [[s[k] for k in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen")]
                          for s in steps if "eval_loss" in s]
    log = (tmp_path / "1.log").read_text()
    once = re.search(r"ERNIE_DPO_REFERENCE_ONCE (\d+) pairs' reference log-probs computed once(.*)", log)
    assert once and int(once.group(1)) == 12  # the 8 training and 4 held-out pairs (all fit max_seq_len)
    # full fine-tuning: the reference copy is freed once every pair is cached; LoRA has no copy
    assert ("the reference copy of the model freed" in once.group(2)) == (fine_tuning == "full")
    assert "steps read the reference log-probs from the cache" in log  # used, not skipped
    assert "computed once" not in (tmp_path / "0.log").read_text()
    assert len(runs["1"]) == 6 and [r[0] for r in runs["1"]] == [1, 2, 3, 4, 5, 6]
    assert np.allclose(runs["0"], runs["1"], rtol=0, atol=2e-5), (runs["0"], runs["1"])
    # the first evaluation (step 3) is equal to the bit; later ones follow weights that trained on reference values
    # rounded in batches of another padded length (~1e-7), which moves a summed log-prob of ~377 by one float ulp
    assert len(held_out["1"]) >= 2 and held_out["0"][0] == held_out["1"][0], held_out
    assert np.allclose(held_out["0"], held_out["1"], rtol=1e-6, atol=2e-5), held_out
