"""The token ids the engine trains on (ernie_dpo.tokens): targets that end as the chat template ends a turn, long
pairs cut (truncate) or dropped and counted, and the engine's own dataset code training on exactly those ids."""
import copy
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


@pytest.mark.parametrize("which", ["tiny_tok", "ernie_tok"])
def test_targets_end_exactly_as_the_chat_template_ends_a_turn(which, request):
    tok = request.getfixturevalue(which)
    assert tok.convert_ids_to_tokens(tokens.template_turn_end(tok)) == ["<|end_of_sentence|>"]
    assert tokens.answer_suffix(tok) == []  # the template closes the turn: no eos (</s>) appended after it
    pair = tokens.encode_pair(tok, MSGS, "It is 4.", "Let me think about it. The answer is 4.", 512, 256)
    assert pair.status == "fits"
    for answer, ids in (("It is 4.", pair.chosen), ("Let me think about it. The answer is 4.", pair.rejected)):
        whole = tok.apply_chat_template(MSGS + [{"role": "assistant", "content": answer}], tokenize=False,
                                        add_generation_prompt=False)
        assert tok.decode(pair.prompt + ids) == whole
        assert whole.endswith(answer + "<|end_of_sentence|>")


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
