"""Length statistics, reply-quality signs (refusals, repeated phrases), a paired bootstrap for 'tuned minus
baseline' with its power, and the verdict that tells "shorter" from "shorter because broken". numpy only."""
import math
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


# the paired bootstrap and its power live in their own module: the length probes inside the training process use
# them too, and the model stages should not depend on this file's quality measures
from .bootstrap import Z_ALPHA, Z_POWER, bootstrap_delta, bootstrap_draws, paired_delta, prompts_needed  # noqa: E402,F401


def loops(text, min_chars=20, times=3):
    """True when one sentence (or line) of at least min_chars characters occurs `times` times or more in a reply:
    the repetition loop a small model falls into at temperature 0.7, which makes a reply long without making it an
    answer. Reply length alone cannot tell a loop from a long answer; this share can."""
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) >= min_chars]
    return bool(sentences) and Counter(sentences).most_common(1)[0][1] >= times


# ------------------------------------------------------------------------------------------ is it still an answer?
# A model tuned to be brief can get there by refusing or by babbling a short phrase ("I'm sorry, I'm sorry. I'm
# sorry."): shorter, and no answer. These per-reply signs are counted for baseline and tuned alike, so what matters
# is their change (tuned - baseline on the same prompts), not their absolute level.

# Apology / refusal openers, English and Chinese, matched case-insensitively. Kept short on purpose: each one is a
# way a reply declines. Sympathy is not refusal: "I'm sorry to hear that" / "I'm sorry for your loss" (很遗憾听到)
# open many helpful answers and are left out.
REFUSAL_MARKERS = [
    r"\bi(?:'m| am) sorry\b(?! to hear| for your)", r"\bi apologi[sz]e\b", r"\bi (?:cannot|can't|can not)\b(?! wait)",
    r"\bi(?:'m| am) (?:not able|unable)\b", r"\bas an ai\b", r"\bas a language model\b",
    r"抱歉(?!听到)", r"对不起", r"很遗憾(?!听到)", r"我无法", r"我不能", r"作为一个?(?:ai|人工智能)",
]
_REFUSAL = re.compile("|".join(REFUSAL_MARKERS), re.IGNORECASE)
# A refusal says so at once: a marker within the reply's first REFUSAL_HEAD_CHARS characters. That covers the whole
# of a short reply, and leaves "... I cannot stress enough ..." deep inside a long answer alone.
REFUSAL_HEAD_CHARS = 100


def is_refusal(text):
    """True when the reply opens (first REFUSAL_HEAD_CHARS characters) with an apology or a refusal marker."""
    return bool(_REFUSAL.search(text[:REFUSAL_HEAD_CHARS].replace("\u2019", "'")))


# Chinese / Japanese characters: text made mostly of them has no spaces between words, so it is cut into characters
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"\w+(?:'\w+)?")
CJK_SHARE = 0.3          # share of CJK characters among a reply's letters above which it is read character by character
WORD_NGRAM, CHAR_NGRAM = 3, 4  # 3 words or 4 Chinese characters: the length of a short phrase


def units(text):
    """(units, n): lower-cased words and n=WORD_NGRAM for space-separated text; characters (punctuation and spaces
    dropped) and n=CHAR_NGRAM when CJK characters make up CJK_SHARE or more of the letters. Punctuation never counts,
    so "sorry," and "sorry." are the same word."""
    letters = [c for c in text if c.isalnum()]
    if letters and len(_CJK.findall(text)) / len(letters) >= CJK_SHARE:
        return letters, CHAR_NGRAM
    return _WORD.findall(text.lower().replace("\u2019", "'")), WORD_NGRAM


def ngrams(seq, n):
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def repeated_ngram_share(text, n=None):
    """Share of the reply's n-grams that repeat an earlier one (0 = every phrase new; "I'm sorry, I'm sorry. I'm
    sorry." = 0.5). n: WORD_NGRAM words or CHAR_NGRAM characters (see units) unless given. 0 for a reply too short
    to have an n-gram: a one-word answer repeats nothing."""
    seq, default_n = units(text)
    grams = ngrams(seq, n or default_n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


# A reply is repetitive when this share of its short phrases are repeats. A phrase said three times is at 0.5 ("I'm
# sorry, I'm sorry. I'm sorry.") to 0.6 ("The answer is 4." x 3), a sentence loop near 1. Real answers stay below:
# the chosen answers of data/real/dpo_en_demo.json have median 0.03, 99th percentile 0.30 and maximum 0.35 (an
# ASCII table, a list of rephrasings), their rejected ones maximum 0.41 (1 of 300 at 0.4 or more).
REPETITIVE_SHARE = 0.4


def repetitive(text):
    return repeated_ngram_share(text) >= REPETITIVE_SHARE


def distinct2(text):
    """Distinct-2: unique bigrams / bigrams (words, or characters for CJK text, as in units); 1.0 when every pair of
    neighbours is new, and for a reply with no bigram (one word: nothing to repeat)."""
    seq, _ = units(text)
    grams = ngrams(seq, 2)
    return len(set(grams)) / len(grams) if grams else 1.0


def quality_values(replies):
    """Per-reply quality signs, in reply order, for the paired intervals of the evaluate stage: 0/1 flags (their
    mean is a share) and distinct-2."""
    texts = [r["reply"] for r in replies]
    return {
        "refusal_share": [float(is_refusal(t)) for t in texts],
        "repetitive_share": [float(repetitive(t)) for t in texts],
        "distinct2_mean": [distinct2(t) for t in texts],
        "empty_share": [float(not t.strip()) for t in texts],
        "looping_share": [float(loops(t)) for t in texts],
    }


def reply_metrics(replies, max_dec_len):
    """The recipe's numbers for one model's replies: character lengths (what the recipe reports), token lengths,
    and the signs of a broken model (replies cut at max_dec_len, empty, looping, refusing, repeating a short phrase,
    and distinct-2)."""
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
    # is a reply still an answer? (a short apology loop is shorter, and no answer)
    q = quality_values(replies)
    out["refusal_share"] = round(float(np.mean(q["refusal_share"])), 4)
    out["repetitive_share"] = round(float(np.mean(q["repetitive_share"])), 4)
    out["distinct2_mean"] = round(float(np.mean(q["distinct2_mean"])), 4)
    out["max_dec_len"] = int(max_dec_len)
    return out


# ------------------------------------------------------------------------------------------ the verdict
# "Shorter" needs a length interval entirely below 0 AND no sign that the replies got worse. A quality sign counts
# against the tuned model only when it moved by more than its limit AND its 95% interval excludes 0: the change is
# both large enough to matter and real. Shares are fractions of replies; distinct-2 a fraction of bigrams.
MAX_SHARE_RISE = 0.10      # refusal, repetitive, empty and looping share: up by at most 0.10 (10 points of replies)
MAX_DISTINCT2_DROP = 0.10  # distinct-2: down by at most 0.10
MAX_NLL_RISE = 0.10        # held-out chosen answers' per-token NLL (nats): up by at most 0.1 nats/token

QUALITY_CHECKS = [  # (key of the Δ, +1 = worse when up / -1 = worse when down, limit, what it means)
    ("refusal_share", +1, MAX_SHARE_RISE, "more replies refuse or apologize"),
    ("repetitive_share", +1, MAX_SHARE_RISE, "more replies repeat a short phrase"),
    ("distinct2_mean", -1, MAX_DISTINCT2_DROP, "fewer distinct word pairs (distinct-2)"),
    ("empty_share", +1, MAX_SHARE_RISE, "more empty replies"),
    ("looping_share", +1, MAX_SHARE_RISE, "more replies loop on a sentence"),
]


def _number(x):
    """A real number? Metrics read back from `dvc exp show` may be None, NaN or the string 'None'."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def length_verdict(delta, likelihood=None):
    """(verdict, reasons) for one tuned-vs-baseline comparison.

    delta: the evaluate stage's "delta" (chars_mean/_median with _ci_low/_ci_high; the quality Δs QUALITY_CHECKS
    names, each with _ci_low/_ci_high). likelihood (optional): {"delta_nll_per_token", "..._ci_low", "..._ci_high"},
    tuned - base per-token NLL of held-out chosen answers, when a stage measured it.
    verdict: "shorter" (a length interval below 0, none above, quality held), "shorter but degraded" (below 0, and
    a quality sign moved past its limit), "longer" (a length interval above 0, none below), "mixed" (the median's
    and the mean's intervals on opposite sides of 0: most replies shorter, a few much longer, or the reverse), or
    "no detectable change". reasons say why, including what could not be checked (older metrics without the quality
    Δs; no held-out likelihood).
    """
    reasons, degraded, missing = [], False, []
    for key, sign, limit, what in QUALITY_CHECKS:
        d, lo, hi = (delta.get(f"{key}{s}") for s in ("", "_ci_low", "_ci_high"))
        if not all(_number(x) for x in (d, lo, hi)):
            missing.append(key)
        elif sign * d > limit and (lo > 0 if sign > 0 else hi < 0):
            degraded = True
            reasons.append(f"{key} {d:+.2f} [{lo:+.2f}, {hi:+.2f}]: {what}")
    if likelihood:
        d, lo, hi = (likelihood.get(f"delta_nll_per_token{s}") for s in ("", "_ci_low", "_ci_high"))
        if all(_number(x) for x in (d, lo, hi)) and d > MAX_NLL_RISE and lo > 0:
            degraded = True
            reasons.append(f"delta_nll_per_token {d:+.3f} [{lo:+.3f}, {hi:+.3f}] nats: held-out chosen answers "
                           "became less likely")
    if missing:
        reasons.append(f"quality not checked: no interval for {', '.join(missing)}")
    if not likelihood:
        reasons.append("held-out likelihood not checked (no likelihood.* from the train stage)")
    def bound(stat, end):
        x = delta.get(f"chars_{stat}_ci_{end}")
        return x if _number(x) else math.nan  # nan < 0 and nan > 0 are both False: a missing interval decides nothing

    below = [s for s in ("median", "mean") if bound(s, "high") < 0]
    above = [s for s in ("median", "mean") if bound(s, "low") > 0]
    if below and above:  # e.g. most replies shorter but a few running away: the recipe's exp3 pattern
        reasons.insert(0, f"{below[0]} length interval below 0 but {above[0]} interval above 0")
        return "mixed", reasons
    if below:
        reasons.insert(0, f"{' and '.join(below)} length interval below 0")
        return ("shorter but degraded" if degraded else "shorter"), reasons
    if above:
        reasons.insert(0, f"{' and '.join(above)} length interval above 0")
        return "longer", reasons
    reasons.insert(0, "both length intervals include 0")
    return "no detectable change", reasons
