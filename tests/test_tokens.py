"""The token ids the engine trains on (ernie_dpo.tokens): targets that end as the chat template ends a turn, long
pairs cut (truncate) or dropped and counted, and the engine's own dataset code training on exactly those ids.

Compared as ids, never as decoded text (text hides how a word is split): the training prompt is exactly the ids
inference asks with, and prompt + answer is the chat template's rendering tokenized whole, token for token, but for
one named boundary (first_word_splits) where the pieces are tokenized apart: ':' '▁' | 'I' 't' vs ':' '▁It'."""
import copy
import difflib
import itertools
import json
import shutil

import pytest

from ernie_dpo import tokens
from ernie_dpo.data import to_messages

# ERNIE-4.5-0.3B-PT's own chat template (tokenizer_config.json of baidu/ERNIE-4.5-0.3B-PT): an assistant turn ends
# with <|end_of_sentence|>, while the tokenizer's eos is </s>.
ERNIE_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}\n    {%- set add_generation_prompt = true -%}\n{%- endif -%}\n"
    "{%- if not cls_token is defined -%}\n    {%- set cls_token = \"<|begin_of_sentence|>\" -%}\n{%- endif -%}\n"
    "{%- if not sep_token is defined -%}\n    {%- set sep_token = \"<|end_of_sentence|>\" -%}\n{%- endif -%}\n"
    "{{- cls_token -}}\n{%- for message in messages -%}\n    {%- if message[\"role\"] == \"user\" -%}\n"
    "        {{- \"User: \" + message[\"content\"] + \"\\n\" -}}\n    {%- elif message[\"role\"] == \"assistant\" -%}\n"
    "        {{- \"Assistant: \" + message[\"content\"] + sep_token -}}\n"
    "    {%- elif message[\"role\"] == \"system\" -%}\n        {{- message[\"content\"] + \"\\n\" -}}\n"
    "    {%- endif -%}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{- \"Assistant: \" -}}\n{%- endif -%}"
)
# SmolLM2-135M-Instruct's own chat template (ChatML, read from its GGUF file): the generation prompt ends with "\n".
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MSGS = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def tiny_tok(tiny_base):
    from paddleformers.transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_base))


def with_template(tiny_base, d, template):
    """The tiny model's SentencePiece tokenizer with another chat template (loaded afresh: the engine compiles a
    tokenizer's template once, so assigning tokenizer.chat_template later changes nothing)."""
    from paddleformers.transformers import AutoTokenizer

    d.mkdir(parents=True)
    for f in tiny_base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, d / f.name)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def ernie_tok(tiny_base, tmp_path_factory):
    """The tiny model's tokenizer with ERNIE 4.5's real chat template (no real ERNIE tokenizer offline)."""
    return with_template(tiny_base, tmp_path_factory.mktemp("t") / "ernie", ERNIE_TEMPLATE)


@pytest.fixture(scope="module")
def smol_template_tok(tiny_base, tmp_path_factory):
    """The tiny model's tokenizer with SmolLM2's ChatML template (its <|im_...|> markers are plain text here)."""
    return with_template(tiny_base, tmp_path_factory.mktemp("t") / "smol", SMOL_TEMPLATE)


TEMPLATES = ["tiny_tok", "ernie_tok", "smol_template_tok"]
# A history answer and a chosen answer that start with "It": with the tiny tokenizer the whole-string tokenization
# of "Assistant: It" is ':' '▁It', while piece by piece it is ':' '▁' | 'I' 't' (see the named boundary below).
HISTORY_IT = MSGS[:2] + [{"role": "assistant", "content": "It is me. How can I help?"}] + MSGS[3:]
CHOSEN, REJECTED = "It is 4.", "Let me think about it. The answer is 4."


def whole_ids(tok, messages, add_generation_prompt):
    """The chat template's own rendering of the conversation, tokenized as ONE string."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def first_word_splits(tok, piecewise, piece_lengths, whole):
    """Where ids encoded piece by piece (the engine's (query, answer) pieces, each tokenized on its own) differ from
    the same text tokenized whole, checked to be nothing but THE NAMED BOUNDARY, and returned as
    [(piece-wise tokens, whole tokens), ...]:

    a piece that ends in the template's space ("Assistant: " ends with the token '▁') is followed by a piece whose
    first word, tokenized on its own, has no '▁' (SentencePiece marks a space as the START of the next word, and
    there is none inside the next piece): piece-wise ':' '▁' | 'I' 't', whole ':' '▁It'. Same text, and nothing
    else differs. The whole-string ids are then not "prompt + answer": the prompt's last token is merged into the
    answer's first word, so they cannot be trained on without changing the prompt the model is asked with.
    """
    ends = set(itertools.accumulate(piece_lengths))
    found = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, piecewise, whole, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        ours, theirs = tok.convert_ids_to_tokens(piecewise[i1:i2]), tok.convert_ids_to_tokens(whole[j1:j2])
        assert ours and theirs, (ours, theirs)  # a replacement, never ids only one side has
        assert i1 + 1 in ends and ours[0] == "▁", (ours, theirs)  # starts at the '▁' that ends a piece
        assert not any(t.startswith("▁") for t in ours[1:]), (ours, theirs)  # then the next piece's first word
        assert theirs[0].startswith("▁") and theirs[0] != "▁", (ours, theirs)  # which whole-string spells "▁Word"
        assert "".join(ours) == "".join(theirs), (ours, theirs)  # the same text
        found.append((ours, theirs))
    return found


def assert_ids_are_the_template_rendering_but_for_first_word_splits(tok, messages, ids, pieces, suffix=()):
    """`ids` (+ `suffix`, the eos a template that leaves the turn open gets) are the chat template's rendering of
    `messages` tokenized, token for token, except at named boundaries (first_word_splits), which are returned."""
    assert len(ids) == sum(len(p) for p in pieces) + len(suffix) and ids[len(ids) - len(suffix):] == list(suffix)
    body = ids[:len(ids) - len(suffix)]
    assert body == [i for p in pieces for i in p]
    whole = whole_ids(tok, messages, add_generation_prompt=messages[-1]["role"] == "user")
    found = first_word_splits(tok, body, [len(p) for p in pieces], whole)
    assert (body == whole) == (not found)
    assert tok.decode(body) == tok.decode(whole)
    return found


@pytest.mark.parametrize("which", ["tiny_tok", "ernie_tok"])
def test_targets_end_exactly_as_the_chat_template_ends_a_turn(which, request):
    tok = request.getfixturevalue(which)
    end = tok.convert_tokens_to_ids("<|end_of_sentence|>")
    assert tokens.template_turn_end(tok) == [end]
    assert tokens.answer_suffix(tok) == []  # the template closes the turn: no eos (</s>) appended after it
    pair = tokens.encode_pair(tok, MSGS, CHOSEN, REJECTED, 512, 256)
    assert pair.status == "fits"
    for answer, ids in ((CHOSEN, pair.chosen), (REJECTED, pair.rejected)):
        assert ids == tok(answer, add_special_tokens=False)["input_ids"] + [end]
        whole = whole_ids(tok, MSGS + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
        assert whole[-1] == end and tok.eos_token_id not in whole


@pytest.mark.parametrize("which", TEMPLATES)
@pytest.mark.parametrize("messages", [MSGS, HISTORY_IT], ids=["history", "history-starts-with-It"])
def test_inference_prompt_ids_are_the_training_prompt_ids(which, messages, request):
    """Token-level truth for the prompt: the ids inference asks with (tokens.prompt_ids) are exactly the ids the
    pair is trained on after (Pair.prompt), for every template; both are the template's rendering of the prompt
    (generation prompt included) tokenized, but for the named first-word boundary inside the history."""
    tok = request.getfixturevalue(which)
    infer = tokens.prompt_ids(tok, messages)
    pair = tokens.encode_pair(tok, messages, CHOSEN, REJECTED, 512, 256)
    assert pair.status == "fits" and pair.prompt == infer
    pieces = [p for turn in tokens.chat_turns(tok, messages) for p in turn]
    found = assert_ids_are_the_template_rendering_but_for_first_word_splits(tok, messages, infer, pieces)
    it_in_history = which != "smol_template_tok" and messages is HISTORY_IT
    assert found == ([(["▁", "I", "t"], ["▁It"])] if it_in_history else [])


@pytest.mark.parametrize("which", TEMPLATES)
def test_training_ids_are_the_template_rendering_tokenized_at_its_turn_pieces(which, request):
    """Token-level truth for the targets: prompt + answer ids are the template's rendering of the whole
    conversation tokenized, token for token, but for the named first-word boundary; the answer's ids are its text
    as the tokenizer spells it, then the template's end of turn (and the eos only where the template leaves the
    turn open: SmolLM2's <|im_end|> is plain text for this tokenizer, so it gets the eos)."""
    tok = request.getfixturevalue(which)
    suffix = tokens.answer_suffix(tok)
    assert suffix == ([tok.eos_token_id] if which == "smol_template_tok" else [])
    pair = tokens.encode_pair(tok, HISTORY_IT, CHOSEN, REJECTED, 512, 256)
    for answer, ids in ((CHOSEN, pair.chosen), (REJECTED, pair.rejected)):
        conversation = HISTORY_IT + [{"role": "assistant", "content": answer}]
        pieces = [p for turn in tokens.chat_turns(tok, conversation) for p in turn]
        assert pieces[-1] + suffix == ids
        assert ids[:len(ids) - len(suffix)] == tok(answer, add_special_tokens=False)["input_ids"] + \
            tokens.template_turn_end(tok)
        found = assert_ids_are_the_template_rendering_but_for_first_word_splits(tok, conversation,
                                                                                 pair.prompt + ids, pieces, suffix)
        if which == "smol_template_tok":  # the generation prompt ends with "\n": no boundary to split
            assert found == []
        else:  # the history's "It is me." and, for the chosen answer, "It is 4."
            assert found == [(["▁", "I", "t"], ["▁It"])] * (2 if answer == CHOSEN else 1)


def test_answer_boundary_differs_only_in_how_the_first_word_is_split_and_prompt_ids_match_exactly(ernie_tok):
    """The issue's case, ERNIE's template: "Assistant: It is 4." is ':' '▁It' '▁is' tokenized whole, while the
    training ids are the prompt ':' '▁' then the answer 'I' 't' '▁is'. Harmless, and the only consistent choice:

    - inference asks with exactly the training prompt, which ends in '▁' (the template's "Assistant: "): no
      continuation of it can contain the whole-string '▁It' at that position (those ids do not even start with the
      prompt), so the model has to write "It" as 'I' 't' at inference too, which is what it is trained on;
    - the answer ids are the answer's text as the tokenizer spells it, and decode to the same text;
    - tokenizing whole and splitting at the prompt's length would move the prompt's last token into the answer:
      training would then teach answers to a prompt inference never sends.
    Removing the boundary would mean changing the prompt for both (e.g. no trailing space): not done here."""
    tok = ernie_tok
    prompt = tokens.prompt_ids(tok, MSGS)
    pair = tokens.encode_pair(tok, MSGS, CHOSEN, REJECTED, 512, 256)
    assert pair.prompt == prompt  # exactly, as ids
    assert tok.convert_ids_to_tokens(prompt[-4:]) == ["A", "ssistant", ":", "▁"]
    whole = whole_ids(tok, MSGS + [{"role": "assistant", "content": CHOSEN}], add_generation_prompt=False)
    assert whole[:len(prompt) - 1] == prompt[:-1] and whole[:len(prompt)] != prompt  # ids agree up to the '▁'
    assert tok.convert_ids_to_tokens(pair.chosen[:3]) == ["I", "t", "▁is"]
    assert tok.convert_ids_to_tokens(whole[len(prompt) - 1:len(prompt) + 1]) == ["▁It", "▁is"]
    assert whole[len(prompt):] == pair.chosen[2:]  # after the first word: the same ids, to the end of the turn
    assert tok.decode(pair.chosen) == CHOSEN + "<|end_of_sentence|>" and tok.decode(pair.prompt + pair.chosen) == \
        tok.decode(whole)
    # the rejected answer's first word has no '▁'-joined form in this vocabulary: no difference at all
    assert pair.prompt + pair.rejected == whole_ids(tok, MSGS + [{"role": "assistant", "content": REJECTED}], False)


def test_every_sample_pair_is_the_template_rendering_but_for_first_word_splits(ernie_tok, sample_records):
    """fit_pairs on the real sample records with ERNIE's template: every trained pair's prompt is exactly what
    inference asks with, and prompt + answer differs from the rendering tokenized whole only at named boundaries
    (most answers here start with a word the tokenizer only knows as '▁Word', e.g. '▁The' vs '▁' 'T' 'he')."""
    kept, counts, _ = tokens.fit_pairs(ernie_tok, sample_records[:40], 100_000, 100_000)
    assert len(kept) == 40
    split = 0
    for rec in kept:
        messages = to_messages(rec, keep_system=True)
        ids = rec["token_ids"]
        assert ids["prompt"] == tokens.prompt_ids(ernie_tok, messages)
        for side, answer in (("chosen", rec["response"][0][0]), ("rejected", rec["response"][1][0])):
            conversation = messages + [{"role": "assistant", "content": answer}]
            pieces = [p for turn in tokens.chat_turns(ernie_tok, conversation) for p in turn]
            split += len(assert_ids_are_the_template_rendering_but_for_first_word_splits(
                ernie_tok, conversation, ids["prompt"] + ids[side], pieces))
    assert split > 0  # the boundary is real on this data, and every instance of it is the named one


def test_a_template_that_leaves_the_turn_open_gets_the_eos(tiny_tok, tiny_base, tmp_path):
    tok = with_template(tiny_base, tmp_path / "open", tiny_tok.chat_template.replace("+ '<|end_of_sentence|>'", "+ '\n'"))
    assert tok.apply_chat_template(MSGS[1:3], tokenize=False, add_generation_prompt=False).endswith("help?\n")
    assert tokens.answer_suffix(tok) == [tok.eos_token_id]  # otherwise the model would never learn to stop
    pair = tokens.encode_pair(tok, MSGS, "It is 4.", "The answer is four.", 512, 256)
    assert pair.chosen[-1] == pair.rejected[-1] == tok.eos_token_id


def engine_sequence(tok, rec, max_seq_len, hooked):
    """What PaddleFormers' DPO dataset makes of one record (its own per-example code), with or without our hooks."""
    from paddleformers.datasets.DPODataset import BaseDPODataSet
    from paddleformers.datasets.reader.convertor import convert_dpo_txt_data

    name = "_BaseDPODataSet__postprocess_before_concat"
    saved = getattr(BaseDPODataSet, name)
    if hooked:
        tokens.install_engine_hooks()
    try:
        ds = object.__new__(BaseDPODataSet)  # only the per-example code, not the file readers
        ds.tokenizer, ds.max_seq_len, ds.template_backend = tok, max_seq_len, "jinja"
        ds.split_multi_turn, ds.efficient_eos = False, True
        ds.use_filtered_label_loss, ds.use_attn_mask_startend_row_indices = False, True
        return ds._postprocess_sequence(convert_dpo_txt_data(copy.deepcopy(rec)))
    finally:
        setattr(BaseDPODataSet, name, saved)


def test_the_engine_trains_on_exactly_the_counted_ids(tiny_tok):
    rec = {"id": "r", "system": "Answer briefly.", "src": ["Hi there", "What is 2 + 2?"],
           "tgt": ["Hello! How can I help?"], "response": [["It is 4."], ["Let me think. The answer is 4."]],
           "sort": [1, 0]}
    [kept], counts, _ = tokens.fit_pairs(tiny_tok, [rec], 512, 256)
    ids = kept["token_ids"]
    seq = engine_sequence(tiny_tok, kept, 512, hooked=True)
    p, c, r = ids["prompt"], ids["chosen"], ids["rejected"]
    assert seq.token_ids == p + c[:-1] + [p[-1]] + r[:-1]
    assert [t for t in seq.response_labels if t != -100] == c + r
    assert tiny_tok.convert_ids_to_tokens(c[-1]) == "<|end_of_sentence|>"
    # The engine's own encoding (no hooks) appends the eos after the template's end of turn: the defect fixed here.
    own = engine_sequence(tiny_tok, rec, 512, hooked=False)
    own_chosen = [t for t in own.response_labels if t != -100][:len(c) + 1]
    assert tiny_tok.convert_ids_to_tokens(own_chosen[-2:]) == ["<|end_of_sentence|>", "</s>"]


def test_long_pairs_are_cut_as_trl_does_and_counted(tiny_tok):
    long_q = "Please explain this. " * 60
    history = [{"role": "user", "content": "An early question. " * 20},
               {"role": "assistant", "content": "An early answer. " * 20}]
    msgs = history + [{"role": "user", "content": long_q}]
    chosen, rejected = "Short answer.", "A much longer answer that goes on. " * 30
    assert tokens.encode_pair(tiny_tok, msgs, chosen, rejected, 160, 64).status == "too_long"
    pair = tokens.encode_pair(tiny_tok, msgs, chosen, rejected, 160, 64, truncate=True)
    assert pair.status == "truncated" and pair.total <= 160 and len(pair.prompt) == 64
    gen_prompt = tiny_tok("Assistant: ", add_special_tokens=False)["input_ids"]
    assert pair.prompt[-len(gen_prompt):] == gen_prompt  # the prompt keeps its end: the question and "Assistant: "
    assert pair.cut["prompt"] > 0 and pair.cut["chosen"] == 0 and pair.cut["rejected"] > 0
    end = tiny_tok.convert_tokens_to_ids("<|end_of_sentence|>")
    assert pair.chosen[-1] == end and end not in pair.rejected  # a cut answer is not taught to end at the cut
    # earlier turns go first: a short last turn keeps the prompt whole once the history is dropped
    short = history + [{"role": "user", "content": "Why?"}]
    p2 = tokens.encode_pair(tiny_tok, short, chosen, rejected, 200, 64, truncate=True)
    assert p2.status == "truncated" and p2.cut["prompt"] == len(tokens.prompt_ids(tiny_tok, short)) - len(p2.prompt)
    assert tiny_tok.decode(p2.prompt).startswith("User: Why?")
    # answers cut to the same ids teach nothing: dropped, counted
    same = tokens.encode_pair(tiny_tok, [{"role": "user", "content": "Go on."}], "word " * 200, "word " * 210, 64, 16,
                              truncate=True)
    assert same.status == "identical_after_truncation"


def test_fit_pairs_counts_every_pair(tiny_tok, sample_records):
    long_answer = "This answer goes on and on. " * 60
    recs = sample_records[:6] + [{**r, "id": f"L{k}", "response": [r["response"][0], [long_answer]]}
                                 for k, r in enumerate(sample_records[6:9])]
    for truncate in (False, True):
        kept, counts, cut = tokens.fit_pairs(tiny_tok, recs, 256, 128, truncate)
        assert sum(counts.values()) == len(recs) and len(kept) == sum(counts[s] for s in tokens.TRAINED)
        assert all(len(sum(r["token_ids"].values(), [])) <= 256 for r in kept)
        if truncate:
            assert counts["truncated"] == 3 and cut["rejected_answers_cut"] == 3 and cut["tokens_cut_rejected"] > 0
        else:
            assert counts["too_long"] == 3 and cut["tokens_cut_rejected"] == 0
    assert to_messages(kept[0], True)[-1]["role"] == "user"


def test_keep_chosen_end_never_cuts_the_chosen_answer(tiny_tok):
    """Both answers long: plain truncation cuts both (the chosen one loses its end of turn, so training on it teaches
    the model not to stop); keep_chosen_end keeps the chosen answer whole and cuts only the rejected one, or drops the
    pair (counted) when the chosen answer cannot fit whole."""
    end = tiny_tok.convert_tokens_to_ids("<|end_of_sentence|>")
    msgs = [{"role": "user", "content": "Tell me about rivers."}]
    chosen, rejected = "Rivers carry water to the sea. " * 5, "Rivers are long and wet and they flow. " * 20
    both = tokens.encode_pair(tiny_tok, msgs, chosen, rejected, 160, 32, truncate=True)
    assert both.status == "truncated" and both.cut["chosen"] > 0 and end not in both.chosen
    kept = tokens.encode_pair(tiny_tok, msgs, chosen, rejected, 160, 32, truncate=True, keep_chosen_end=True)
    assert kept.status == "truncated" and kept.cut["chosen"] == 0 and kept.chosen[-1] == end
    assert kept.cut["rejected"] > 0 and end not in kept.rejected and kept.total == 160
    too_long = tokens.encode_pair(tiny_tok, msgs, chosen * 4, rejected * 2, 160, 32, truncate=True,
                                  keep_chosen_end=True)
    assert too_long.status == "chosen_cut"
    recs = [{"id": "a", "src": ["Tell me about rivers."], "tgt": [], "response": [[chosen], [rejected]], "sort": [1, 0]},
            {"id": "b", "src": ["Tell me about rivers."], "tgt": [], "response": [[chosen * 4], [rejected * 2]],
             "sort": [1, 0]}]
    out, counts, cut = tokens.fit_pairs(tiny_tok, recs, 160, 32, truncate=True, keep_chosen_end=True)
    assert [r["id"] for r in out] == ["a"] and counts["chosen_cut"] == 1 and cut["chosen_answers_cut"] == 0
