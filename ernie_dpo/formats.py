"""Reading preference data in the formats people have: JSON or JSONL files, five record layouts.

Every layout is turned into one "dialogue" dict that data.convert_record validates the same way for all formats:
    {"system": str, "turns": [(where, {"role": ..., "content": ...}), ...], "chosen": answer, "rejected": answer}
`where` names the field a turn came from ("messages[2]", "history[0][1]", ...) so a rejected record's reason points
into the user's own file. Values are passed through unchecked: types, roles, empty texts and turn order are checked
once, in data.convert_record, so every format is dropped for the same reasons.

Layouts (docs/data_formats.md has one example of each):
    sharegpt  {"conversations": [{"from"|"role", "value"|"content"}], "chosen", "rejected", "system"?}
    trl       {"prompt": str | [messages], "chosen", "rejected"}, or only "chosen"/"rejected" as full conversations
    alpaca    {"instruction", "input"?, "chosen", "rejected", "system"?, "history"?: [[user, assistant], ...]}
    openai    {"messages": [messages up to the last user turn], "chosen", "rejected"}
    erniekit  {"src", "tgt", "response": [[a], [b]], "sort": [x, y], "system"?, "is_system"?} (what prepare writes)
"""
import json
import re
from pathlib import Path


class DataError(ValueError):
    """The input as a whole is unusable (not JSON, not a list, a record that is not an object, unknown format)."""


class Invalid(Exception):
    """One record is unusable; `reason` is the short key it is counted under in metrics and rejects."""

    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Unreadable:
    """A JSONL line that is not a JSON object. It stays in the record list so prepare_records counts it as a drop
    (with its line number) instead of one bad line stopping a whole file; `record` is what goes to rejects.json."""

    def __init__(self, reason, detail, record):
        self.reason, self.detail, self.record = reason, detail, record


# ---------------------------------------------------------------- files


def load_records(path):
    """The raw records of a JSON file (a list of objects) or a JSONL file (one object per line).

    Whole-file problems raise DataError naming the file and the reason. In JSONL, a line that is not valid JSON or
    not an object becomes an Unreadable entry (counted as "invalid_json" / "wrong_type" by prepare_records).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    # Bytes that are not UTF-8 become lone surrogates (surrogateescape) instead of failing the whole file: the
    # records that contain them are then dropped as "invalid_utf8" and the rest of the file is kept.
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")  # a BOM (Windows editors) is no data
    jsonl_name = Path(path).suffix.lower() == ".jsonl"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # Not one JSON value. It is JSONL when it says so (.jsonl) or when its first line is an object on its own;
        # otherwise (a truncated list, not JSON at all) the whole-file error is the useful one.
        if not (jsonl_name or _first_line_is_object(text)):
            raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        return _jsonl(text)
    if isinstance(data, dict) and jsonl_name:
        return [data]  # a one-line JSONL file
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__} (or JSONL: one "
                        "object per line; a one-record JSONL file must be named .jsonl)")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is a JSON {type(rec).__name__}, expected an object")
    return data


def _first_line_is_object(text):
    first = re.match(r"\s*(.*)", text).group(1)  # the first non-blank line (without copying the whole text)
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _jsonl(text):
    records = []
    # split on "\n" only: str.splitlines() would also split at U+2028 or \x85, which JSON allows inside strings
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue  # blank lines (a trailing newline, a separator) are no records
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            records.append(Unreadable("invalid_json", f"line {lineno}: not valid JSON (column {e.colno}: {e.msg})",
                                      line.rstrip("\r")))
            continue
        if not isinstance(rec, dict):
            rec = Unreadable("wrong_type", f"line {lineno} is a JSON {type(rec).__name__}, expected an object", rec)
        records.append(rec)
    return records


# ---------------------------------------------------------------- detection

# The key that identifies each layout, checked in this order on the first record that is an object. "prompt" comes
# before "messages": some TRL datasets (UltraFeedback binarized) carry a "messages" column next to prompt/chosen/
# rejected. TRL's implicit-prompt layout (only "chosen" and "rejected") has no key of its own, so it comes last.
SIGNATURES = [("conversations", "sharegpt"), ("src", "erniekit"), ("instruction", "alpaca"), ("prompt", "trl"),
              ("messages", "openai")]
ACCEPTED = ("sharegpt (conversations, chosen, rejected), trl (prompt, chosen, rejected; or chosen and rejected as "
            "full conversations), alpaca (instruction, input, chosen, rejected), openai (messages, chosen, rejected), "
            "erniekit (src, tgt, response, sort)")


def detect_format(records):
    """The format name, from the keys of the first record that is an object. DataError when they fit no format."""
    i, first = next(((i, r) for i, r in enumerate(records) if isinstance(r, dict)), (None, None))
    if first is None:
        raise DataError("no record is a JSON object, so the data format cannot be detected")
    for key, name in SIGNATURES:
        if key in first:
            return name
    if "chosen" in first and "rejected" in first:
        return "trl"
    raise DataError(f"cannot detect the data format: record {i} has the keys {sorted(first)}; accepted: {ACCEPTED}. "
                    "Set data.format to force one.")


# ---------------------------------------------------------------- one converter per layout


def _require(rec, *fields):
    for field in fields:
        if field not in rec:
            raise Invalid("missing_field", f"no '{field}'")


def _message_list(value, field):
    if not isinstance(value, list) or not value:
        raise Invalid("wrong_type", f"'{field}' must be a non-empty list")
    return [(f"{field}[{j}]", m) for j, m in enumerate(value)]


def _one_answer(value, field):
    """A string, a message object, or (TRL conversational) a list holding exactly one assistant message."""
    if not isinstance(value, list):
        return value
    if len(value) > 1:
        raise Invalid("multi_turn_answer", f"'{field}' has {len(value)} messages; only one-message answers are "
                                           "supported")
    if not value:
        raise Invalid("wrong_type", f"'{field}' is an empty list")
    return value[0]


def from_sharegpt(rec):
    _require(rec, "conversations", "chosen", "rejected")
    return {"system": rec.get("system", ""), "turns": _message_list(rec["conversations"], "conversations"),
            "chosen": rec["chosen"], "rejected": rec["rejected"]}


def from_openai(rec):
    _require(rec, "messages", "chosen", "rejected")
    return {"system": rec.get("system", ""), "turns": _message_list(rec["messages"], "messages"),
            "chosen": _one_answer(rec["chosen"], "chosen"), "rejected": _one_answer(rec["rejected"], "rejected")}


def from_trl(rec):
    _require(rec, "chosen", "rejected")
    prompt = rec.get("prompt")
    # As TRL's maybe_extract_prompt: a string prompt next to conversational answers (UltraFeedback binarized) is a
    # copy of what the answers already hold, so the prompt is taken from the answers, as when there is none.
    if prompt is None or (isinstance(prompt, str) and isinstance(rec["chosen"], list)):
        return _trl_implicit(rec["chosen"], rec["rejected"])
    if isinstance(prompt, str):  # standard: plain strings
        turns = [("prompt", {"role": "user", "content": prompt})]
    elif isinstance(prompt, list) and prompt:  # conversational: a message list, answers as one-message lists
        turns = _message_list(prompt, "prompt")
    else:
        raise Invalid("wrong_type", "'prompt' must be a string or a non-empty list of messages")
    return {"system": rec.get("system", ""), "turns": turns,
            "chosen": _one_answer(rec["chosen"], "chosen"), "rejected": _one_answer(rec["rejected"], "rejected")}


def _trl_implicit(chosen, rejected):
    """Both answers are whole conversations: the shared messages are the prompt, each last message is the answer."""
    if not (isinstance(chosen, list) and chosen and isinstance(rejected, list) and rejected):
        raise Invalid("wrong_type", "without 'prompt', 'chosen' and 'rejected' must be non-empty message lists "
                                    "(the whole conversation each)")
    if chosen[:-1] != rejected[:-1]:
        k = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        raise Invalid("prompt_mismatch", f"'chosen' and 'rejected' differ before their last message (at message {k}), "
                                         "so they do not answer the same prompt")
    return {"system": "", "turns": [(f"chosen[{j}]", m) for j, m in enumerate(chosen[:-1])],
            "chosen": chosen[-1], "rejected": rejected[-1]}


def from_alpaca(rec):
    _require(rec, "instruction", "chosen", "rejected")
    instruction, input_text, history = rec["instruction"], rec.get("input") or "", rec.get("history") or []
    for field, value in (("instruction", instruction), ("input", input_text)):
        if not isinstance(value, str):
            raise Invalid("wrong_type", f"'{field}' must be a string, got {type(value).__name__}")
    if not isinstance(history, list):
        raise Invalid("wrong_type", "'history' must be a list of [user, assistant] pairs")
    turns = []
    for k, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise Invalid("wrong_type", f"history[{k}] must be a [user, assistant] pair")
        turns += [(f"history[{k}][0]", {"role": "user", "content": pair[0]}),
                  (f"history[{k}][1]", {"role": "assistant", "content": pair[1]})]
    # LLaMA-Factory's alpaca converter: instruction and a non-empty input joined by a newline
    query = "\n".join(part for part in (instruction, input_text) if part)
    turns.append(("instruction", {"role": "user", "content": query}))
    return {"system": rec.get("system", ""), "turns": turns, "chosen": rec["chosen"], "rejected": rec["rejected"]}


def from_erniekit(rec):
    """ERNIEKit's DPO jsonl, read as PaddleFormers' convert_dpo_txt_data reads it (the higher sort is chosen)."""
    _require(rec, "src", "response", "sort")
    src, tgt = rec["src"], rec.get("tgt", [])
    src, tgt = ([x] if isinstance(x, str) else x for x in (src, tgt))
    for field, value in (("src", src), ("tgt", tgt)):
        if not isinstance(value, list):
            raise Invalid("wrong_type", f"'{field}' must be a string or a list of strings")
    response, sort = rec["response"], rec["sort"]
    if not (isinstance(response, list) and len(response) == 2):
        raise Invalid("wrong_type", "'response' must be a list of two answers")
    if not (isinstance(sort, list) and len(sort) == 2
            and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in sort)):
        raise Invalid("wrong_type", "'sort' must be a list of two numbers")
    if sort[0] == sort[1]:
        raise Invalid("equal_sort", f"'sort' is {sort}: neither answer is preferred")
    if len(src) != len(tgt) + 1:
        raise Invalid("bad_turn_order", f"'src' has {len(src)} turns and 'tgt' {len(tgt)}; src needs exactly one more "
                                        "(the turn to answer)")
    system = rec.get("system", "")
    if rec.get("is_system") == 1:  # PaddleFormers: the first src turn is the system prompt, its tgt turn is dropped
        system, src, tgt = src[0], src[1:], tgt[1:]
    turns = []
    for k, user in enumerate(src):
        turns.append((f"src[{k}]", {"role": "user", "content": user}))
        if k < len(tgt):
            turns.append((f"tgt[{k}]", {"role": "assistant", "content": tgt[k]}))
    first, second = (_one_answer(a, f"response[{k}]") for k, a in enumerate(response))
    chosen, rejected = (first, second) if sort[0] > sort[1] else (second, first)
    return {"system": system, "turns": turns, "chosen": chosen, "rejected": rejected}


CONVERTERS = {"sharegpt": from_sharegpt, "trl": from_trl, "alpaca": from_alpaca, "openai": from_openai,
              "erniekit": from_erniekit}
