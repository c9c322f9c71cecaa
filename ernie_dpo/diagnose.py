"""Pair diagnostics before training: what the base model makes of the DPO pairs, measured instead of assumed.

Per pair, with the exact token ids training will use (tokens.encode_pair): the log-probability per token of the
chosen and the rejected answer under the base model, their difference (how "easy" the pair already is), and the
lengths in tokens. And the recipe's idea that rejected answers should be "close to the original model", measured:
the rejected answers' log-probability per token and length against the base model's OWN replies to the test
prompts (data/infer/baseline.jsonl). Two warnings come out of it (thresholds below):
- trivially separable: the base model already prefers nearly every chosen answer by a wide margin; DPO's loss then
  falls to ~0 within a few steps while the replies barely change (a question every DPO tool's users ask).
- off-policy: the rejected answers look nothing like the model's own replies (far less likely per token, or of a
  very different length); pushing them down says little about what the model actually writes.
"""
import numpy as np

EASY_SHARE, EASY_MARGIN = 0.9, 0.5  # >= 90% of pairs preferred already, median margin >= 0.5 nats/token
OFF_POLICY_LOGP = 1.0  # rejected answers >= 1 nat/token less likely than the model's own replies
LENGTH_RATIO = (0.5, 2.0)  # rejected answers' mean length outside [0.5, 2] x the model's own replies'


# the forward pass that scores an answer lives with the other model passes (decode.answer_logps): the length probes
# inside the training process use it too
from .decode import answer_logps  # noqa: E402,F401


def summarize(pairs, replies, rejected_chars, reply_chars):
    """pairs: [(chosen logp/token, rejected logp/token, chosen tokens, rejected tokens)]; replies: [logp/token of the
    base model's own replies]. Returns (metrics dict, warnings list)."""
    c, r, ct, rt = (np.asarray(x, dtype=float) for x in zip(*pairs))
    margin = c - r
    m = {
        "pairs_scored": len(pairs),
        "chosen_logp_per_token_mean": round(float(c.mean()), 4),
        "rejected_logp_per_token_mean": round(float(r.mean()), 4),
        "margin_per_token_mean": round(float(margin.mean()), 4),
        "margin_per_token_median": round(float(np.median(margin)), 4),
        "share_chosen_already_preferred": round(float((margin > 0).mean()), 4),
        "chosen_tokens_mean": round(float(ct.mean()), 1),
        "rejected_tokens_mean": round(float(rt.mean()), 1),
        "own_replies_scored": len(replies),
        "own_reply_logp_per_token_mean": round(float(np.mean(replies)), 4),
        "rejected_minus_own_reply_logp_per_token": round(float(r.mean() - np.mean(replies)), 4),
        "rejected_chars_mean": round(float(np.mean(rejected_chars)), 1),
        "own_reply_chars_mean": round(float(np.mean(reply_chars)), 1),
    }
    m["rejected_to_own_reply_length_ratio"] = round(m["rejected_chars_mean"] / max(m["own_reply_chars_mean"], 1), 3)
    warnings = []
    if m["share_chosen_already_preferred"] >= EASY_SHARE and m["margin_per_token_median"] >= EASY_MARGIN:
        warnings.append(f"trivially separable: the base model already prefers the chosen answer in "
                        f"{100 * m['share_chosen_already_preferred']:.0f}% of pairs, by a median "
                        f"{m['margin_per_token_median']:.2f} nats/token; DPO's loss will fall fast while replies barely "
                        "change. Harder pairs (rejected answers closer to the chosen) teach more.")
    if m["rejected_minus_own_reply_logp_per_token"] <= -OFF_POLICY_LOGP:
        warnings.append(f"off-policy: the rejected answers are {-m['rejected_minus_own_reply_logp_per_token']:.2f} "
                        "nats/token less likely under the base model than its own replies: they look nothing like "
                        "what it writes (the recipe wants rejected answers close to the model's own).")
    ratio = m["rejected_to_own_reply_length_ratio"]
    if not LENGTH_RATIO[0] <= ratio <= LENGTH_RATIO[1]:
        warnings.append(f"off-policy length: the rejected answers average {m['rejected_chars_mean']:.0f} chars, "
                        f"{ratio:.2f}x the base model's own replies ({m['own_reply_chars_mean']:.0f}); the recipe's "
                        "near_baseline strategy keeps them close (trainset.strategy=near_baseline).")
    return m, warnings, margin
