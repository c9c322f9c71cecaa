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


def test_a_paired_interval_sees_a_consistent_shift_that_the_spread_between_prompts_hides_from_an_unpaired_one():
    # prompts differ a lot (20 to 3000 chars), and every tuned reply is 15% shorter than the baseline's on its prompt:
    # pairing cancels the spread between prompts, independent resampling does not
    baseline = [20 + (i * 37) % 60 * 50 for i in range(60)]
    tuned = [0.85 * b for b in baseline]
    for stat in ("mean", "median"):
        d, lo, hi = bootstrap_delta(baseline, tuned, stat, 2000, seed=1)
        _, ulo, uhi = bootstrap_delta(baseline, tuned, stat, 2000, seed=1, paired=False)
        assert lo <= d <= hi < 0, (stat, lo, d, hi)
        assert ulo < 0 < uhi, (stat, ulo, uhi)


def test_a_paired_interval_needs_one_tuned_reply_per_baseline_reply():
    with pytest.raises(ValueError, match="one tuned reply per baseline reply"):
        bootstrap_delta([1, 2, 3], [1, 2], "mean", 100, seed=0)
    with pytest.raises(ValueError, match="no replies"):
        bootstrap_delta([], [], "mean", 100, seed=0, paired=False)


def test_a_reply_that_repeats_a_sentence_is_counted_as_looping_in_english_and_chinese():
    from ernie_dpo.stats import loops
    para = "The bridge could also have a positive impact on the local economy. "
    assert loops("Intro sentence here, long enough. " + para * 3)
    assert not loops("Intro sentence here, long enough. " + para * 2)
    assert not loops("Yes. Yes. Yes. Yes.")                       # short sentences are not loops
    zh = "这座桥可能会对当地经济产生积极的影响，并带来更多就业机会。"
    assert loops(zh * 3) and not loops(zh + "交通效率也会因此提高很多，通勤时间会明显缩短。")
    assert loops("- the same long list item repeated again\n" * 3)
    m = reply_metrics([{"reply": para * 3, "tokens": 9, "finish_reason": "length"},
                       {"reply": "A short answer that ends.", "tokens": 5, "finish_reason": "eos"}], max_dec_len=9)
    assert m["looping_share"] == 0.5


def test_reply_metrics_count_refusals_short_repeats_and_distinct_pairs():
    replies = [{"reply": "I'm sorry, I'm sorry. I'm sorry.", "tokens": 9, "finish_reason": "eos"},
               {"reply": "Paris is the capital of France.", "tokens": 7, "finish_reason": "eos"}]
    m = reply_metrics(replies, max_dec_len=16)
    assert m["refusal_share"] == 0.5 and m["repetitive_share"] == 0.5
    # distinct-2: 2 of the apology's 5 word pairs are new (i'm sorry, sorry i'm), all 5 of the answer's: (0.4 + 1) / 2
    assert m["distinct2_mean"] == 0.7


def test_paired_delta_is_bootstrap_delta_s_interval_with_the_detectable_difference_from_the_same_draws():
    import numpy as np

    from ernie_dpo.stats import bootstrap_draws, paired_delta

    baseline = [20 + (i * 37) % 60 * 50 for i in range(60)]
    tuned = [b * (0.7 + 0.01 * (i % 50)) for i, b in enumerate(baseline)]
    for stat in ("mean", "median"):
        p = paired_delta(baseline, tuned, stat, 1000, seed=4)
        assert (p["delta"], p["ci_low"], p["ci_high"]) == bootstrap_delta(baseline, tuned, stat, 1000, seed=4)
        _, draws = bootstrap_draws(baseline, tuned, stat, 1000, seed=4)
        assert p["mde80"] == pytest.approx((1.96 + 0.84) * np.std(draws, ddof=1))
