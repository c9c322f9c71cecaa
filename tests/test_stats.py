"""evaluate's statistics against values computed by hand."""
import pytest

from ernie_dpo.stats import bootstrap_delta, describe, reply_metrics


def test_describe_by_hand():
    d = describe([10, 20, 30, 40, 100], "chars_")
    assert d == {"chars_count": 5, "chars_mean": 40.0, "chars_median": 30.0, "chars_p90": 76.0, "chars_min": 10, "chars_max": 100}
    # p90 by hand: position 0.9 * 4 = 3.6 -> 40 + 0.6 * (100 - 40) = 76


def test_reply_metrics_by_hand():
    replies = [
        {"reply": "abcd", "tokens": 2, "finish_reason": "eos"},
        {"reply": "ab", "tokens": 1, "finish_reason": "eos"},
        {"reply": "x" * 12, "tokens": 8, "finish_reason": "length"},
        {"reply": "", "tokens": 0, "finish_reason": "eos"},
    ]
    m = reply_metrics(replies, max_dec_len=8)
    assert m["replies"] == 4
    assert m["chars_mean"] == 4.5  # (4 + 2 + 12 + 0) / 4
    assert m["chars_median"] == 3.0  # (2 + 4) / 2
    assert m["tokens_mean"] == 2.75 and m["tokens_median"] == 1.5
    assert m["cut_at_max_dec_len_share"] == 0.25 and m["empty_share"] == 0.25 and m["max_dec_len"] == 8


def test_bootstrap_interval_contains_the_point_estimate_and_excludes_zero_for_a_clear_shift():
    baseline = [100 + (i % 7) * 10 for i in range(60)]
    tuned = [40 + (i % 5) * 6 for i in range(60)]
    for stat in ("mean", "median"):
        d, lo, hi = bootstrap_delta(baseline, tuned, stat, 2000, seed=1)
        assert lo <= d <= hi < 0
    d, lo, hi = bootstrap_delta(baseline, tuned, "mean", 2000, seed=1)
    assert d == pytest.approx(sum(tuned) / 60 - sum(baseline) / 60)
    assert bootstrap_delta(baseline, tuned, "mean", 500, seed=3) == bootstrap_delta(baseline, tuned, "mean", 500, seed=3)


def test_bootstrap_interval_covers_zero_when_nothing_changed():
    same = [float(x) for x in range(1, 41)]
    _, lo, hi = bootstrap_delta(same, list(reversed(same)), "median", 2000, seed=0)
    assert lo < 0 < hi
