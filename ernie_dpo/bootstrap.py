"""The paired bootstrap behind every interval of this project (tuned - baseline on the same prompts), and the power
of a comparison: the smallest difference it could detect, and how many prompts a given effect would need. numpy only.
"""
import math

import numpy as np


def bootstrap_draws(baseline, tuned, stat, n_resamples, seed, paired=True):
    """(stat(tuned) - stat(baseline), the n_resamples bootstrap values of that difference): what bootstrap_delta's
    interval and paired_delta's power are read from. Same seed, same resamples (the draws are made in the same
    order as they always were, so the committed intervals do not move)."""
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
    return float(fn(t) - fn(b)), fn(t[ti], axis=1) - fn(b[bi], axis=1)


def bootstrap_delta(baseline, tuned, stat, n_resamples, seed, paired=True):
    """95% percentile bootstrap interval for stat(tuned) - stat(baseline).

    paired (the default, and the design of this pipeline): baseline[i] and tuned[i] answer the same prompt with the
    same per-prompt seed, so each resample draws prompts and takes both replies of each drawn prompt. Most of the
    spread of reply lengths is between prompts (an essay question against a yes/no one), and pairing cancels it;
    resampling the two lists independently (paired=False) counts it twice and gives a wider interval. Both are
    reported by the evaluate stage.
    """
    d, deltas = bootstrap_draws(baseline, tuned, stat, n_resamples, seed, paired)
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return d, float(lo), float(hi)


# Power: a two-sided 5% test detects a true difference of (z_0.975 + z_0.80) standard errors 80% of the time. The
# standard error of a Δ is the SD of its paired bootstrap draws, so an interval that includes 0 can be read as
# "smaller than this, or not there" rather than "no effect".
Z_ALPHA, Z_POWER = 1.96, 0.84


def paired_delta(baseline, tuned, stat, n_resamples, seed):
    """{delta, ci_low, ci_high, mde80} of stat(tuned) - stat(baseline) from one set of paired draws: the interval
    is bootstrap_delta's (same seed, same numbers) and mde80 the smallest difference these prompts detect at 80%
    power, two-sided 5% ((Z_ALPHA + Z_POWER) x the SD of the draws)."""
    d, deltas = bootstrap_draws(baseline, tuned, stat, n_resamples, seed)
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return {"delta": d, "ci_low": float(lo), "ci_high": float(hi),
            "mde80": float((Z_ALPHA + Z_POWER) * deltas.std(ddof=1))}


def prompts_needed(n, mde, effect):
    """Test prompts needed to detect `effect` at 80% power, two-sided 5%, when n prompts detect `mde`: the standard
    error falls as 1/sqrt(n), so n x (mde / |effect|)^2, rounded up. None for no effect to detect."""
    if not effect:
        return None
    return math.ceil(n * (mde / abs(effect)) ** 2)
