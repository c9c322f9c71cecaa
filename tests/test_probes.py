"""Forgetting probes: checks scored on hand-written replies, probe-file validation, retention."""
import json

import pytest

from ernie_dpo.probes import (
    ProbeError,
    check_reply,
    expand,
    load_probes,
    retention,
    score,
)

SHIPPED = "data/probes/probes.jsonl"


@pytest.mark.parametrize("reply, check, expected", [
    ("Your name is Sponge.", {"contains_any": ["Sponge"]}, True),
    ("your name is sponge", {"contains_any": ["Sponge"]}, True),                      # case-insensitive by default
    ("Your name is Bob.", {"contains_any": ["Sponge"]}, False),
    ("hello", {"contains_any": ["HELLO"], "case_sensitive": True}, False),
    ("HELLO", {"contains_any": ["HELLO"], "case_sensitive": True}, True),
    ("7 plus 5 is 12.", {"regex": r"(?<!\d)12(?!\d)"}, True),
    ("7 plus 5 is 112.", {"regex": r"(?<!\d)12(?!\d)"}, False),                     # 12 inside 112 is not 12
    ("Blue.", {"contains_any": ["blue"], "max_words": 3}, True),
    ("The sky on a clear day is blue.", {"contains_any": ["blue"], "max_words": 3}, False),  # right, but not one word
    ("red\ngreen\n\nblue", {"min_lines": 3}, True),
    ("red, green and blue", {"min_lines": 3}, False),
    ("OK. The capital of Italy is Rome.", {"regex": r"^\W*OK\b", "contains_any": ["Rome"], "case_sensitive": True}, True),
    ("The capital of Italy is Rome. OK", {"regex": r"^\W*OK\b", "contains_any": ["Rome"], "case_sensitive": True}, False),
])
def test_checks_on_hand_written_replies(reply, check, expected):
    assert check_reply(reply, check) is expected


def test_shipped_probes_load_and_cover_every_kind():
    probes = load_probes(SHIPPED)
    kinds = {p["kind"] for p in probes}
    assert kinds == {"name_recall", "fact", "arithmetic", "format"}
    sponge = next(p for p in probes if p["id"] == "name_recall-1")  # the recipe's example: a name given earlier
    assert check_reply("Your name is Sponge.", sponge["check"]) and not check_reply("I don't know.", sponge["check"])
    assert [m["role"] for m in sponge["messages"]] == ["user", "assistant", "user"]


def test_score_counts_per_kind_and_retention():
    probes = [{"id": "a", "kind": "fact", "messages": [{"role": "user", "content": "q"}], "check": {"contains_any": ["x"]}},
              {"id": "b", "kind": "format", "messages": [{"role": "user", "content": "q"}], "check": {"max_words": 1}}]
    asks = expand(probes, 2)
    assert [a["id"] for a in asks] == ["a/0", "b/0", "a/1", "b/1"]
    replies = [{"id": "a/0", "reply": "x"}, {"id": "b/0", "reply": "one two"}, {"id": "a/1", "reply": "y"},
               {"id": "b/1", "reply": "one"}]
    metrics, rows = score(probes, replies)
    assert metrics == {"probes": 2, "replies": 4, "passed": 2, "pass_rate": 0.5, "pass_rate_fact": 0.5,
                       "pass_rate_format": 0.5}
    assert [r["passed"] for r in rows] == [True, False, False, True]
    assert retention(0.5, 0.25) == 0.5 and retention(0.0, 0.3) is None


@pytest.mark.parametrize("probe, message", [
    ({"kind": "fact", "messages": [{"role": "user", "content": "q"}], "check": {"regex": "x"}}, "missing 'id'"),
    ({"id": "p", "kind": "fact", "messages": [{"role": "assistant", "content": "a"}], "check": {"regex": "x"}},
     "last message must come from the user"),
    ({"id": "p", "kind": "fact", "messages": [{"role": "user", "content": "q"}], "check": {"regexp": "x"}},
     "unknown: ['regexp']"),
    ({"id": "p", "kind": "fact", "messages": [{"role": "user", "content": "q"}], "check": {"regex": "("}},
     "bad regex"),
])
def test_a_bad_probe_is_an_error_naming_it(tmp_path, probe, message):
    path = tmp_path / "probes.jsonl"
    path.write_text(json.dumps(probe) + "\n")
    with pytest.raises(ProbeError, match="probe 1") as e:
        load_probes(path)
    assert message in str(e.value)
