"""The token ids a model is asked with (inference) and trained on (DPO): one encoding for both, computed here.

How PaddleFormers' DPO dataset (datasets/DPODataset.py) encodes a pair, and what this module changes:

1. Prompt: it renders the chat with tokenizer.encode_chat_inputs(), by default each user turn ON ITS OWN ("one
   turn" mode). With a template that adds a default system prompt (SmolLM2, Qwen) every later turn gets it again, and
   with ERNIE's every turn gets its own <|begin_of_sentence|>: prompts inference never sends. Here the conversation is
   rendered cumulatively and cut into (query, answer) pieces (the engine's own other mode, chat_turns); inference
   feeds the model exactly those pieces (prompt_ids).
2. Targets: the answer piece already ends as the chat template ends an assistant turn (SmolLM2 `answer<|im_end|>\n`,
   ERNIE `answer<|end_of_sentence|>`), and the engine then appends tokenizer.eos AGAIN (`answer<|im_end|>\n<|im_end|>`,
   `answer<|end_of_sentence|></s>`): the model is trained to emit a second end marker inference never reaches. Here
   the eos is appended only when the template leaves the turn open (no special token after the answer).
3. Length: the engine SKIPS a pair whose last user turn + both answers exceed max_seq_len (logging only five), drops
   earlier turns that do not fit silently, and never reads max_prompt_len. Here every pair gets a status and is
   counted (encode_pair); with `truncate` a long pair is cut instead of dropped, as TRL does: earlier turns first,
   then the prompt from the left (its end, the question and the generation prompt, is kept), then the answers from
   the right, the longer one first. A cut answer loses its end-of-turn token: the model is not taught that an answer
   ends where the cut is. With `keep_chosen_end` (the default) the chosen answer is never cut: a pair whose chosen
   answer does not fit whole is dropped (chosen_cut) and only the rejected answer is cut: a cut chosen answer has no
   end of turn, and training on it (its SFT term above all) teaches the model not to end. On the real file at
   max_seq_len 512 the TRL rule cut 47 of 98 chosen answers; on SmolLM2's 60 test prompts the two rules could not be
   told apart (docs/smol.md), so this default rests on that argument, not on a measured effect.

The train stage writes each pair's ids into the pairs file (`token_ids`), and the engine process uses them as they
are (install_engine_hooks): the engine trains on exactly the ids counted here, on a CPU and on every GPU worker.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from .data import to_messages

FITS, HISTORY_TRUNCATED, TRUNCATED = "fits", "history_truncated", "truncated"
TOO_LONG, PROMPT_TOO_LONG, IDENTICAL = "too_long", "prompt_too_long", "identical_after_truncation"
CHOSEN_CUT = "chosen_cut"
TRAINED = (FITS, HISTORY_TRUNCATED, TRUNCATED)
STATUSES = TRAINED + (TOO_LONG, PROMPT_TOO_LONG, IDENTICAL, CHOSEN_CUT)


def use_cumulative_chat_encoding():
    """Make the engine's default ("one turn") chat encoding the cumulative one, in this process."""
    from paddleformers.transformers.tokenizer_utils import PaddleTokenizerMixin as cls

    if not hasattr(cls, "_engine_default_one_turn"):
        cls._engine_default_one_turn = cls._encode_chat_inputs_oneturn  # kept so tests can show what it did
    cls._encode_chat_inputs_oneturn = cls._encode_chat_inputs_openai_format


def chat_turns(tokenizer, messages):
    """[[query ids, answer ids], ..., [query ids]]: the engine's cumulative encoding of OpenAI-format messages."""
    return tokenizer._encode_chat_inputs_openai_format({"messages": [dict(m) for m in messages]})


def prompt_ids(tokenizer, messages):
    """The token ids a model is asked with: the conversation up to and including the generation prompt."""
    return [i for turn in chat_turns(tokenizer, messages) for part in turn for i in part]


def special_ids(tokenizer):
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})


def template_turn_end(tokenizer):
    """The ids the chat template puts right after an assistant message's text (e.g. <|im_end|> "\\n"), [] if none."""
    marker = "ernie-dpo-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}],
                                             add_generation_prompt=False, tokenize=False)
    except Exception:  # a template that cannot render this conversation says nothing about its end of turn
        return []
    after = text.split(marker, 1)[1] if marker in text else ""
    return tokenizer(after, add_special_tokens=False)["input_ids"] if after else []


def answer_suffix(tokenizer):
    """What is appended to an answer's ids: nothing when the template closes the turn with a special token
    (the target then ends exactly as the template renders it), else the eos, so the model learns to stop."""
    return [] if set(template_turn_end(tokenizer)) & special_ids(tokenizer) else [tokenizer.eos_token_id]


class StopTokenError(ValueError):
    pass


def stop_tokens(tokenizer, model_dir, extra=()):
    """{token id: token} that end a reply: the tokenizer's eos, the model's generation_config eos_token_id(s), the
    chat template's end of turn, and `extra` (infer.stop_tokens). An extra token the tokenizer does not know as ONE
    token is an error, never silently dropped."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    end = template_turn_end(tokenizer)  # e.g. <|im_end|> "\n": its first token, if special, ends a reply
    if end and end[0] in special_ids(tokenizer):
        ids.add(end[0])
    for tok in extra:
        found = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(found) != 1 or found[0] == tokenizer.unk_token_id:
            raise StopTokenError(f"infer.stop_tokens: {tok!r} is not one token of this model's tokenizer "
                                 f"(it encodes to {found}); remove it or use the model's own end-of-turn token")
        ids.add(found[0])
    return {i: tokenizer.convert_ids_to_tokens(i) for i in sorted(ids)}


@dataclass
class Pair:
    """One pair as the engine trains on it: status, the ids, and what was cut to fit (tokens)."""
    status: str
    prompt: list = field(default_factory=list)
    chosen: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    cut: dict = field(default_factory=lambda: {"prompt": 0, "chosen": 0, "rejected": 0})

    @property
    def total(self):
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


def _cap(a, b, budget):
    """The largest c with min(a, c) + min(b, c) <= budget: cut the longer answer first, both only if needed."""
    if a + b <= budget:
        return max(a, b)
    short = min(a, b)
    return budget - short if 2 * short <= budget else budget // 2


def encode_pair(tokenizer, messages, chosen, rejected, max_seq_len, max_prompt_len, truncate=False, suffix=None,
                keep_chosen_end=False):
    """The engine's ids for one pair (messages: the conversation up to the last user turn, OpenAI format).

    The engine packs prompt + chosen + rejected into ONE sequence of at most max_seq_len tokens.
    truncate=False (the engine's own rule, plus max_prompt_len): a pair whose last user turn and answers do not fit
    is dropped (too_long); earlier turns are kept newest first while they fit (history_truncated otherwise); a pair
    whose prompt is then longer than max_prompt_len is dropped (prompt_too_long).
    truncate=True: earlier turns are kept newest first while the prompt fits max_prompt_len and the whole fits
    max_seq_len; a last turn longer than max_prompt_len keeps its last max_prompt_len tokens; answers are cut from
    the right to what is left (truncated). Answers cut to the same ids carry no preference: dropped (identical).
    keep_chosen_end (with truncate): the chosen answer keeps every token, the rejected one gets what is left; a pair
    whose chosen answer does not fit whole is dropped (chosen_cut).
    suffix: answer_suffix(tokenizer), computed once by callers that encode many pairs.
    """
    suffix = answer_suffix(tokenizer) if suffix is None else suffix
    turns = [chat_turns(tokenizer, messages + [{"role": "assistant", "content": a}]) for a in (chosen, rejected)]
    answers = [t[-1][1] + suffix for t in turns]
    history, query = turns[0][:-1], list(turns[0][-1][0])
    need = len(answers[0]) + len(answers[1])
    prompt_limit = max_prompt_len if truncate else max_seq_len
    if not truncate and need + len(query) > max_seq_len:
        return Pair(TOO_LONG)
    prompt, kept = query, 0
    for q, a in reversed(history):
        longer = len(prompt) + len(q) + len(a)
        if longer > prompt_limit or longer + need > max_seq_len:
            break
        prompt, kept = q + a + prompt, kept + 1
    dropped_history = sum(len(q) + len(a) for q, a in history[:len(history) - kept])
    status = FITS if kept == len(history) else HISTORY_TRUNCATED
    if not truncate:
        if len(prompt) > max_prompt_len:
            return Pair(PROMPT_TOO_LONG)
        return Pair(status, prompt, answers[0], answers[1], {"prompt": dropped_history, "chosen": 0, "rejected": 0})
    cut = {"prompt": dropped_history + max(0, len(prompt) - max_prompt_len)}
    prompt = prompt[-max_prompt_len:]
    budget = max_seq_len - len(prompt)
    if keep_chosen_end:
        if len(answers[0]) >= budget:  # the rejected answer needs at least one token too
            return Pair(CHOSEN_CUT, cut=cut)
        caps = (len(answers[0]), budget - len(answers[0]))
    else:
        caps = (_cap(len(answers[0]), len(answers[1]), budget),) * 2
    cut["chosen"], cut["rejected"] = max(0, len(answers[0]) - caps[0]), max(0, len(answers[1]) - caps[1])
    chosen_ids, rejected_ids = answers[0][:caps[0]], answers[1][:caps[1]]
    if cut["prompt"] > dropped_history or cut["chosen"] or cut["rejected"]:
        status = TRUNCATED
    if chosen_ids == rejected_ids:
        return Pair(IDENTICAL, cut=cut)
    return Pair(status, prompt, chosen_ids, rejected_ids, cut)


def fit_pairs(tokenizer, records, max_seq_len, max_prompt_len, truncate=False, keep_chosen_end=False):
    """Every training record encoded: (records the engine will train on, each with its `token_ids`; counts by
    status; summary of what was cut). Nothing is dropped uncounted."""
    from tqdm import tqdm

    suffix = answer_suffix(tokenizer)
    kept, counts = [], dict.fromkeys(STATUSES, 0)
    cut = {"prompt": 0, "chosen": 0, "rejected": 0}
    answers_cut = {"chosen": 0, "rejected": 0}
    longest = 0
    for rec in tqdm(records, desc="encoding pairs (tokens)", unit="pair"):
        # the engine's erniekit reader puts the system prompt first when the record has one
        pair = encode_pair(tokenizer, to_messages(rec, keep_system=True), rec["response"][0][0],
                           rec["response"][1][0], max_seq_len, max_prompt_len, truncate, suffix, keep_chosen_end)
        counts[pair.status] += 1
        if pair.status not in TRAINED:
            continue
        for k in cut:
            cut[k] += pair.cut[k]
        for k in answers_cut:
            answers_cut[k] += pair.cut[k] > 0
        longest = max(longest, pair.total)
        kept.append({**rec, "token_ids": {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}})
    summary = {"tokens_cut_prompt": cut["prompt"], "tokens_cut_chosen": cut["chosen"],
               "tokens_cut_rejected": cut["rejected"], "chosen_answers_cut": answers_cut["chosen"],
               "rejected_answers_cut": answers_cut["rejected"], "pair_tokens_max": longest,
               "answer_suffix": tokenizer.convert_ids_to_tokens(suffix) if suffix else []}
    return kept, counts, summary


# ------------------------------------------------------------------------------------- inside the engine process


def _pair_from_ids(self, example, original):
    """BaseDPODataSet's pair encoder, replaced: a record that carries `token_ids` (written by the train stage) is
    trained on exactly those ids; any other record goes through the engine's own code."""
    ids = example.get("token_ids")
    if not ids:
        return original(self, example)
    prompt, chosen, rejected = ids["prompt"], ids["chosen"], ids["rejected"]
    total = len(prompt) + len(chosen) + len(rejected)
    if total > self.max_seq_len or not prompt or not chosen or not rejected:
        # cannot happen for pairs written by the train stage; the stage fails on any [SKIP] in the engine log
        print(f"[SKIP] pair {example.get('id')}: {total} tokens, max_seq_len {self.max_seq_len}", flush=True)
        return (None,) * 5
    return list(prompt), [list(chosen), list(rejected)], [len(chosen), len(rejected)], total, None


def install_engine_hooks():
    """In the engine process (engine_main._engine_main): cumulative chat encoding, and pairs trained on their token_ids."""
    from paddleformers.datasets.DPODataset import BaseDPODataSet

    use_cumulative_chat_encoding()
    name = "_BaseDPODataSet__postprocess_before_concat"
    original = getattr(BaseDPODataSet, name)
    if getattr(original, "_ernie_dpo", False):
        return
    hook = lambda self, example: _pair_from_ids(self, example, original)
    hook._ernie_dpo = True
    setattr(BaseDPODataSet, name, hook)
