"""The real pretrained model: SmolLM2-135M-Instruct from its pinned PyPI package, converted offline, on the engine.

Checks what a user of the smol profile relies on: the conversion is right (a known text scores like a trained
model, and far worse without the q/k un-permutation), greedy replies are sentences, the stop token comes from the
model, training and inference feed the model the same prompt tokens (single- and multi-turn), the length count
agrees with what the engine trains on, and a couple of DPO steps run on it.
"""
import copy

import numpy as np
import pytest

from ernie_dpo import engine, gguf_model, launch, tokens, weights
from ernie_dpo.common import write_jsonl
from ernie_dpo.generate import LocalModel
from ernie_dpo.tokens import prompt_ids

PARAGRAPH = ("The cat sat on the mat. It was a sunny day, and the children were playing in the park. Their parents "
             "watched from a bench nearby, talking about the weather and the news.")
MULTI = {"id": "multi", "system": "You answer briefly.",
         "src": ["Hi, who are you?", "What is 2 + 2?", "And the capital of Japan?"],
         "tgt": ["I am an assistant.", "2 + 2 is 4."],
         "response": [["Tokyo."], ["The capital of Japan is Tokyo, a large city on the island of Honshu."]],
         "sort": [1, 0]}


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol") / "model"
    info = gguf_model.convert("smollm2-135m", d)
    assert weights.prepare_model_dir(d, "cpu") == {"fuse_rms_norm": False}  # no CPU kernel for the fused norm
    assert info["parameters"] == 134_515_008
    return d


@pytest.fixture(scope="module")
def smol(smol_dir):
    return LocalModel(smol_dir, "cpu")


def nll_per_token(lm, text):
    import paddle

    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    with paddle.no_grad():
        out = lm.model(input_ids=paddle.to_tensor([ids]))
    logits = (out[0] if isinstance(out, tuple) else out.logits)[0].numpy().astype("float64")
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -float(np.mean([logp[i, ids[i + 1]] for i in range(len(ids) - 1)]))


def test_the_packaged_file_is_verified_by_sha256(monkeypatch, tmp_path):
    path = gguf_model.locate("smollm2-135m")
    assert gguf_model.sha256_of(path) == gguf_model.SOURCES["smollm2-135m"]["sha256"]
    monkeypatch.setitem(gguf_model.SOURCES, "smollm2-135m", {**gguf_model.SOURCES["smollm2-135m"], "sha256": "0" * 64})
    with pytest.raises(gguf_model.SourceError, match="expected 0000"):
        gguf_model.locate("smollm2-135m")


def test_conversion_scores_text_like_a_trained_model_and_needs_the_unpermutation(smol, tmp_path):
    good = nll_per_token(smol, PARAGRAPH)
    gguf_model.convert_file(gguf_model.locate("smollm2-135m"), tmp_path / "raw", permuted=False)
    weights.prepare_model_dir(tmp_path / "raw", "cpu")
    bad = nll_per_token(LocalModel(tmp_path / "raw", "cpu"), PARAGRAPH)
    assert good < 3.3, good  # measured 3.0 nats/token; a random 49k-vocab model scores ~10.8
    assert bad > good + 0.5, (good, bad)


def test_greedy_replies_are_sentences_and_stop_at_the_models_end_of_turn(smol):
    assert list(smol.stops.values()) == ["<|im_end|>"]  # eos, generation config and the template's end of turn
    qs = ["What is the capital of France?", "Name three primary colors."]
    out = smol.answer([{"id": str(i), "messages": [{"role": "user", "content": q}]} for i, q in enumerate(qs)],
                      top_p=0.7, temperature=0.0, max_dec_len=48, batch_size=2, seed=0)
    assert "Paris" in out["0"]["reply"] and out["0"]["finish_reason"] == "eos"
    for r in out.values():
        words = r["reply"].split()
        assert len(words) >= 3 and r["reply"][0].isupper() and len(set(words)) > len(words) / 2, r["reply"]


def engine_training_prompt(tokenizer, rec, max_seq_len=4096):
    """The prompt token ids PaddleFormers' DPO dataset trains on for this record (its own code path)."""
    from paddleformers.datasets.DPODataset import BaseDPODataSet
    from paddleformers.datasets.reader.convertor import convert_dpo_txt_data

    ds = object.__new__(BaseDPODataSet)  # only the per-example code, not the file readers
    ds.tokenizer, ds.max_seq_len, ds.template_backend = tokenizer, max_seq_len, "jinja"
    ds.split_multi_turn, ds.efficient_eos = False, True
    example = ds._preprocess_dpo_example(convert_dpo_txt_data(copy.deepcopy(rec)))
    return ds._BaseDPODataSet__postprocess_before_concat(example)[0]


@pytest.mark.parametrize("rec", [{**MULTI, "src": MULTI["src"][-1:], "tgt": []}, MULTI,
                                 {k: v for k, v in MULTI.items() if k != "system"}], ids=["single", "multi", "no-system"])
def test_training_and_inference_see_the_same_prompt_tokens(smol, rec):
    from ernie_dpo.data import to_messages

    infer = prompt_ids(smol.tokenizer, to_messages(rec, keep_system=True))
    tokens.use_cumulative_chat_encoding()  # what the engine process does (engine_main._engine_main)
    assert engine_training_prompt(smol.tokenizer, rec) == infer
    text = smol.tokenizer.decode(infer)
    assert text.count("<|im_start|>system") == 1 and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("rec", [{**MULTI, "src": MULTI["src"][-1:], "tgt": []}, MULTI], ids=["single", "multi"])
def test_trained_ids_are_the_chat_templates_rendering_of_the_whole_conversation(smol, rec):
    """The engine used to train on `answer<|im_end|>\n<|im_end|>` (its eos appended after the template's end of
    turn); the targets now end as the template ends the turn, token for token."""
    from ernie_dpo.data import to_messages

    [kept], counts, cut = tokens.fit_pairs(smol.tokenizer, [rec], 512, 256)
    assert cut["answer_suffix"] == []
    ids = kept["token_ids"]
    for side, answer in (("chosen", rec["response"][0][0]), ("rejected", rec["response"][1][0])):
        conversation = to_messages(rec, True) + [{"role": "assistant", "content": answer}]
        whole = smol.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
        assert whole.endswith(answer + "<|im_end|>\n")
        assert ids["prompt"] + ids[side] == smol.tokenizer(whole, add_special_tokens=False)["input_ids"]


def test_the_engines_default_encoding_would_differ_on_multi_turn(smol):
    """Why the engine is switched to cumulative encoding: its default gives every later turn the template's
    default system prompt again (what the issue measured), so training prompts differed from inference."""
    from ernie_dpo.data import to_messages

    tokens.use_cumulative_chat_encoding()
    rec = {k: v for k, v in MULTI.items() if k != "system"}
    turns = type(smol.tokenizer)._engine_default_one_turn(smol.tokenizer, {"messages": to_messages(rec, True)})
    default = [i for t in turns for part in t for i in part]
    assert smol.tokenizer.decode(default).count("<|im_start|>system") == 3
    assert default != prompt_ids(smol.tokenizer, to_messages(rec, True))


def test_a_couple_of_lora_dpo_steps_on_real_long_pairs_cut_to_fit(smol_dir, tmp_path):
    """Real pairs (the shipped file), too long for max_seq_len: cut as the profile cuts them (chosen kept whole),
    counted, and the engine trains on exactly those ids -- it skips none (its own length check agrees)."""
    from paddleformers.transformers import AutoTokenizer

    from conftest import ROOT
    from ernie_dpo.data import load_records, prepare_records

    records, _, _ = prepare_records(load_records(ROOT / "data/real/dpo_en_demo.json"), 100_000, "sharegpt")
    long_pairs = [r for r in records if len(r["response"][1][0]) > 2000 and len(r["response"][0][0]) < 900][:6]
    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    kept, counts, cut = tokens.fit_pairs(tok, long_pairs, max_seq_len=384, max_prompt_len=96, truncate=True,
                                         keep_chosen_end=True)
    assert sum(counts.values()) == len(long_pairs) == 6 and len(kept) == 6 - counts["chosen_cut"] >= 4
    assert counts["truncated"] == len(kept) and cut["rejected_answers_cut"] == len(kept) and cut["chosen_answers_cut"] == 0
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for r in kept:
        ids = r["token_ids"]
        assert len(ids["prompt"]) <= 96 and sum(map(len, ids.values())) <= 384
        assert end in ids["chosen"][-2:] and end not in ids["rejected"]  # the chosen answer ends, the cut one does not
    write_jsonl(tmp_path / "pairs.jsonl", kept)
    p = dict(max_steps=2, warmup_steps=1, global_batch_size=2, learning_rate=1e-4, fine_tuning="lora",
             loss_type="sigmoid", beta=0.1, lora_rank=4, seed=42, max_seq_len=384, max_prompt_len=96)
    cfg = engine.dpo_config(smol_dir, tmp_path / "pairs.jsonl", tmp_path / "out", "cpu", p)
    steps = []
    launch.run(launch.launch_command("train", engine.write_config(cfg, tmp_path / "dpo.yaml"), "cpu"),
               tmp_path / "engine.log", steps.append)
    assert [s["global_step"] for s in steps] == [1, 2] and all(np.isfinite(s["loss"]) for s in steps)
    assert launch.engine_skips((tmp_path / "engine.log").read_text()) == 0
    assert (tmp_path / "out/lora_config.json").exists()


def test_the_training_benchmark_runs_the_projects_side_on_the_profiles_real_pairs(smol_dir, tmp_path):
    """benchmarks/training.py as docs/benchmarks.md tells a user to run it (without the TRL peer, which CI does not
    install): it once failed at an import before training anything, and no test noticed."""
    import json
    import re
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "smollm2-135m").symlink_to(smol_dir)  # the script's cache layout: no second conversion
    r = subprocess.run([sys.executable, "benchmarks/training.py", "--quick", "--modes", "lora", "--cache",
                        str(tmp_path), "--json", str(tmp_path / "figures.json")], cwd=ROOT, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    row = next(line for line in r.stdout.splitlines() if line.startswith("lora") and "this project" in line)
    cols = re.split(r"\s{2,}", row.strip())
    # mode, framework, s/step, tokens processed/step, s/1k processed tokens, s/1k pair tokens, loop s, wall s,
    # peak RSS GB, loss step 1, loss last, steps, trainable params
    assert float(cols[2]) > 0 and float(cols[8]) > 0.5 and cols[11] == "3"
    assert 0 < float(cols[9]) < 20 and 0 < float(cols[10]) < 20
    figures = json.loads((tmp_path / "figures.json").read_text())
    f = figures["figures"]["lora"]["project"]
    # step 3 of 8 pairs at batch 4 is the first batch again: 4 rows padded to its longest pair
    assert f["processed"] >= f["pair_tokens"] > 0 and float(cols[3]) == round(f["processed"])
    assert abs(f["s_per_1k"] - 1000 * f["step_intervals"][0] / f["processed"]) < 1e-6
    assert figures["pairs"] == 8 and figures["reference_once"] is True and figures["machine"]["cpu"]
