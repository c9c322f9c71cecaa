"""Every parameter the pipeline reads, with its type and what is allowed: checked before any stage does any work.

`dvc exp run -S train.max_steps=abc` composes (Hydra does not know what a key means), so the first stage that runs
would otherwise start minutes of work before the value breaks something. Every stage calls common.load_params(),
which checks the whole of params.yaml against SCHEMA and stops at once with every problem named: the key, the
value, what is allowed; an unknown key (a misspelling, or Hydra's `+train.max_step=3`) with the closest known name.
SCHEMA is also the reference for what each key is (docs/experiments.md lists the same keys; conf/config.yaml
carries the comments).
"""
import difflib
import numbers
import re


class ParamError(ValueError):
    pass


class Rule:
    """One parameter: its type, and a check with the words that say what is allowed."""

    def __init__(self, kind, allowed="", check=None, nullable=False):
        self.kind, self.allowed, self.check, self.nullable = kind, allowed, check, nullable

    def problem(self, value):
        if value is None:
            return None if self.nullable else f"must be {self.describe()}, not empty"
        ok_type = {"int": isinstance(value, int) and not isinstance(value, bool),
                   "number": isinstance(value, numbers.Real) and not isinstance(value, bool),
                   "str": isinstance(value, str),
                   "bool": isinstance(value, bool),
                   "list": isinstance(value, list)}[self.kind]
        if not ok_type or (self.check is not None and not self.check(value)):
            return f"must be {self.describe()}"
        return None

    def describe(self):
        if self.allowed.startswith("one of"):
            return self.allowed
        names = {"int": "an integer", "number": "a number", "str": "a string", "bool": "true or false",
                 "list": "a list"}
        return names[self.kind] + (f" {self.allowed}" if self.allowed else "")


def Int(lo=None, hi=None):
    words = (f">= {lo}" if hi is None else f"in [{lo}, {hi}]") if lo is not None else ""
    return Rule("int", words, lambda v: (lo is None or v >= lo) and (hi is None or v <= hi))


def Num(gt=None, ge=None, le=None, lt=None):
    parts = [f"> {gt}" if gt is not None else "", f">= {ge}" if ge is not None else "",
             f"<= {le}" if le is not None else "", f"< {lt}" if lt is not None else ""]
    return Rule("number", " and ".join(p for p in parts if p),
                lambda v: (gt is None or v > gt) and (ge is None or v >= ge) and (le is None or v <= le)
                and (lt is None or v < lt))


def Choice(*options):
    return Rule("str", "one of " + ", ".join(options), lambda v: v in options)


def Str(nonempty=True):
    return Rule("str", "(not empty)" if nonempty else "", (lambda v: bool(v.strip())) if nonempty else None)


def Bool():
    return Rule("bool")


def StrList():
    return Rule("list", "of strings", lambda v: all(isinstance(x, str) for x in v))


LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "dpop", "kto_pair", "sppo_hard", "nca_pair", "or")

SCHEMA = {
    "profile_name": Str(),
    "data.raw_path": Str(), "data.format": Choice("auto", "sharegpt", "trl", "alpaca", "openai", "erniekit"),
    "fetch.dataset": Str(), "fetch.file": Str(), "fetch.revision": Str(), "fetch.endpoint": Str(),
    "fetch.timeout_s": Num(gt=0),
    "prepare.max_chars": Int(1),
    "prepare.min_records": Int(1),
    "analyze.bins": Int(2),
    "testset.size": Int(1), "testset.seed": Int(0), "testset.keep_system": Bool(), "testset.validation_size": Int(0),
    "model.name_or_path": Str(), "model.revision": Str(),
    "model.tiny.vocab_size": Int(300), "model.tiny.hidden_size": Int(8), "model.tiny.num_layers": Int(1),
    "model.tiny.num_heads": Int(1), "model.tiny.num_kv_heads": Int(1), "model.tiny.seed": Int(0),
    "model.tiny.warmup_steps": Int(1), "model.tiny.warmup_batch_size": Int(1),
    "model.tiny.warmup_learning_rate": Num(gt=0), "model.tiny.warmup_rejected_weight": Int(1),
    "model.tiny.max_seq_len": Int(16),
    "engine.device": Choice("cpu", "gpu"), "engine.gpus": Int(1), "engine.nnodes": Int(1),
    "engine.tensor_parallel": Int(1), "engine.sharding_parallel": Int(1),
    "engine.sharding_stage": Choice("stage1", "stage2", "stage3"),
    "infer.top_p": Num(gt=0, le=1), "infer.temperature": Num(ge=0), "infer.max_dec_len": Int(1),
    "infer.batch_size": Int(1), "infer.seed": Int(0), "infer.stop_tokens": StrList(),
    "infer.backend": Choice("local", "managed", "openai"),
    "infer.managed.command": StrList(), "infer.managed.ready_timeout_s": Num(gt=0),
    "infer.openai.baseline_url": Str(), "infer.openai.tuned_url": Str(), "infer.openai.model": Str(),
    "infer.openai.api_key_env": Str(), "infer.openai.concurrency": Int(1), "infer.openai.timeout_s": Num(gt=0),
    "infer.openai.max_retries": Int(0),
    "probes.samples": Int(1),
    "trainset.strategy": Choice("ratio", "near_baseline"), "trainset.min_ratio": Num(gt=0),
    "trainset.baseline_tolerance": Num(gt=0), "trainset.keep_system": Bool(), "trainset.size": Int(0),
    "trainset.seed": Int(0), "trainset.eval_pairs": Num(ge=0),
    "diagnose.max_pairs": Int(1), "diagnose.seed": Int(0),
    "train.max_steps": Int(1), "train.warmup_steps": Int(0), "train.global_batch_size": Int(1),
    "train.learning_rate": Num(gt=0, lt=1), "train.fine_tuning": Choice("lora", "full"),
    "train.loss_type": Choice(*LOSS_TYPES), "train.beta": Num(gt=0), "train.sft_loss_ratio": Num(ge=0),
    "train.normalize_logps": Bool(),
    "train.lora_rank": Int(1), "train.seed": Int(0), "train.max_seq_len": Int(8), "train.max_prompt_len": Int(1),
    "train.truncate": Bool(), "train.keep_chosen_end": Bool(), "train.max_skipped_share": Num(ge=0, le=1), "train.save_steps": Int(0),
    "train.eval_steps": Int(0), "train.length_probe_steps": Int(0), "train.length_probe_prompts": Int(0),
    "train.length_probe_max_dec_len": Int(0), "train.stop_if_longer": Num(ge=0), "train.stop_if_longer_probes": Int(1),
    "evaluate.bootstrap_samples": Int(100), "evaluate.seed": Int(0),
}

# Relations between keys: (check, message)
RELATIONS = [
    (lambda p: p["trainset"]["eval_pairs"] < 1 or float(p["trainset"]["eval_pairs"]).is_integer(),
     "trainset.eval_pairs ({trainset.eval_pairs}) must be a share below 1 or a whole count"),
    (lambda p: not p["train"]["length_probe_steps"] or p["testset"]["validation_size"] > 0,
     "train.length_probe_steps ({train.length_probe_steps}) needs validation prompts: set testset.validation_size > 0 "
     "(or train.length_probe_steps=0)"),
    (lambda p: not p["train"]["length_probe_steps"] or p["engine"]["tensor_parallel"] == 1,
     "train.length_probe_steps needs engine.tensor_parallel 1 (a probe generates on rank 0 with the whole model)"),
    (lambda p: p["train"]["max_prompt_len"] < p["train"]["max_seq_len"],
     "train.max_prompt_len ({train.max_prompt_len}) must be smaller than train.max_seq_len ({train.max_seq_len}): "
     "the answers need room"),
    (lambda p: p["model"]["tiny"]["hidden_size"] % p["model"]["tiny"]["num_heads"] == 0,
     "model.tiny.hidden_size ({model.tiny.hidden_size}) must be a multiple of model.tiny.num_heads "
     "({model.tiny.num_heads})"),
    (lambda p: p["model"]["tiny"]["num_heads"] % p["model"]["tiny"]["num_kv_heads"] == 0,
     "model.tiny.num_heads ({model.tiny.num_heads}) must be a multiple of model.tiny.num_kv_heads "
     "({model.tiny.num_kv_heads})"),
]


def flatten(tree, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def problems(params):
    """Every problem with a params dict, as sentences naming the key (empty list: all good)."""
    if not isinstance(params, dict):
        return ["params.yaml must be a mapping of sections"]
    flat = flatten(params)
    found = []
    for key, value in flat.items():
        if key not in SCHEMA:
            near = difflib.get_close_matches(key, SCHEMA, n=1)
            found.append(f"{key}: unknown parameter" + (f" (did you mean {near[0]}?)" if near else "") +
                         "; nothing reads it")
            continue
        why = SCHEMA[key].problem(value)
        if why:
            found.append(f"{key}: {value!r} {why}")
    for key in SCHEMA:
        if key not in flat:
            found.append(f"{key}: missing (set it in conf/config.yaml or the profile)")
    if not found:  # relations only between values of the right types
        for check, message in RELATIONS:
            if not check(params):
                found.append(re.sub(r"\{([\w.]+)\}", lambda m: str(flat.get(m.group(1), "?")), message))
    return found


def validate(params, source="params.yaml"):
    """Raise ParamError listing every problem, or return params unchanged."""
    found = problems(params)
    if found:
        raise ParamError(f"{source}: {len(found)} parameter problem(s), nothing was run:\n  " + "\n  ".join(found))
    return params
