"""Local inference (ernie_dpo.decode): the lean decode loop against the engine's own forward pass, per-prompt seeds,
batch invariance, stop tokens from the model, nucleus sampling."""
import numpy as np
import pytest

from ernie_dpo import decode
from ernie_dpo.data import to_messages
from ernie_dpo.generate import LocalModel, StopTokenError, stop_tokens
from ernie_dpo.tokens import prompt_ids


@pytest.fixture(scope="module")
def lm(tiny_base):
    return LocalModel(tiny_base, "cpu")


@pytest.fixture(scope="module")
def tests(sample_records):
    # mixed lengths and multi-turn records, as a real test set has
    recs = sorted(sample_records[:40], key=lambda r: len(r["src"]))[-4:] + sample_records[:8]
    return [{"id": r["id"], "messages": to_messages(r, False)} for r in recs]


def full_forward_greedy(model, ids, n):
    """Greedy continuation by recomputing the whole sequence each step (no cache, no batching): the reference."""
    import paddle

    ids = list(ids)
    out = []
    with paddle.no_grad():
        for _ in range(n):
            logits = model(input_ids=paddle.to_tensor([ids]))
            logits = (logits[0] if isinstance(logits, tuple) else logits.logits)[0, -1].numpy()
            out.append(int(np.argmax(logits)))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("prefill_batch", [1, 3])  # 1: the CPU setting; several prompts prefilled together: the GPU's
def test_greedy_decode_loop_equals_the_engines_full_forward(lm, tests, prefill_batch):
    prompts = [prompt_ids(lm.tokenizer, t["messages"]) for t in tests[:5]]
    got = decode.generate(lm.model, prompts, [0] * len(prompts), [], 20, 0.0, 0.7, 3, lm.pad_id, lm.max_len,
                          prefill_batch=prefill_batch)
    for i, p in enumerate(prompts):
        assert got[i] == (full_forward_greedy(lm.model, p, 20), "length"), f"prompt {i} ({len(p)} tokens)"


def test_decode_groups_give_the_same_replies_and_short_prompts_read_a_narrower_cache(lm, tests, monkeypatch):
    """The batch's slots are split into decode.GROUPS groups (on a CPU), each with its own KV cache: greedy replies
    equal to one group's, and in the first decode step each group's cache is as wide as ITS longest prompt
    (+ CHUNK..2 CHUNK - 1 free columns), not as the batch's longest."""
    prompts = [prompt_ids(lm.tokenizer, t["messages"]) for t in tests]
    widths = []
    init = decode.GroupedCache.__init__

    def record(self, batches):
        init(self, batches)
        widths.append([b.cache.capacity for b in batches])

    monkeypatch.setattr(decode.GroupedCache, "__init__", record)
    args = (lm.model, prompts, [0] * len(prompts), [], 12, 0.0, 0.7, 8, lm.pad_id, lm.max_len)
    one = decode.generate(*args, n_groups=1)  # as LocalModel decodes on a GPU
    assert {len(w) for w in widths} == {1}
    widths.clear()
    monkeypatch.setattr(decode, "GROUPS", 4)
    four = decode.generate(*args)
    assert four == one
    longest = sorted((len(p) for p in prompts), reverse=True)[:8]
    assert widths[0] == [decode._round_up(longest[2 * g] + 1) for g in range(4)]  # groups of 2, longest first
    assert widths[0][-1] < widths[0][0]  # the test set's lengths differ enough for this check to mean something


def test_answers_scored_in_the_prefill_equal_a_separate_pass_and_leave_the_replies_unchanged(lm, tests):
    """generate(answers=...) (the length probes' held-out likelihood): each answer is scored in the forward pass that
    prefills its prompt; the sums equal decode.answer_logps' separate pass over prompt + answer, and the sampled
    replies equal those of a run without scoring (the answer's columns are dropped from the cache)."""
    prompts = [prompt_ids(lm.tokenizer, t["messages"]) for t in tests]
    answers = {i: lm.tokenizer("A short answer number %d, as a reference." % i, add_special_tokens=False)["input_ids"]
               for i in range(0, len(prompts), 2)}  # every other prompt: the others are prefilled as usual
    args = (lm.model, prompts, [decode.prompt_seed(3, str(i)) for i in range(len(prompts))], [], 16, 0.7, 0.7, 4,
            lm.pad_id, lm.max_len)
    plain = decode.generate(*args)
    replies, scores = decode.generate(*args, answers=answers)
    assert replies == plain
    assert sorted(scores) == sorted(answers)
    for i, a in answers.items():
        total, n = decode.answer_logps(lm.model, prompts[i], a)
        assert scores[i][1] == n == len(a)
        assert abs(scores[i][0] - total) < 1e-4 * max(1.0, abs(total)), f"prompt {i}: {scores[i][0]} vs {total}"
    assert len({round(s, 3) for s, _ in scores.values()}) > 1  # the answers score differently: a real comparison


def test_replies_do_not_depend_on_batch_size_or_neighbours(lm, tests):
    kw = dict(top_p=0.7, temperature=0.7, max_dec_len=40, seed=7)
    one = lm.answer(tests, batch_size=1, **kw)
    eight = lm.answer(tests, batch_size=8, **kw)
    alone = lm.answer(tests[3:4], batch_size=1, **kw)  # the same prompt without any neighbour
    differ = [i for i in one if one[i]["reply"] != eight[i]["reply"]]
    # float32 sums of another batch shape may differ in the last bits; on this CPU none flipped a sampled token
    assert differ == [], f"{len(differ)} of {len(one)} replies differ between batch 1 and batch 8"
    assert alone[tests[3]["id"]] == one[tests[3]["id"]]
    other_seed = lm.answer(tests, batch_size=8, **{**kw, "seed": 8})
    assert sum(other_seed[i]["reply"] != one[i]["reply"] for i in one) >= len(one) // 2  # seeds matter


def test_stop_tokens_come_from_the_model_and_unknown_ones_are_errors(lm, tiny_base):
    stops = stop_tokens(lm.tokenizer, tiny_base)
    assert "</s>" in stops.values() and "<|end_of_sentence|>" in stops.values()  # eos + the template's end of turn
    with pytest.raises(StopTokenError, match="not one token"):
        stop_tokens(lm.tokenizer, tiny_base, extra=["<|no_such_token|>"])


def test_nucleus_sampling_keeps_only_the_top_p_mass():
    import paddle

    probs = np.array([0.5, 0.3, 0.15, 0.05])
    u = np.random.Generator(np.random.PCG64(0)).random(4000)
    rows = paddle.to_tensor(np.tile(np.log(probs), (4000, 1)).astype("float32"))
    assert set(decode.sample_tokens(rows, 1.0, 0.7, u).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: two tokens
    assert decode.sample_tokens(rows[:3], 0.0, 0.7, u[:3]).tolist() == [0, 0, 0]  # temperature 0 is greedy
    counts = np.bincount(decode.sample_tokens(rows, 1.0, 1.0, u), minlength=4) / 4000
    assert np.abs(counts - probs).max() < 0.03
    assert {decode.sample_token(np.log(probs), 1.0, 0.7, x) for x in u[:500]} == {0, 1}


def test_sampling_on_the_device_agrees_with_the_whole_vocabulary_on_the_host():
    """sample_tokens looks at the 64 most probable tokens where the logits are; sample_token sorts the whole
    vocabulary on the host. Same uniforms, same tokens -- and a flat row (nucleus beyond 64 tokens) falls back."""
    import paddle

    rng = np.random.Generator(np.random.PCG64(1))
    logits = (rng.standard_normal((6, 1000)) * 4).astype("float32")
    logits[5] = 0.0  # flat: the nucleus holds 700 tokens
    u = rng.random(6)
    device = decode.sample_tokens(paddle.to_tensor(logits), 0.7, 0.7, u)
    host = [decode.sample_token(logits[r], 0.7, 0.7, u[r]) for r in range(6)]
    assert device.tolist() == host
    assert device[5] >= 64 or u[5] < 64 / 700  # drawn from the whole nucleus, not from 64 candidates


def test_each_block_of_the_mask_is_expanded_once_per_forward_pass():
    """Every layer gets the same mask tensor but slices it anew: the expansion is keyed on the tensor itself."""
    import paddle

    src = paddle.zeros([2, 1, 5, 8])
    a = decode._expanded_mask(src[:, :, :, :6], src, 0, 5, 6, 2, 3)
    b = decode._expanded_mask(src[:, :, :, :6], src, 0, 5, 6, 2, 3)  # the next layer: a new slice of the same mask
    assert a is b and a.shape == [2, 2, 15, 6]
    other = paddle.zeros([2, 1, 5, 8])  # the next forward pass
    assert decode._expanded_mask(other[:, :, :, :6], other, 0, 5, 6, 2, 3) is not a
    # the cached causal mask of a mask-less prefill comes back for another model with another head layout
    causal = decode._causal_mask(5, 5, paddle.float32)
    assert decode._causal_mask(5, 5, paddle.float32) is causal
    first = decode._expanded_mask(causal, causal, 0, 5, 5, 2, 3)
    second = decode._expanded_mask(causal, causal, 0, 5, 5, 3, 1)
    assert first.shape == [1, 2, 15, 5] and second.shape == [1, 3, 5, 5]


def test_the_cpu_layers_give_the_engines_numbers(lm, tests):
    """fast_cpu's rotary embedding (q and k made contiguous, cos / sin expanded once per forward pass) gives the
    engine's own function's outputs AND gradients bit for bit, in training (gradients on, the engine's transposed
    views as inputs) and without autograd; the fused RMSNorm (no gradient recorded only) the engine's logits."""
    import paddle
    from paddleformers.transformers.ernie4_5 import modeling as ernie
    from paddleformers.transformers.llama import modeling as llama

    from ernie_dpo import fast_cpu

    assert fast_cpu._inference  # LocalModel installed them
    rng = np.random.default_rng(0)

    def transposed(x):  # [batch, seq, heads, dim] projections seen as [batch, heads, seq, dim], as the engine does
        return x.transpose([0, 2, 1, 3])

    cos, sin = (paddle.to_tensor(rng.standard_normal([2, 7, 16]).astype("float32")) for _ in range(2))
    for module in (ernie, llama):  # interleaved and half-split rotary layouts
        own_fn = fast_cpu._original[module.__name__ + ".apply_rotary_pos_emb"]
        assert module.apply_rotary_pos_emb is not own_fn  # patched in training too
        q, k = (paddle.to_tensor(rng.standard_normal(s).astype("float32"), stop_gradient=False)
                for s in ([2, 7, 4, 16], [2, 7, 2, 16]))
        weights = [paddle.to_tensor(rng.standard_normal(transposed(t).shape).astype("float32")) for t in (q, k)]
        results = []
        for fn in (own_fn, module.apply_rotary_pos_emb):
            out = fn(transposed(q), transposed(k), cos, sin)
            sum((o * w).sum() for o, w in zip(out, weights)).backward()
            results.append([t.numpy() for t in out] + [q.grad.numpy(), k.grad.numpy()])
            q.clear_gradient()
            k.clear_gradient()
        for a, b in zip(*results):  # outputs and gradients: equal bit for bit
            assert np.array_equal(a, b)
        assert np.abs(results[1][2]).sum() > 0  # a real gradient
        with paddle.no_grad():
            fast = module.apply_rotary_pos_emb(transposed(q), transposed(k), cos, sin)
            # the same pass (the same cos): the expansion is reused
            again = module.apply_rotary_pos_emb(transposed(q) * 2, transposed(k), cos, sin)
        for a, b in zip(results[0][:2], fast):
            assert np.array_equal(a, b.numpy())
        np.testing.assert_allclose(again[0].numpy(), 2 * fast[0].numpy(), rtol=1e-5, atol=1e-5)
    ids = paddle.to_tensor([prompt_ids(lm.tokenizer, tests[0]["messages"])])
    engine_logits = lm.model(input_ids=ids)
    with paddle.no_grad():
        fast_logits = lm.model(input_ids=ids)
    get = lambda out: (out[0] if isinstance(out, tuple) else out.logits).numpy()  # noqa: E731
    np.testing.assert_allclose(get(fast_logits), get(engine_logits), rtol=1e-4, atol=1e-4)


def test_a_long_prompt_prefills_within_the_mask_budget_with_the_same_logits(lm, monkeypatch):
    """(31.5) Prefill attends in query blocks; their expanded masks are kept across layers only within
    MASK_CACHE_BYTES, so a long prompt holds one block at a time past it (memory linear, not quadratic, in the
    prompt length) -- with exactly the logits of the cached path."""
    import paddle

    ids = [(7 * k) % 500 + 3 for k in range(300)]  # 300 tokens: 5 query blocks of 64 below

    def last_logits():
        decode._MASK.clear()
        with paddle.no_grad():
            out = lm.model(input_ids=paddle.to_tensor([ids]),
                           attention_mask=paddle.ones([1, len(ids)], dtype="int64"))
        return (out[0] if isinstance(out, tuple) else out.logits)[0, -1].numpy(), dict(decode._MASK)

    monkeypatch.setattr(decode, "QUERY_BLOCK", 64)
    cached, kept = last_logits()
    assert len([k for k in kept if isinstance(k, tuple)]) == 5  # every block kept: within the default budget
    monkeypatch.setattr(decode, "MASK_CACHE_BYTES", 1)
    bounded, kept = last_logits()
    assert [k for k in kept if isinstance(k, tuple)] == [] and kept["bytes"] == 0  # none held past the budget
    assert np.array_equal(cached, bounded)
