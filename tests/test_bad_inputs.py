"""The bad-input corpus (tests/bad_inputs/) through the real `prepare` stage: a clear error naming the file and the
reason, or a counted drop with its reason in the rejects file. Never a bare traceback, never a silent loss."""
import json
import shutil
from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "bad_inputs"


def prepare(run_stage, name, content=None):
    target = run_stage.root / "raw" / name
    target.parent.mkdir(exist_ok=True)
    if content is None:
        shutil.copy(CORPUS / name, target)
    else:
        target.write_bytes(content)
    run_stage.set_param("data.raw_path", f"raw/{name}")
    run_stage.set_param("prepare.min_records", 1)  # these files are tiny on purpose: the drops are what is tested
    return run_stage("prepare", check=False)


@pytest.mark.parametrize("name, message", [
    ("not_json.json", "raw/not_json.json: not valid JSON (line 1, column 1: Expecting value)"),
    ("truncated.json", "raw/truncated.json: not valid JSON (line 17, column 4: Expecting value)"),
    ("top_level_object.json", "raw/top_level_object.json: expected a JSON list of records, got a JSON dict"),
    ("non_object_record.json", "raw/non_object_record.json: record 1 is a JSON str, expected an object"),
])
def test_unusable_files_stop_with_a_message(run_stage, name, message):
    r = prepare(run_stage, name)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (run_stage.root / "data/prepared/dpo.jsonl").exists()  # nothing half-written


def read(run_stage):
    root = run_stage.root
    kept = [json.loads(x) for x in (root / "data/prepared/dpo.jsonl").read_text().splitlines()]
    rejects = json.loads((root / "data/prepared/rejects.json").read_text())["records"]
    metrics = json.loads((root / "metrics/prepare.json").read_text())["prepare"]
    assert metrics["records_read"] == metrics["records_kept"] + metrics["records_dropped"]  # the counts add up
    assert len(kept) == metrics["records_kept"] and len(rejects) == metrics["records_dropped"]
    return kept, rejects, metrics


def test_bad_records_are_dropped_one_reason_each(run_stage):
    r = prepare(run_stage, "bad_records.json")
    assert r.returncode == 0, r.stderr
    kept, rejects, metrics = read(run_stage)
    assert metrics["records_read"] == 12 and metrics["records_kept"] == 2
    assert metrics["dropped_by_reason"] == {"duplicate": 1, "empty_chosen": 1, "empty_rejected": 1,
                                           "last_turn_not_user": 1, "missing_field": 3, "unknown_role": 1,
                                           "wrong_type": 2}
    by_index = {x["index"]: x for x in rejects}
    assert by_index[1]["detail"] == "no 'conversations'" and by_index[2]["detail"] == "no 'chosen'"
    assert by_index[11]["reason"] == "duplicate" and "id" in by_index[11]["detail"]
    assert by_index[8]["record"]["chosen"]["value"] == 42  # the original record is kept for inspection
    assert "dropped 10" in r.stderr  # the stage says what it dropped


def test_invalid_utf8_drops_only_the_record_that_has_it(run_stage):
    r = prepare(run_stage, "invalid_utf8.json")
    assert r.returncode == 0, r.stderr
    kept, rejects, metrics = read(run_stage)
    assert metrics["dropped_by_reason"] == {"invalid_utf8": 1} and metrics["records_kept"] == 1
    assert rejects[0]["index"] == 1 and "\\xff\\xfe" in rejects[0]["record"]["chosen"]["value"]


def test_a_10_mb_answer_is_a_counted_drop(run_stage):
    good = {"conversations": [{"from": "human", "value": "q"}], "chosen": "short", "rejected": "a longer answer"}
    huge = {**good, "rejected": "word " * 2_000_000}  # 10 MB
    r = prepare(run_stage, "huge.json", json.dumps([good, huge]).encode())
    assert r.returncode == 0, r.stderr
    kept, rejects, metrics = read(run_stage)
    assert metrics["dropped_by_reason"] == {"too_long": 1}
    assert "10,000,000 characters exceeds prepare.max_chars=200,000" in rejects[0]["detail"]
