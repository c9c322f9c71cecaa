"""Pair diagnostics (ernie_dpo/diagnose.py): log-probabilities under the base model, and the two warnings."""
import numpy as np

from ernie_dpo import diagnose


def test_answer_logps_are_the_models_own_log_probabilities(tiny_base):
    import paddle

    from ernie_dpo.generate import LocalModel

    lm = LocalModel(tiny_base, "cpu")
    ids = lm.tokenizer("User: What is two plus two?\nAssistant: Four.", add_special_tokens=False)["input_ids"]
    prompt, answer = ids[:8], ids[8:]
    total, n = diagnose.answer_logps(lm.model, prompt, answer)
    with paddle.no_grad():
        out = lm.model(input_ids=paddle.to_tensor([ids]))
    logits = (out[0] if isinstance(out, tuple) else out.logits)[0].numpy().astype("float64")
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected = sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(answer))
    assert n == len(answer) and abs(total - expected) < 1e-3 * max(1, abs(expected))


def pairs(margin, n=20):
    return [(-1.0, -1.0 - margin, 50, 120)] * n


def test_trivially_separable_pairs_are_flagged():
    m, warnings, _ = diagnose.summarize(pairs(1.0), [-1.2] * 10, [600] * 20, [500] * 10)
    assert m["share_chosen_already_preferred"] == 1.0 and m["margin_per_token_median"] == 1.0
    assert any(w.startswith("trivially separable") for w in warnings)


def test_off_policy_rejected_answers_are_flagged_by_likelihood_and_by_length():
    # rejected at -3.0 nats/token, the model's own replies at -1.2: 1.8 nats/token apart
    m, warnings, _ = diagnose.summarize(pairs(2.0), [-1.2] * 10, [600] * 20, [500] * 10)
    assert m["rejected_minus_own_reply_logp_per_token"] == -1.8 and any(w.startswith("off-policy:") for w in warnings)
    _, warnings, _ = diagnose.summarize(pairs(0.1), [-1.0] * 10, [3000] * 20, [500] * 10)
    assert [w.split(":")[0] for w in warnings] == ["off-policy length"]  # 6x the model's own replies
    _, warnings, _ = diagnose.summarize(pairs(0.1), [-1.0] * 10, [600] * 20, [500] * 10)
    assert warnings == []
