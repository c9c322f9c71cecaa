"""Your own data: JSON or JSONL files in the sharegpt, trl, alpaca, openai and erniekit layouts all become the same
ERNIE DPO records, with the same per-record reasons for what is dropped."""
import hashlib
import json

import pytest

from ernie_dpo import data
from ernie_dpo.common import read_jsonl, write_jsonl
from ernie_dpo.formats import detect_format, load_records

SYSTEM, Q1, A1, Q2 = "Be brief.", "Hi, I am Sponge.", "Hello Sponge!", "Who am I?"
GOOD, BAD = "You are Sponge.", "You are a person who told me a moment ago that your name is Sponge."
ZH_Q, ZH_GOOD, ZH_BAD = "中国的首都是哪里？", "北京。", "中国的首都是北京，它也是中国的政治和文化中心。"

# what every format's two example records must become: a multi-turn one with a system prompt, a Chinese one
EXPECTED = [
    {"system": SYSTEM, "src": [Q1, Q2], "tgt": [A1], "response": [[GOOD], [BAD]], "sort": [1, 0]},
    {"src": [ZH_Q], "tgt": [], "response": [[ZH_GOOD], [ZH_BAD]], "sort": [1, 0]},
]


def msg(role, content):
    return {"role": role, "content": content}


PROMPT = [msg("system", SYSTEM), msg("user", Q1), msg("assistant", A1), msg("user", Q2)]

EXAMPLES = {
    "sharegpt": [
        {"system": SYSTEM, "conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
                                             {"from": "human", "value": Q2}],
         "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}},
        {"conversations": [{"from": "human", "value": ZH_Q}], "chosen": ZH_GOOD, "rejected": ZH_BAD},
    ],
    "trl": [  # conversational, then standard (plain strings)
        {"prompt": PROMPT, "chosen": [msg("assistant", GOOD)], "rejected": [msg("assistant", BAD)]},
        {"prompt": ZH_Q, "chosen": ZH_GOOD, "rejected": ZH_BAD},
    ],
    "trl_implicit": [  # no prompt: both answers are whole conversations sharing it
        {"chosen": PROMPT + [msg("assistant", GOOD)], "rejected": PROMPT + [msg("assistant", BAD)]},
        {"chosen": [msg("user", ZH_Q), msg("assistant", ZH_GOOD)],
         "rejected": [msg("user", ZH_Q), msg("assistant", ZH_BAD)]},
    ],
    "alpaca": [
        {"system": SYSTEM, "history": [[Q1, A1]], "instruction": Q2, "input": "", "chosen": GOOD, "rejected": BAD},
        {"instruction": "中国的首都是哪里？", "chosen": ZH_GOOD, "rejected": ZH_BAD},
    ],
    "openai": [
        {"messages": PROMPT, "chosen": msg("assistant", GOOD), "rejected": BAD},
        {"messages": [msg("user", ZH_Q)], "chosen": ZH_GOOD, "rejected": msg("assistant", ZH_BAD)},
    ],
    "erniekit": [  # sort [0, 1]: the second response is the chosen one
        {"system": SYSTEM, "src": [Q1, Q2], "tgt": [A1], "response": [[BAD], [GOOD]], "sort": [0, 1]},
        {"src": ZH_Q, "tgt": [], "response": [ZH_GOOD, ZH_BAD], "sort": [2, 1]},
    ],
}


def write(tmp_path, records, jsonl, name=None):
    """The records as a JSON list or as JSONL (with a blank line in the middle and a trailing newline)."""
    path = tmp_path / (name or ("raw.jsonl" if jsonl else "raw.json"))
    if jsonl:
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
        path.write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def without_ids(kept):
    return [{k: v for k, v in r.items() if k != "id"} for r in kept]


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_every_format_gives_the_same_ernie_records(tmp_path, example, jsonl):
    fmt = example.removesuffix("_implicit")
    raw = load_records(write(tmp_path, EXAMPLES[example], jsonl))
    assert raw == EXAMPLES[example]  # UTF-8 read back as written, Chinese included
    assert detect_format(raw) == fmt
    kept, rejects, counts = data.prepare_records(raw)
    assert rejects == [] and counts == {"read": 2, "kept": 2, "dropped": {}, "format": fmt}
    assert without_ids(kept) == EXPECTED
    assert [r["id"] for r in kept] == [data.record_id(e) for e in EXPECTED]  # same content, same id, any format


def test_jsonl_is_read_whatever_the_file_is_called(tmp_path):
    # the issue: a JSONL file named .json stopped with "not valid JSON (line 2, column 1: Extra data)"
    path = write(tmp_path, EXAMPLES["trl"], jsonl=True, name="pairs.json")
    assert load_records(path) == EXAMPLES["trl"]
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(EXAMPLES["trl"][1]) + "\n")
    assert load_records(one) == [EXAMPLES["trl"][1]]  # a one-line JSONL file is one record, not "a JSON dict"
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(EXAMPLES["alpaca"]).encode())
    assert load_records(bom) == EXAMPLES["alpaca"]  # a UTF-8 BOM (Windows editors) is no data


def test_bad_jsonl_lines_are_counted_drops_naming_the_line(tmp_path):
    path = tmp_path / "raw.jsonl"
    good = [json.dumps(r, ensure_ascii=False) for r in EXAMPLES["openai"]]
    path.write_text("\n".join([good[0], "", '{"messages": [', "[1, 2]", good[1], ""]), encoding="utf-8")
    raw = load_records(path)
    kept, rejects, counts = data.prepare_records(raw)
    assert counts == {"read": 4, "kept": 2, "dropped": {"invalid_json": 1, "wrong_type": 1}, "format": "openai"}
    assert without_ids(kept) == EXPECTED
    assert rejects[0]["index"] == 1 and rejects[0]["detail"].startswith("line 3: not valid JSON (column 15")
    assert rejects[0]["record"] == '{"messages": ['  # the line itself goes to rejects.json
    assert rejects[1]["detail"] == "line 4 is a JSON list, expected an object" and rejects[1]["record"] == [1, 2]
    # a broken first line: in a .jsonl file a counted drop too; in a .json file it cannot tell JSONL from broken JSON
    path.write_text("\n".join(['{"messages": [', good[0]]), encoding="utf-8")
    assert data.prepare_records(load_records(path))[2]["dropped"] == {"invalid_json": 1}
    with pytest.raises(data.DataError, match=r"raw.json: not valid JSON \(line 2"):
        load_records(path.rename(tmp_path / "raw.json"))


def test_invalid_utf8_in_a_jsonl_line_drops_only_that_record(tmp_path):
    path = tmp_path / "raw.jsonl"
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in EXAMPLES["trl"]]
    lines.append(b'{"prompt": "q", "chosen": "ok \xff\xfe", "rejected": "a longer answer"}')
    path.write_bytes(b"\n".join(lines))
    kept, rejects, counts = data.prepare_records(load_records(path))
    assert counts["dropped"] == {"invalid_utf8": 1} and without_ids(kept) == EXPECTED
    assert rejects[0]["index"] == 2 and "\\xff\\xfe" in rejects[0]["record"]["chosen"]


@pytest.mark.parametrize("content, message", [
    (b'[{"prompt": "q", "chosen": "a", "rejected": "b"},\n', "not valid JSON (line 2, column 1"),  # truncated list
    (b'{"prompt": "q",\n "chosen": "a"}\n{"prompt": "r"', "not valid JSON (line 3, column 1: Extra data)"),
    (b'{"pairs": [{"prompt": "q"}]}', "expected a JSON list of records, got a JSON dict"),
    (b'[{"prompt": "q"}, "x"]', "record 1 is a JSON str, expected an object"),
])
def test_unusable_files_still_stop_with_the_file_and_the_reason(tmp_path, content, message):
    path = tmp_path / "raw.json"
    path.write_bytes(content)
    with pytest.raises(data.DataError) as e:
        load_records(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_an_undetectable_format_names_the_keys_and_the_formats():
    with pytest.raises(data.DataError) as e:
        data.prepare_records([{"question": "q", "answer": "a", "score": 1}])
    msg_ = str(e.value)
    assert "['answer', 'question', 'score']" in msg_
    assert all(f in msg_ for f in ("sharegpt", "trl", "alpaca", "openai", "erniekit")) and "data.format" in msg_
    with pytest.raises(data.DataError, match="data.format must be 'auto' or one of sharegpt, trl"):
        data.prepare_records(EXAMPLES["trl"], fmt="dpo")


@pytest.mark.parametrize("record, fmt", [
    ({"conversations": [], "prompt": "q", "chosen": "a", "rejected": "b"}, "sharegpt"),
    ({"src": "q", "messages": [], "response": [], "sort": []}, "erniekit"),
    ({"instruction": "q", "chosen": "a", "rejected": "b"}, "alpaca"),
    # TRL before openai: UltraFeedback binarized has a "messages" column next to prompt / chosen / rejected
    ({"prompt": "q", "messages": [], "chosen": [], "rejected": []}, "trl"),
    ({"messages": [], "chosen": "a", "rejected": "b"}, "openai"),
    ({"chosen": [], "rejected": []}, "trl"),
])
def test_detection_by_keys(record, fmt):
    assert detect_format(["not an object", record, {"conversations": []}]) == fmt  # the first object decides


def test_a_forced_format_is_used_for_every_record():
    raw = EXAMPLES["openai"] + EXAMPLES["trl"]
    assert data.prepare_records(raw)[2]["format"] == "openai"  # detected from the first record
    kept, rejects, counts = data.prepare_records(raw, fmt="trl")
    assert counts["format"] == "trl" and without_ids(kept) == EXPECTED
    assert counts["dropped"] == {"wrong_type": 2}  # the openai records do not fit TRL: no prompt, no conversations
    assert all(r["detail"].startswith("without 'prompt'") for r in rejects)


def test_ultrafeedback_layout_takes_the_prompt_from_the_answers():
    # HuggingFaceH4/ultrafeedback_binarized: a string prompt, answers that hold the whole conversation (as TRL reads it)
    rec = {"prompt": ZH_Q, "chosen": EXAMPLES["trl_implicit"][1]["chosen"],
           "rejected": EXAMPLES["trl_implicit"][1]["rejected"], "messages": EXAMPLES["trl_implicit"][1]["chosen"],
           "score_chosen": 8.0, "score_rejected": 3.0}
    kept, _, counts = data.prepare_records([rec])
    assert counts["format"] == "trl" and without_ids(kept) == EXPECTED[1:]


def test_erniekit_is_system_as_paddleformers_reads_it():
    # is_system 1: the first src turn is the system prompt and the first tgt turn goes with it
    rec = {"src": [SYSTEM, Q1, Q2], "tgt": ["(ignored)", A1], "is_system": 1, "response": [[GOOD], [BAD]],
           "sort": [1, 0]}
    assert without_ids(data.prepare_records([rec])[0]) == EXPECTED[:1]


@pytest.mark.parametrize("fmt, bad, reason, detail", [
    ("sharegpt", {"prompt": "q", "chosen": "a", "rejected": "b"}, "missing_field", "no 'conversations'"),
    ("sharegpt", {**EXAMPLES["sharegpt"][1], "chosen": ZH_BAD}, "identical_pair", "same text"),
    ("trl", {"prompt": 7, "chosen": "a", "rejected": "b"}, "wrong_type", "'prompt' must be a string"),
    ("trl", {"prompt": "q", "chosen": "a", "rejected": " "}, "empty_rejected", "empty"),
    ("trl", {"prompt": [msg("user", "q")], "chosen": [msg("assistant", "a"), msg("user", "more?")],
             "rejected": [msg("assistant", "b")]}, "multi_turn_answer", "'chosen' has 2 messages"),
    ("trl", {"chosen": [msg("user", "q"), msg("assistant", "a")],
             "rejected": [msg("user", "Q"), msg("assistant", "b")]}, "prompt_mismatch", "at message 0"),
    ("trl", {"chosen": [msg("user", "q"), msg("user", "never mind")],
             "rejected": [msg("user", "q"), msg("assistant", "b")]}, "answer_not_assistant",
     "chosen is a message with role 'user'"),
    ("sharegpt", {**EXAMPLES["sharegpt"][1], "rejected": {"from": "human", "value": "b"}}, "answer_not_assistant",
     "rejected is a message with role 'human'"),
    ("trl", {"chosen": "a full text", "rejected": "another full text"}, "wrong_type",
     "must be non-empty message lists"),
    ("alpaca", {"instruction": ["q"], "chosen": "a", "rejected": "b"}, "wrong_type", "'instruction' must be a string"),
    ("alpaca", {"instruction": "", "input": "", "chosen": "a", "rejected": "b"}, "empty_turn", "instruction is empty"),
    ("alpaca", {"instruction": "q", "history": [["only the user"]], "chosen": "a", "rejected": "b"}, "wrong_type",
     "history[0] must be a [user, assistant] pair"),
    ("alpaca", {"instruction": "q", "chosen": "a"}, "missing_field", "no 'rejected'"),
    ("openai", {"messages": [msg("user", "q"), msg("assistant", "a")], "chosen": "b", "rejected": "c"},
     "last_turn_not_user", "ends with an assistant turn"),
    ("openai", {"messages": [msg("user", "q"), msg("tool", "{}")], "chosen": "b", "rejected": "c"}, "unknown_role",
     "messages[1] has role 'tool'"),
    ("openai", {"messages": [msg("user", "q"), msg("system", "late")], "chosen": "b", "rejected": "c"},
     "misplaced_system", "messages[1]"),
    ("openai", {"messages": [msg("user", "q"), msg("user", "q2")], "chosen": "b", "rejected": "c"},
     "bad_turn_order", "messages[1]: two user turns in a row"),
    ("erniekit", {"src": "q", "tgt": [], "response": [["a"], ["b"]], "sort": [1, 1]}, "equal_sort", "[1, 1]"),
    ("erniekit", {"src": "q", "tgt": "a", "response": [["a"], ["b"]], "sort": [1, 0]}, "bad_turn_order",
     "'src' has 1 turns and 'tgt' 1"),
    ("erniekit", {"src": "q", "response": [["a", "more?", "b"], ["c"]], "sort": [1, 0]}, "multi_turn_answer",
     "'response[0]' has 3 messages"),
    ("erniekit", {"src": "q", "tgt": [], "response": [["a"], ["b"]]}, "missing_field", "no 'sort'"),
    ("erniekit", {"src": ["q", 5], "tgt": ["a"], "response": [["a"], ["b"]], "sort": [1, 0]}, "wrong_type",
     "src[1] must be a string"),
])
def test_bad_records_in_each_format_are_counted_with_their_reason(fmt, bad, reason, detail):
    good = EXAMPLES[fmt][1]
    kept, rejects, counts = data.prepare_records([good, bad])
    assert counts["format"] == fmt and counts["read"] == 2 and counts["kept"] == 1
    assert counts["dropped"] == {reason: 1}
    assert rejects[0]["index"] == 1 and rejects[0]["record"] == bad and detail in rejects[0]["detail"]


@pytest.mark.parametrize("fmt", ["trl", "alpaca", "openai", "erniekit"])
def test_too_long_and_duplicates_in_every_format(fmt):
    records = EXAMPLES[fmt] + [EXAMPLES[fmt][1]]
    kept, rejects, counts = data.prepare_records(records, max_chars=len(BAD) - 1)
    assert counts["dropped"] == {"duplicate": 1, "too_long": 1} and without_ids(kept) == EXPECTED[1:]


def test_the_prepared_jsonl_round_trips(tmp_path):
    """prepare's own output (data/prepared/dpo.jsonl, "id" first) read back as input: the same records, same ids."""
    kept, _, _ = data.prepare_records(data.load_sharegpt("data/sample/sharegpt_dpo_sample.json"))
    path = tmp_path / "data/prepared/dpo.jsonl"
    write_jsonl(path, kept)
    assert read_jsonl(path) == kept
    raw = load_records(path)
    assert detect_format(raw) == "erniekit"
    again, rejects, counts = data.prepare_records(raw)
    assert again == kept and rejects == [] and counts["format"] == "erniekit"


def test_sharegpt_ids_are_unchanged_by_the_format_support():
    # the bundled sample's ids as the ShareGPT-only reader made them: existing prepared data and results stay valid
    kept, _, counts = data.prepare_records(data.load_sharegpt("data/sample/sharegpt_dpo_sample.json"))
    assert counts["format"] == "sharegpt" and len(kept) == 474
    digest = hashlib.sha1(" ".join(r["id"] for r in kept).encode()).hexdigest()
    assert digest == "35a52dfe1c352b9e7272602826d8c526da90d1f2"


def test_the_documented_examples_convert_to_the_documented_record():
    """docs/data_formats.md: the example of each format is detected as that format and gives the ERNIE record shown
    at the top of the page, id included."""
    doc = open("docs/data_formats.md", encoding="utf-8").read()

    def first_json(text):
        return json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])

    ernie = first_json(doc)
    sections = {part.split("\n", 1)[0].strip(): part for part in doc.split("\n### ")[1:]}
    assert sorted(sections) == sorted(data.CONVERTERS)
    for fmt, text in sections.items():
        example = first_json(text)
        assert detect_format([example]) == fmt
        kept, rejects, _ = data.prepare_records([example])
        assert kept == [ernie], (fmt, rejects)
