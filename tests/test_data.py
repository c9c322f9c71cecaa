"""The data half: conversion and validation, length filters, test/train separation, determinism."""
import json

import pytest

from ernie_dpo import data
from ernie_dpo.common import read_jsonl


def rec(user="What is 2 plus 2?", chosen="4.", rejected="Well, let me think about it: the answer is 4.", **extra):
    r = {"conversations": [{"from": "human", "value": user}], "chosen": {"from": "gpt", "value": chosen},
         "rejected": {"from": "gpt", "value": rejected}}
    r.update(extra)
    return r


def test_convert_matches_the_recipe_layout():
    r = rec()
    r["conversations"] = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi, I am Sponge."},
                          {"from": "gpt", "value": "Hello Sponge!"}, {"from": "human", "value": "Who am I?"}]
    out = data.convert_record(r)
    assert out == {"system": "Be brief.", "src": ["Hi, I am Sponge.", "Who am I?"], "tgt": ["Hello Sponge!"],
                   "response": [["4."], ["Well, let me think about it: the answer is 4."]], "sort": [1, 0]}


def test_plain_string_answers_and_openai_roles_are_accepted():
    r = {"conversations": [{"role": "user", "content": "Q?"}], "chosen": "short", "rejected": "much longer answer"}
    assert data.convert_record(r)["response"] == [["short"], ["much longer answer"]]


@pytest.mark.parametrize("bad, reason", [
    ({"chosen": "a", "rejected": "b"}, "missing_field"),
    (rec(chosen=""), "empty_chosen"),
    (rec(rejected="   \n"), "empty_rejected"),
    (rec(chosen=3), "wrong_type"),
    (rec(chosen="same", rejected="same"), "identical_pair"),
    ({**rec(), "conversations": [{"from": "robot", "value": "hi"}]}, "unknown_role"),
    ({**rec(), "conversations": [{"from": "system", "value": "sys only"}]}, "no_user_turn"),
    ({**rec(), "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "last_turn_not_user"),
    ({**rec(), "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]}, "bad_turn_order"),
    ({**rec(), "conversations": [{"from": "human", "value": " "}]}, "empty_turn"),
    ({**rec(), "conversations": "not a list"}, "wrong_type"),
    ({**rec(), "conversations": [{"from": "human", "value": 5}]}, "wrong_type"),
])
def test_invalid_records_are_dropped_with_their_reason(bad, reason):
    kept, rejects, counts = data.prepare_records([rec(), bad])
    assert len(kept) == 1 and counts["read"] == 2 and counts["kept"] == 1
    assert counts["dropped"] == {reason: 1}
    assert rejects[0]["index"] == 1 and rejects[0]["reason"] == reason and rejects[0]["record"] == bad


def test_duplicates_are_counted_and_ids_are_stable_content_hashes():
    a, b = rec(user="A?"), rec(user="B?")
    kept1, _, _ = data.prepare_records([a, b, a])
    kept2, _, counts = data.prepare_records([b, a])
    assert [k["id"] for k in kept1] == [k["id"] for k in reversed(kept2)]  # id survives reordering
    kept3, rejects, counts3 = data.prepare_records([a, b, a])
    assert counts3["dropped"] == {"duplicate": 1} and rejects[0]["index"] == 2


@pytest.mark.parametrize("content, message", [
    (b"this is not json", "not valid JSON"),
    (b'[{"conversations": []}', "not valid JSON"),
    (b'{"conversations": []}', "expected a JSON list"),
    (b'[{"a": 1}, 7]', "record 1 is a JSON int"),
    (b'["x"]', "record 0 is a JSON str"),
])
def test_unusable_files_stop_with_file_record_and_reason(tmp_path, content, message):
    path = tmp_path / "raw.json"
    path.write_bytes(content)
    with pytest.raises(data.DataError) as e:
        data.load_sharegpt(path)
    assert str(path) in str(e.value) and message in str(e.value)


def ernie(chosen, rejected, user="q"):
    return {"id": user, "src": [user], "tgt": [], "response": [[chosen], [rejected]], "sort": [1, 0]}


def test_ratio_filter_measures_strings_not_the_one_element_list():
    # The recipe's bug: len(response[1]) == 1 == len(response[0]) for every pair, so 1 >= 1.2 * 1 never held.
    r = ernie("short", "a much much longer answer")
    assert len(r["response"][1]) < 1.2 * len(r["response"][0])  # what the buggy filter computed: never passes
    assert data.passes_ratio(r, 1.2) and data.passes_ratio(r, 2.0)
    assert not data.passes_ratio(ernie("ten chars!", "eleven char"), 1.2)  # 11 < 12
    assert data.passes_ratio(ernie("ten chars!", "twelve chars"), 1.2)  # 12 >= 12, boundary included


def test_near_baseline_keeps_rejected_close_to_the_baseline_mean():
    pool = [ernie("c", "x" * 100, "a"), ernie("c", "x" * 160, "b"), ernie("c", "x" * 10, "c")]
    kept = data.select_pairs(pool, "near_baseline", 1.2, baseline_mean=120, tolerance=0.3)
    assert [r["id"] for r in kept] == ["a"]  # |100-120| < 36; |160-120| = 40 is not; 10 is far
    with pytest.raises(data.DataError, match="baseline mean"):
        data.select_pairs(pool, "near_baseline", 1.2, baseline_mean=None, tolerance=0.3)
    with pytest.raises(data.DataError, match="strategy"):
        data.select_pairs(pool, "longest", 1.2)


def test_training_pool_excludes_test_prompts_even_under_another_id():
    records = [ernie("a", "bb", "p1"), ernie("a", "bb", "p2"), ernie("c", "dd", "p3")]
    records[1]["id"] = "other-id"
    records[1]["src"] = ["p1"]  # same prompt as the test record, different id (a near-duplicate in the raw data)
    test = data.make_testset(records[:1], 1, 0, keep_system=False)
    test_ids = {t["id"] for t in test}
    pool = data.training_pool(records, test_ids, {data.prompt_key(records[0])})
    assert [r["id"] for r in pool] == ["p3"]


def test_testset_never_asks_the_same_prompt_twice():
    records = [ernie("a", "b" * k, f"q{k % 5}") for k in range(20)]
    for k, r in enumerate(records):
        r["id"] = f"r{k}"
    test = data.make_testset(records, 5, 3, False)
    assert sorted(t["messages"][-1]["content"] for t in test) == [f"q{k}" for k in range(5)]
    assert {t["id"] for t in test} == {f"r{k}" for k in range(5)}  # the first record of each prompt


def test_testset_messages_and_system_prompt_switch():
    r = {"id": "x", "system": "Answer at length.", "src": ["Hi, I'm Sponge.", "Who am I?"], "tgt": ["Hi Sponge!"],
         "response": [["a"], ["b"]], "sort": [1, 0]}
    dropped = data.make_testset([r], 1, 2025, keep_system=False)[0]["messages"]
    kept = data.make_testset([r], 1, 2025, keep_system=True)[0]["messages"]
    assert [m["role"] for m in dropped] == ["user", "assistant", "user"]
    assert kept[0] == {"role": "system", "content": "Answer at length."} and kept[1:] == dropped


def test_asking_for_more_than_exists_is_a_clear_error():
    with pytest.raises(data.DataError, match="testset.size is 2 but the prepared data has only 1 distinct prompts"):
        data.make_testset([ernie("a", "b", "q"), ernie("a", "c", "q")], 2, 0, False)  # one prompt, two records
    with pytest.raises(data.DataError, match="trainset.size is 3 but only 1 pairs pass"):
        data.sample_down([ernie("a", "b")], 3, 0)


def test_sampling_is_seeded_and_keeps_file_order():
    pairs = [ernie("a", "b" * k, str(k)) for k in range(50)]
    one, two = data.sample_down(pairs, 10, 7), data.sample_down(pairs, 10, 7)
    assert one == two and [p["id"] for p in one] == sorted((p["id"] for p in one), key=int)
    assert data.sample_down(pairs, 10, 8) != one
    assert data.sample_down(pairs, 0, 7) == pairs


def test_bundled_sample_has_what_the_demo_needs():
    raw = data.load_sharegpt("data/sample/sharegpt_dpo_sample.json")
    kept, _, counts = data.prepare_records(raw)
    assert counts["read"] >= 300
    ratios = [len(data.rejected_text(r)) / len(data.chosen_text(r)) for r in kept]
    assert 0.4 <= sum(x >= 1.2 for x in ratios) / len(ratios) <= 0.65
    assert 0.18 <= sum(x >= 2 for x in ratios) / len(ratios) <= 0.35
    assert any(r.get("system") for r in kept) and any(len(r["src"]) > 1 for r in kept)
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in r["src"][-1]) for r in kept)  # some Chinese


def test_sample_generator_is_deterministic(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample", "data/sample/make_sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "OUT", tmp_path / "s.json")
    mod.main()
    assert (tmp_path / "s.json").read_bytes() == open("data/sample/sharegpt_dpo_sample.json", "rb").read()


def test_data_stages_are_byte_identical_on_rerun(tmp_path, run_stage):
    """prepare / testset / trainset twice from the same params -> the same bytes."""
    outputs = ["data/prepared/dpo.jsonl", "data/prepared/rejects.json", "data/testset/testset.jsonl",
               "data/trainset/train.jsonl"]
    snapshots = []
    for _ in range(2):
        for stage in ("prepare", "testset", "trainset"):
            run_stage(stage)
        snapshots.append({p: (run_stage.root / p).read_bytes() for p in outputs})
    assert snapshots[0] == snapshots[1]
    test_ids = {t["id"] for t in read_jsonl(run_stage.root / outputs[2])}
    train = read_jsonl(run_stage.root / outputs[3])
    assert train and not test_ids & {r["id"] for r in train}
    metrics = json.loads((run_stage.root / "metrics/trainset.json").read_text())["trainset"]
    assert metrics["test_overlap"] == 0 and metrics["pairs"] == len(train)


def test_prepare_stage_reports_a_bad_file_by_name(run_stage):
    (run_stage.root / "bad.json").write_text('{"conversations": []}')
    run_stage.set_param("data.raw_path", "bad.json")
    result = run_stage("prepare", check=False)
    assert result.returncode != 0
    assert "prepare: bad.json: expected a JSON list of records, got a JSON dict" in result.stderr
    assert "Traceback" not in result.stderr


def test_test_and_validation_sizes_adapt_to_a_small_file_and_are_kept_on_a_large_one():
    assert data.fit_sizes(295, 60, 24) == (60, 24, None)  # the smol file: as asked
    assert data.fit_sizes(295, 150, 24) == (150, 24, None)  # raised for power: honoured
    test, validation, note = data.fit_sizes(30, 60, 24)  # a first file of 30 records
    assert (test, validation) == (6, 3) and "testset.size 60" in note and "-S testset.size=N" in note
    assert data.fit_sizes(3, 60, 24)[:2] == (1, 1)
    with pytest.raises(data.DataError, match="at least 3 are needed"):
        data.fit_sizes(2, 60, 24)
