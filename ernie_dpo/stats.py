"""Length statistics and a bootstrap for 'tuned minus baseline'. numpy only."""
import re
from collections import Counter

import numpy as np

# sentence ends in English and Chinese, and line breaks
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s*|\n+")


def describe(lengths, prefix):
    """count / mean / median / p90 / min / max of a list of lengths, keys prefixed (e.g. 'chosen_chars_')."""
    a = np.asarray(lengths, dtype=float)
    if a.size == 0:
        raise ValueError(f"no values to describe for {prefix!r}")
    return {
        f"{prefix}count": int(a.size),
        f"{prefix}mean": round(float(a.mean()), 2),
        f"{prefix}median": round(float(np.median(a)), 2),
        f"{prefix}p90": round(float(np.percentile(a, 90)), 2),
        f"{prefix}min": int(a.min()),
        f"{prefix}max": int(a.max()),
    }


def bootstrap_delta(baseline, tuned, stat, n_resamples, seed, paired=True):
    """95% percentile bootstrap interval for stat(tuned) - stat(baseline).

    paired (the default, and the design of this pipeline): baseline[i] and tuned[i] answer the same prompt with the
    same per-prompt seed, so each resample draws prompts and takes both replies of each drawn prompt. Most of the
    spread of reply lengths is between prompts (an essay question against a yes/no one), and pairing cancels it;
    resampling the two lists independently (paired=False) counts it twice and gives a wider interval. Both are
    reported by the evaluate stage.
    """
    rng = np.random.default_rng(seed)
    b = np.asarray(baseline, dtype=float)
    t = np.asarray(tuned, dtype=float)
    if b.size == 0 or t.size == 0:
        raise ValueError("bootstrap_delta: no replies to compare")
    if paired and b.size != t.size:
        raise ValueError(f"bootstrap_delta: a paired interval needs one tuned reply per baseline reply "
                         f"({b.size} baseline, {t.size} tuned)")
    fn = {"mean": np.mean, "median": np.median}[stat]
    bi = rng.integers(0, b.size, size=(n_resamples, b.size))
    ti = bi if paired else rng.integers(0, t.size, size=(n_resamples, t.size))
    deltas = fn(t[ti], axis=1) - fn(b[bi], axis=1)
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return float(fn(t) - fn(b)), float(lo), float(hi)


def loops(text, min_chars=20, times=3):
    """True when one sentence (or line) of at least min_chars characters occurs `times` times or more in a reply:
    the repetition loop a small model falls into at temperature 0.7, which makes a reply long without making it an
    answer. Reply length alone cannot tell a loop from a long answer; this share can."""
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) >= min_chars]
    return bool(sentences) and Counter(sentences).most_common(1)[0][1] >= times


def reply_metrics(replies, max_dec_len):
    """The recipe's numbers for one model's replies: character lengths (what the recipe reports), token lengths,
    and the signs of a broken model (replies cut at max_dec_len, empty replies)."""
    chars = [len(r["reply"]) for r in replies]
    tokens = [r["tokens"] for r in replies if r["tokens"] is not None]  # None: a server sent no usage
    out = {}
    out.update({k.replace("chars_count", "replies"): v for k, v in describe(chars, "chars_").items()})
    t = describe(tokens, "tokens_") if tokens else {}
    out.update({k: t.get(k) for k in ("tokens_mean", "tokens_median", "tokens_p90")})
    out["tokens_unknown"] = len(replies) - len(tokens)
    out["cut_at_max_dec_len_share"] = round(sum(r["finish_reason"] == "length" for r in replies) / len(replies), 4)
    out["empty_share"] = round(sum(not r["reply"].strip() for r in replies) / len(replies), 4)
    out["looping_share"] = round(sum(loops(r["reply"]) for r in replies) / len(replies), 4)
    out["max_dec_len"] = int(max_dec_len)
    return out
