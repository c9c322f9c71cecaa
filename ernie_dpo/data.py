"""The data half of the recipe: preference data -> ERNIE DPO jsonl -> test set and training set.

Everything here is pure Python on plain dicts so tests can call it directly.

Input: a JSON or JSONL file in one of five layouts (formats.py reads them: sharegpt, trl, alpaca, openai, erniekit).
ShareGPT DPO record (LLaMA-Factory's DPO-En-Zh-20k layout, the bundled sample's):
    {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...],
     "chosen": {"from": "gpt", "value": str}, "rejected": {"from": "gpt", "value": str},
     "system": str (optional)}
ERNIE DPO record (what ERNIEKit / PaddleFormers read as the `erniekit` data type):
    {"id": str, "system": str (only if there is one), "src": [user turns], "tgt": [assistant turns before the last
     user turn], "response": [[chosen], [rejected]], "sort": [1, 0]}
"""
import hashlib
import json
import random

# Reading files and the five input layouts live in formats.py. The errors are defined there (so formats.py needs
# nothing from this module) and re-exported here, so `from ernie_dpo.data import DataError` keeps working.
from ernie_dpo.formats import (
    CONVERTERS,
    DataError,
    Invalid,
    Unreadable,
    detect_format,
    load_records,
)

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "bot"}
SYSTEM_ROLES = {"system"}

# ---------------------------------------------------------------- reading and converting

load_sharegpt = load_records  # the old name: every format is read by the same function now


def _text(value, what):
    """A message's text: a plain string, or a {"from"/"role", "value"/"content"} object."""
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if not isinstance(value, str):
        raise Invalid("wrong_type", f"{what} must be a string or a message object, got {type(value).__name__}")
    return value


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _printable(obj):
    """The record with undecodable bytes shown as \\xNN, so it can be written to the rejects file."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(obj, dict):
        return {k: _printable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_printable(v) for v in obj]
    return obj


def convert_record(rec, max_chars=None, fmt="sharegpt"):
    """One raw record in layout `fmt` -> ERNIE DPO record (without id). Raises Invalid with a reason key.

    max_chars: a text longer than this (e.g. a 10 MB answer) is dropped as "too_long" rather than fed to training.
    """
    if isinstance(rec, Unreadable):  # a JSONL line that was no JSON object: dropped with the reason found on reading
        raise Invalid(rec.reason, rec.detail)
    if not isinstance(rec, dict):
        raise Invalid("wrong_type", f"the record is a JSON {type(rec).__name__}, expected an object")
    for text in _strings(rec):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise Invalid("invalid_utf8", f"bytes that are not UTF-8 in a text (position {e.start})") from None
        if max_chars and len(text) > max_chars:
            raise Invalid("too_long", f"a text of {len(text):,} characters exceeds prepare.max_chars={max_chars:,}")
    return to_ernie(CONVERTERS[fmt](rec))


def to_ernie(dialogue):
    """A dialogue (formats.py: system, turns, chosen, rejected) -> ERNIE DPO record: the checks every format shares."""
    system = dialogue["system"]
    if not isinstance(system, str):
        raise Invalid("wrong_type", "'system' must be a string")
    src, tgt = [], []
    for j, (where, turn) in enumerate(dialogue["turns"]):
        if not isinstance(turn, dict):
            raise Invalid("wrong_type", f"{where} is a {type(turn).__name__}, expected an object")
        role = turn.get("from", turn.get("role"))
        text = _text(turn, where)
        if role in SYSTEM_ROLES:
            if j != 0:
                raise Invalid("misplaced_system", f"system turn at {where}; only the first turn may be system")
            system = text
            continue
        if not text.strip():
            raise Invalid("empty_turn", f"{where} is empty")
        if role in USER_ROLES:
            if len(src) != len(tgt):
                raise Invalid("bad_turn_order", f"{where}: two user turns in a row")
            src.append(text)
        elif role in ASSISTANT_ROLES:
            if len(src) != len(tgt) + 1:
                raise Invalid("bad_turn_order", f"{where}: assistant turn without a user turn before it")
            tgt.append(text)
        else:
            raise Invalid("unknown_role", f"{where} has role {role!r}")
    if not src:
        raise Invalid("no_user_turn", "the conversation has no user turn")
    if len(src) != len(tgt) + 1:
        raise Invalid("last_turn_not_user", "the conversation ends with an assistant turn, so there is nothing to answer")

    for what in ("chosen", "rejected"):
        role = dialogue[what].get("from", dialogue[what].get("role")) if isinstance(dialogue[what], dict) else None
        if role is not None and role not in ASSISTANT_ROLES:  # e.g. a TRL conversation whose last turn is the user's
            raise Invalid("answer_not_assistant", f"{what} is a message with role {role!r}, not an assistant answer")
    chosen = _text(dialogue["chosen"], "chosen")
    rejected = _text(dialogue["rejected"], "rejected")
    if not chosen.strip():
        raise Invalid("empty_chosen", "chosen answer is empty or whitespace")
    if not rejected.strip():
        raise Invalid("empty_rejected", "rejected answer is empty or whitespace")
    if chosen == rejected:
        raise Invalid("identical_pair", "chosen and rejected are the same text")

    out = {}
    if system.strip():
        out["system"] = system
    out.update({"src": src, "tgt": tgt, "response": [[chosen], [rejected]], "sort": [1, 0]})
    return out


def record_id(ernie_rec):
    """A stable id: a hash of the record's content, so it survives reordering or appending to the raw file."""
    blob = json.dumps(ernie_rec, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha1(blob).hexdigest()[:12]


def prepare_records(raw_records, max_chars=None, fmt="auto"):
    """Convert every record. Returns (kept, rejects, counts): nothing is dropped without a reason.

    fmt: "auto" (detect_format on the first record that is an object) or a name in formats.CONVERTERS; every record
    is converted with that one format, so a record that does not fit it is dropped as "missing_field"/"wrong_type".
    kept: ERNIE DPO records with "id" first. rejects: {"index", "reason", "detail", "record"}.
    counts: {"read", "kept", "dropped": {reason: n}, "format"} with read == kept + sum(dropped); "format" is None
    when no record is an object (nothing to detect it from: every record is a counted drop anyway).
    """
    if fmt == "auto":
        fmt = detect_format(raw_records) if any(isinstance(r, dict) for r in raw_records) else None
    elif fmt not in CONVERTERS:
        raise DataError(f"data.format must be 'auto' or one of {', '.join(CONVERTERS)}; got {fmt!r}")
    kept, rejects, seen = [], [], set()
    for i, rec in enumerate(raw_records):
        try:
            out = convert_record(rec, max_chars, fmt)
            rid = record_id(out)
            if rid in seen:
                raise Invalid("duplicate", f"same content as an earlier record (id {rid})")
        except Invalid as e:
            original = rec.record if isinstance(rec, Unreadable) else rec
            rejects.append({"index": i, "reason": e.reason, "detail": e.detail, "record": _printable(original)})
            continue
        seen.add(rid)
        kept.append({"id": rid, **out})
    dropped = {}
    for r in rejects:
        dropped[r["reason"]] = dropped.get(r["reason"], 0) + 1
    counts = {"read": len(raw_records), "kept": len(kept), "dropped": dict(sorted(dropped.items())), "format": fmt}
    assert counts["read"] == counts["kept"] + sum(dropped.values())
    return kept, rejects, counts


# ---------------------------------------------------------------- lengths


def chosen_text(rec):
    return rec["response"][0][0]


def rejected_text(rec):
    return rec["response"][1][0]


def passes_ratio(rec, min_ratio):
    """len(rejected) >= min_ratio * len(chosen), on STRING lengths.

    The original recipe took len() of the one-element list rec["response"][1], which is always 1, so its
    filter never did what it said. Here the texts themselves are measured.
    """
    return len(rejected_text(rec)) >= min_ratio * len(chosen_text(rec))


def near_length(rec, reference_mean, tolerance):
    """|len(rejected) - reference| < tolerance * reference: a rejected answer about as long as the baseline's."""
    return abs(len(rejected_text(rec)) - reference_mean) < tolerance * reference_mean


# ---------------------------------------------------------------- test set


def prompt_key(rec):
    """What makes two records 'the same prompt': the conversation up to the last user turn (system excluded).

    Used to keep test prompts out of training even when the raw data holds the same prompt under another record.
    """
    blob = json.dumps([rec["src"], rec["tgt"]], ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def to_messages(rec, keep_system):
    """ERNIE DPO record -> OpenAI chat messages ending with the user turn to answer."""
    msgs = []
    if keep_system and rec.get("system"):
        msgs.append({"role": "system", "content": rec["system"]})
    for k, user in enumerate(rec["src"]):
        msgs.append({"role": "user", "content": user})
        if k < len(rec["tgt"]):
            msgs.append({"role": "assistant", "content": rec["tgt"][k]})
    return msgs


def distinct_prompts(records):
    return len({prompt_key(r) for r in records})


def fit_sizes(distinct, size, validation_size):
    """(test size, validation size, note): testset.size and testset.validation_size as asked when together they
    leave at least a quarter of the file's distinct prompts for training; for a smaller file, a fifth of the prompts
    for the test set and a tenth for validation (at least one each), with a note naming the sizes and the override.
    (Raising testset.size on a large file is honoured: more prompts, narrower intervals.)

    A first file is often small (30 records): it should run to the end and show its numbers -- whose intervals and
    detectable differences then say how little a test set that small can decide -- rather than stop at the test set.
    The smallest file that runs has 3 distinct prompts (one test, one validation, one to train on).
    """
    if 4 * (size + validation_size) <= 3 * distinct:
        return size, validation_size, None
    if distinct < 3:
        raise DataError(f"the prepared data has {distinct} distinct prompt(s); at least 3 are needed (one test, one "
                        "validation, one to train on)")
    test = max(1, min(size, distinct // 5))
    validation = min(validation_size, max(1, distinct // 10))
    note = (f"the data has {distinct} distinct prompts, too few for testset.size {size} + testset.validation_size "
            f"{validation_size} with a quarter left for training: using {test} test and {validation} validation prompts "
            f"(choose others with -S testset.size=N -S testset.validation_size=M)")
    return test, validation, note


def make_testset(records, size, seed, keep_system):
    """`size` distinct prompts sampled with `seed`, as {"id", "messages"}, in sample order (reproducible).

    Records that repeat an earlier record's prompt (same conversation, other answers) are skipped, so the test set
    never asks the same question twice.
    """
    # the first record of each prompt (built from the end so earlier records win; the resulting order, by each
    # prompt's last occurrence, is arbitrary but fixed, and the seeded sample below depends on it)
    distinct = list({prompt_key(r): r for r in reversed(records)}.values())[::-1]
    if size > len(distinct):
        raise DataError(f"testset.size is {size} but the prepared data has only {len(distinct)} distinct prompts "
                        f"({len(records)} records)")
    if size <= 0:
        raise DataError(f"testset.size must be positive, got {size}")
    picked = random.Random(seed).sample(distinct, size)
    return [{"id": r["id"], "messages": to_messages(r, keep_system)} for r in picked]


def make_validation(records, tests, size, seed, keep_system):
    """`size` distinct prompts that are NOT test prompts, drawn with `seed`: the validation split.

    The test set is for the final number only; anything that chooses a setting (the length probes while training,
    the held-out likelihood) looks at these prompts instead. Each row is the prepared record (its chosen answer is
    what the held-out likelihood scores) plus the prompt as `messages`, encoded as inference encodes a test prompt.
    Training never sees them (trainset and base_model keep them out, as they keep the test prompts out).
    """
    if size == 0:
        return []
    test_keys = {prompt_key(r) for r in records if r["id"] in {t["id"] for t in tests}}
    distinct = list({prompt_key(r): r for r in reversed(records) if prompt_key(r) not in test_keys}.values())[::-1]
    if size > len(distinct):
        raise DataError(f"testset.validation_size is {size} but only {len(distinct)} distinct prompts are left "
                        f"outside the {len(tests)} test prompts; lower it (e.g. -S testset.validation_size="
                        f"{max(0, len(distinct) // 4)})")
    picked = random.Random(seed).sample(distinct, size)
    return [{**r, "messages": to_messages(r, keep_system)} for r in picked]


# ---------------------------------------------------------------- training set


def training_pool(records, test_ids, test_prompt_keys):
    """Records whose id AND prompt are not in the test set."""
    return [r for r in records if r["id"] not in test_ids and prompt_key(r) not in test_prompt_keys]


def pool_outside(records, tests):
    """(pool, test ids, test prompt keys): the records that share neither id nor prompt with `tests` (the test set
    and the validation split: pass both)."""
    by_id = {r["id"]: r for r in records}
    test_ids = {t["id"] for t in tests}
    missing = test_ids - by_id.keys()
    if missing:
        raise DataError(f"{len(missing)} test prompts are not in the prepared data (e.g. {sorted(missing)[0]}); "
                        "rerun the testset stage")
    test_keys = {prompt_key(by_id[i]) for i in test_ids}
    return training_pool(records, test_ids, test_keys), test_ids, test_keys


def select_pairs(pool, strategy, min_ratio, baseline_mean=None, tolerance=None):
    """Filter the pool by the recipe's strategies.

    ratio:          len(rejected) >= min_ratio * len(chosen)
    near_baseline:  the ratio rule AND rejected within tolerance of the baseline's mean reply length
    """
    if strategy == "ratio":
        return [r for r in pool if passes_ratio(r, min_ratio)]
    if strategy == "near_baseline":
        if baseline_mean is None or baseline_mean <= 0:
            raise DataError(f"near_baseline needs a positive baseline mean reply length, got {baseline_mean}")
        return [r for r in pool if passes_ratio(r, min_ratio) and near_length(r, baseline_mean, tolerance)]
    raise DataError(f"trainset.strategy must be 'ratio' or 'near_baseline', got {strategy!r}")


def split_eval(pairs, eval_pairs, seed):
    """(training candidates, held-out eval pairs): eval_pairs is a count (>= 1) or a share (< 1) of the filtered
    pairs, drawn with `seed`. Whole prompts go to one side: records that share a prompt (other answers to the same
    question) are never split between training and eval. eval_pairs 0: no eval pairs."""
    if not eval_pairs or not pairs:  # no pairs: nothing to hold out (the caller says "no pair passes the filter")
        return list(pairs), []
    # a share holds out at least one pair: the engine's eval and the length probes need one (a tiny variant, e.g.
    # near_baseline on a short-reply model, would otherwise hold out none and its training stop)
    want = max(1, round(eval_pairs * len(pairs))) if eval_pairs < 1 else int(eval_pairs)
    groups = {}
    for r in pairs:
        groups.setdefault(prompt_key(r), []).append(r)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    held = set()
    for k in keys:
        if sum(len(groups[h]) for h in held) >= want:
            break
        held.add(k)
    if len(held) == len(keys):
        if eval_pairs < 1:  # a share of a very small set (one prompt): train on it, hold nothing out (the caller warns)
            return list(pairs), []
        raise DataError(f"trainset.eval_pairs={eval_pairs} would hold out all {len(pairs)} passing pairs; lower it")
    return [r for r in pairs if prompt_key(r) not in held], [r for r in pairs if prompt_key(r) in held]


def sample_down(pairs, size, seed):
    """size == 0 keeps everything; otherwise `size` pairs drawn with `seed` (an error if there are fewer)."""
    if size == 0:
        return list(pairs)
    if size > len(pairs):
        raise DataError(
            f"trainset.size is {size} but only {len(pairs)} pairs pass the filter and are not held out for "
            "evaluation (trainset.eval_pairs); lower trainset.size or loosen the filter (trainset.size: 0 keeps all)"
        )
    keep = sorted(random.Random(seed).sample(range(len(pairs)), size))
    return [pairs[i] for i in keep]  # file order kept, so a diff of two variants stays readable
