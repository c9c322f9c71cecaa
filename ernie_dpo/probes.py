"""Forgetting probes: a fixed set of prompts with checkable answers, scored on the baseline and the tuned model.

DPO for shorter answers should change the form of the answers, not what the model knows or whether it follows
instructions. data/probes/probes.jsonl (hand-written, git-tracked) holds one probe per line:

    {"id": "name_recall-1", "kind": "name_recall", "messages": [OpenAI chat messages, last one from the user],
     "check": {"contains_any": ["Sponge"]}}

Kinds: name_recall (a name given earlier in the conversation, the recipe's "Sponge" example), fact, arithmetic, format
(answer in one word, only a number, capitals, one item per line, ...). A check passes when ALL its conditions hold:
    contains_any: [..]   the reply contains at least one of these strings (case-insensitive unless case_sensitive)
    regex: ".."          re.search finds the pattern in the reply
    max_words: N         the reply has at most N whitespace-separated words
    min_lines: N         the reply has at least N non-empty lines
    case_sensitive: bool applies to contains_any (default false)
"""
import re
from collections import defaultdict

from .common import read_jsonl

CHECK_KEYS = {"contains_any", "regex", "max_words", "min_lines", "case_sensitive"}


class ProbeError(ValueError):
    pass


def load_probes(path):
    """Probes from a jsonl file, validated: a bad probe is an error naming the probe and what is wrong."""
    try:
        probes = read_jsonl(path)
    except ValueError as e:
        raise ProbeError(str(e)) from None
    seen = set()
    for n, p in enumerate(probes, 1):
        where = f"{path}: probe {n} ({p.get('id', 'no id')!r})"
        for key in ("id", "kind", "messages", "check"):
            if key not in p:
                raise ProbeError(f"{where}: missing {key!r}")
        if p["id"] in seen:
            raise ProbeError(f"{where}: duplicate id")
        seen.add(p["id"])
        if not p["messages"] or p["messages"][-1].get("role") != "user":
            raise ProbeError(f"{where}: the last message must come from the user")
        unknown = set(p["check"]) - CHECK_KEYS
        if unknown or not set(p["check"]) - {"case_sensitive"}:
            raise ProbeError(f"{where}: check needs some of {sorted(CHECK_KEYS - {'case_sensitive'})}, "
                             f"unknown: {sorted(unknown)}")
        if "regex" in p["check"]:
            try:
                re.compile(p["check"]["regex"])
            except re.error as e:
                raise ProbeError(f"{where}: bad regex: {e}") from None
    return probes


def check_reply(reply, check):
    """True when the reply passes every condition of the check."""
    if "contains_any" in check:
        if check.get("case_sensitive"):
            hit = any(s in reply for s in check["contains_any"])
        else:
            hit = any(s.lower() in reply.lower() for s in check["contains_any"])
        if not hit:
            return False
    if "regex" in check and not re.search(check["regex"], reply):
        return False
    if "max_words" in check and len(reply.split()) > check["max_words"]:
        return False
    if "min_lines" in check and sum(bool(line.strip()) for line in reply.splitlines()) < check["min_lines"]:
        return False
    return True


def expand(probes, samples):
    """Each probe asked `samples` times (ids "<probe id>/<k>"): one sampled reply per probe is too noisy to score."""
    return [{"id": f"{p['id']}/{k}", "messages": p["messages"]} for k in range(samples) for p in probes]


def score(probes, replies):
    """Pass rates over all replies and per kind; `replies` are generate records with ids from expand()."""
    by_id = {p["id"]: p for p in probes}
    passed, total = defaultdict(int), defaultdict(int)
    rows = []
    for r in replies:
        probe = by_id[r["id"].rsplit("/", 1)[0]]
        ok = check_reply(r["reply"], probe["check"])
        for group in ("all", probe["kind"]):
            total[group] += 1
            passed[group] += ok
        rows.append({"id": r["id"], "kind": probe["kind"], "passed": ok, "reply": r["reply"]})
    metrics = {"probes": len(probes), "replies": total["all"], "passed": passed["all"],
               "pass_rate": round(passed["all"] / total["all"], 4) if total["all"] else 0.0}
    for kind in sorted(k for k in total if k != "all"):
        metrics[f"pass_rate_{kind}"] = round(passed[kind] / total[kind], 4)
    return metrics, rows


def retention(baseline_rate, tuned_rate):
    """tuned pass rate / baseline pass rate: 1.0 = nothing forgotten; None when the baseline passes nothing."""
    return round(tuned_rate / baseline_rate, 4) if baseline_rate else None
