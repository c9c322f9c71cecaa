"""The data half of the recipe: ShareGPT DPO -> ERNIE DPO jsonl -> test set and training set.

Everything here is pure Python on plain dicts so tests can call it directly.

ShareGPT DPO record (LLaMA-Factory's DPO-En-Zh-20k layout):
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

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "bot"}
SYSTEM_ROLES = {"system"}


class DataError(ValueError):
    """The input as a whole is unusable (not JSON, not a list, a record that is not an object)."""


class Invalid(Exception):
    """One record is unusable; `reason` is the short key it is counted under in metrics and rejects."""

    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------- reading ShareGPT


def load_sharegpt(path):
    """The raw file as a list of records. Whole-file problems raise DataError naming the file and the reason."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    # Bytes that are not UTF-8 become lone surrogates (surrogateescape) instead of failing the whole file: the
    # records that contain them are then dropped as "invalid_utf8" and the rest of the file is kept.
    text = raw.decode("utf-8", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is a JSON {type(rec).__name__}, expected an object")
    return data


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


def convert_record(rec, max_chars=None):
    """One ShareGPT DPO record -> (ERNIE DPO record without id). Raises Invalid with a reason key.

    max_chars: a text longer than this (e.g. a 10 MB answer) is dropped as "too_long" rather than fed to training.
    """
    for text in _strings(rec):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise Invalid("invalid_utf8", f"bytes that are not UTF-8 in a text (position {e.start})") from None
        if max_chars and len(text) > max_chars:
            raise Invalid("too_long", f"a text of {len(text):,} characters exceeds prepare.max_chars={max_chars:,}")
    for field in ("conversations", "chosen", "rejected"):
        if field not in rec:
            raise Invalid("missing_field", f"no '{field}'")
    convs = rec["conversations"]
    if not isinstance(convs, list) or not convs:
        raise Invalid("wrong_type", "'conversations' must be a non-empty list")

    system = rec.get("system", "")
    if not isinstance(system, str):
        raise Invalid("wrong_type", "'system' must be a string")
    src, tgt = [], []
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise Invalid("wrong_type", f"conversations[{j}] is a {type(turn).__name__}, expected an object")
        role = turn.get("from", turn.get("role"))
        text = _text(turn, f"conversations[{j}]")
        if role in SYSTEM_ROLES:
            if j != 0:
                raise Invalid("misplaced_system", f"system turn at position {j}; only the first turn may be system")
            system = text
            continue
        if not text.strip():
            raise Invalid("empty_turn", f"conversations[{j}] is empty")
        if role in USER_ROLES:
            if len(src) != len(tgt):
                raise Invalid("bad_turn_order", f"conversations[{j}]: two user turns in a row")
            src.append(text)
        elif role in ASSISTANT_ROLES:
            if len(src) != len(tgt) + 1:
                raise Invalid("bad_turn_order", f"conversations[{j}]: assistant turn without a user turn before it")
            tgt.append(text)
        else:
            raise Invalid("unknown_role", f"conversations[{j}] has role {role!r}")
    if not src:
        raise Invalid("no_user_turn", "the conversation has no user turn")
    if len(src) != len(tgt) + 1:
        raise Invalid("last_turn_not_user", "the conversation ends with an assistant turn, so there is nothing to answer")

    chosen = _text(rec["chosen"], "chosen")
    rejected = _text(rec["rejected"], "rejected")
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


def prepare_records(raw_records, max_chars=None):
    """Convert every record. Returns (kept, rejects, counts): nothing is dropped without a reason.

    kept: ERNIE DPO records with "id" first. rejects: {"index", "reason", "detail", "record"}.
    counts: {"read", "kept", "dropped": {reason: n}} with read == kept + sum(dropped).
    """
    kept, rejects, seen = [], [], set()
    for i, rec in enumerate(raw_records):
        try:
            out = convert_record(rec, max_chars)
            rid = record_id(out)
            if rid in seen:
                raise Invalid("duplicate", f"same content as an earlier record (id {rid})")
        except Invalid as e:
            rejects.append({"index": i, "reason": e.reason, "detail": e.detail, "record": _printable(rec)})
            continue
        seen.add(rid)
        kept.append({"id": rid, **out})
    dropped = {}
    for r in rejects:
        dropped[r["reason"]] = dropped.get(r["reason"], 0) + 1
    counts = {"read": len(raw_records), "kept": len(kept), "dropped": dict(sorted(dropped.items()))}
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


# ---------------------------------------------------------------- training set


def training_pool(records, test_ids, test_prompt_keys):
    """Records whose id AND prompt are not in the test set."""
    return [r for r in records if r["id"] not in test_ids and prompt_key(r) not in test_prompt_keys]


def pool_outside(records, tests):
    """(pool, test ids, test prompt keys): the records that share neither id nor prompt with the test set."""
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


def sample_down(pairs, size, seed):
    """size == 0 keeps everything; otherwise `size` pairs drawn with `seed` (an error if there are fewer)."""
    if size == 0:
        return list(pairs)
    if size > len(pairs):
        raise DataError(
            f"trainset.size is {size} but only {len(pairs)} pairs pass the filter; lower trainset.size or loosen "
            "the filter (trainset.size: 0 keeps all)"
        )
    keep = sorted(random.Random(seed).sample(range(len(pairs)), size))
    return [pairs[i] for i in keep]  # file order kept, so a diff of two variants stays readable
