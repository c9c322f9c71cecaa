"""The recipe's experiment series (exp0-exp4), scaled to the current profile.

The recipe ("ERNIE DPO best practices", ERNIE-4.5-0.3B, global batch 1):
    exp0  the base model, no training (the baseline)
    exp1  rejected about as long as the baseline's mean reply AND rejected >= 1.2x chosen   614 pairs, 614 steps, warmup 50
    exp2  rejected >= 1.2x chosen, sampled to exp1's size                                   614 pairs, 614 steps, warmup 50
    exp3  rejected >= 2x chosen, every passing pair, max_steps = one pass over the pairs
    exp4  exp3 with twice the steps and warmup = 10% of the steps                          1804 pairs, 3608 steps, warmup 360

"Steps = pair count" is one epoch at the recipe's global batch of 1; on another batch size one epoch is
ceil(pairs / global_batch_size) steps, so the demo (batch 8) trains the same number of epochs, not 8x as many.
exp1-exp3 keep the profile's train.warmup_steps (the recipe used 50 for all three).

Every experiment sets ALL the keys it varies (never "whatever the workspace had"): with Hydra, `dvc exp run -S` composes
params.yaml afresh from conf/ + these overrides, so nothing from an earlier experiment can leak into the next one.
"""
import math

from .data import select_pairs

NAMES = ("exp1", "exp2", "exp3", "exp4")


def count_pairs(pool, baseline_mean, tolerance):
    """Pairs each training-set variant would get from this pool (same code as the trainset stage)."""
    return {
        "near_baseline": len(select_pairs(pool, "near_baseline", 1.2, baseline_mean, tolerance)),
        "ratio_1.2": len(select_pairs(pool, "ratio", 1.2)),
        "ratio_2": len(select_pairs(pool, "ratio", 2.0)),
    }


def epoch_steps(pairs, global_batch_size):
    return max(1, math.ceil(pairs / global_batch_size))


def plan(counts, global_batch_size, warmup_steps):
    """{experiment name: {param: value}} for `dvc exp run -n <name> -S param=value ...`."""
    if counts["near_baseline"] == 0:
        raise ValueError("no training pair has a rejected answer near the baseline's mean length and >= 1.2x chosen; "
                         "raise trainset.baseline_tolerance")
    if counts["ratio_2"] == 0:
        raise ValueError("no training pair has rejected >= 2x chosen")
    n1, n3 = counts["near_baseline"], counts["ratio_2"]
    s1, s3 = epoch_steps(n1, global_batch_size), epoch_steps(n3, global_batch_size)
    return {
        "exp1": {"trainset.strategy": "near_baseline", "trainset.min_ratio": 1.2, "trainset.size": 0,
                 "train.max_steps": s1, "train.warmup_steps": warmup_steps},
        "exp2": {"trainset.strategy": "ratio", "trainset.min_ratio": 1.2, "trainset.size": n1,
                 "train.max_steps": s1, "train.warmup_steps": warmup_steps},
        "exp3": {"trainset.strategy": "ratio", "trainset.min_ratio": 2.0, "trainset.size": 0,
                 "train.max_steps": s3, "train.warmup_steps": warmup_steps},
        "exp4": {"trainset.strategy": "ratio", "trainset.min_ratio": 2.0, "trainset.size": 0,
                 "train.max_steps": 2 * s3, "train.warmup_steps": max(1, int(0.1 * 2 * s3))},
    }


def overrides(params):
    """`-S key=value` arguments, in a stable order."""
    out = []
    for key, value in params.items():
        out += ["-S", f"{key}={value}"]
    return out
