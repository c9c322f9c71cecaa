"""Shorter is not the same as better: refusals and short repeated phrases are told apart from answers, a degenerate
"model" that apologizes to every prompt is shorter but not "shorter", and every Δ says what it could have detected."""
import json
import math

import numpy as np
import pytest
from conftest import ROOT, StageRunner, copy_repo
from test_series import row

from ernie_dpo import report
from ernie_dpo.stats import (
    REPETITIVE_SHARE,
    bootstrap_delta,
    distinct2,
    is_refusal,
    length_verdict,
    paired_delta,
    prompts_needed,
    repeated_ngram_share,
    repetitive,
)

APOLOGY_LOOPS = [
    "I'm sorry, I'm sorry. I'm sorry.",
    "I’m sorry, I’m sorry. I’m sorry.",  # a typographic apostrophe, as models often write
    "I'm sorry. I'm sorry. I'm sorry. I'm sorry.",
    "The answer is 4. The answer is 4. The answer is 4.",
    "对不起，对不起。对不起。",
    "我不知道。我不知道。我不知道。",
]

ANSWERS = [  # normal replies of every kind: none refuses, none repeats itself
    "4.",
    "Paris.",
    "Yes.",
    "巴黎。",
    "The capital of France is Paris, which is also its largest city and home to the Louvre and the Eiffel Tower.",
    "To reverse a list in Python, call `items.reverse()` to change it in place, or write `items[::-1]` to get a "
    "reversed copy and keep the original as it is.",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\nprint(add(1, 2), sub(3, 4))",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'even')\n    else:\n        print(i, 'odd')",
    "Here are a few ways to sleep better:\n1. Go to bed at the same time every night.\n2. Keep the bedroom dark and "
    "cool.\n3. Avoid caffeine after noon.\n4. Put the phone away an hour before bed.",
    "- Add the flour.\n- Add the sugar.\n- Add the eggs and stir until smooth.",
    "I'm sorry to hear that. A warm bath, a short walk and an early night often help after a day like that.",
    "巴黎是法国的首都，也是法国最大的城市。它以埃菲尔铁塔、卢浮宫和塞纳河而闻名，每年吸引数百万游客。",
    "提高睡眠质量的方法：\n1. 每天固定时间睡觉。\n2. 睡前一小时不看手机。\n3. 下午以后不喝咖啡。\n4. 保持卧室安静、凉爽。",
    "要在Python中反转列表，可以调用 items.reverse() 原地修改，或者用 items[::-1] 得到一个新的列表。",
]


@pytest.mark.parametrize("text", APOLOGY_LOOPS)
def test_a_short_phrase_said_three_times_is_repetitive(text):
    assert repeated_ngram_share(text) >= REPETITIVE_SHARE and repetitive(text), repeated_ngram_share(text)
    assert distinct2(text) < 0.5


@pytest.mark.parametrize("text", ANSWERS)
def test_answers_short_or_long_code_and_lists_are_neither_repetitive_nor_refusals(text):
    assert not repetitive(text), repeated_ngram_share(text)
    assert not is_refusal(text)


def test_repetition_by_hand():
    # words: i'm sorry i'm sorry i'm sorry -> 4 trigrams, the last two repeat the first two
    assert repeated_ngram_share("I'm sorry, I'm sorry. I'm sorry.") == 0.5
    # Chinese has no spaces: 4-character n-grams of 对不起对不起对不起 -> 6, of which 3 are new
    assert repeated_ngram_share("对不起，对不起。对不起。") == 0.5
    assert repeated_ngram_share("Paris.") == 0.0 and distinct2("Paris.") == 1.0  # nothing to repeat
    assert distinct2("a b a b") == pytest.approx(2 / 3)  # bigrams ab, ba, ab


def test_no_chosen_answer_of_the_real_data_is_repetitive():
    """The threshold against real answers (data/real/dpo_en_demo.json, 300 chosen answers: lists, code, tables)."""
    records = json.loads((ROOT / "data/real/dpo_en_demo.json").read_text())
    flagged = [r["chosen"]["value"][:80] for r in records if repetitive(r["chosen"]["value"])]
    assert flagged == []


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.", "I am sorry, I cannot answer this.", "I apologize, but that is not "
    "something I can do.", "As an AI language model, I do not have opinions.", "I'm not able to browse the web.",
    "i cannot do that", "I’m sorry, I’m sorry. You’re the one to find the one.", "抱歉，我无法回答这个问题。",
    "对不起，我不能提供这方面的信息。", "作为一个AI，我没有个人观点。", "很遗憾，这超出了我的能力范围。",
])
def test_refusals_and_apologies_in_english_and_chinese(text):
    assert is_refusal(text)


def test_a_refusal_is_said_at_once():
    long_answer = "The bridge opened in 1932 and carries eight lanes of traffic across the harbour every day. " * 2
    assert not is_refusal(long_answer + "I cannot stress enough how busy it gets at rush hour.")
    assert is_refusal("I cannot " + long_answer)


def delta_of(**quality):
    """A delta whose median got shorter for sure, with quality Δs given as key=(Δ, ci_low, ci_high)."""
    d = {"chars_mean": -300.0, "chars_mean_ci_low": -400.0, "chars_mean_ci_high": -200.0,
         "chars_median": -250.0, "chars_median_ci_low": -300.0, "chars_median_ci_high": -100.0}
    for key in ("refusal_share", "repetitive_share", "distinct2_mean", "empty_share", "looping_share"):
        v, lo, hi = quality.get(key, (0.0, -0.02, 0.02))
        d.update({key: v, f"{key}_ci_low": lo, f"{key}_ci_high": hi})
    return d


def test_the_verdict_needs_shorter_and_quality_held():
    assert length_verdict(delta_of())[0] == "shorter"
    assert length_verdict(delta_of(refusal_share=(0.05, 0.01, 0.09)))[0] == "shorter"     # real, but small
    assert length_verdict(delta_of(refusal_share=(0.3, -0.01, 0.6)))[0] == "shorter"      # large, but not real
    v, reasons = length_verdict(delta_of(refusal_share=(0.3, 0.1, 0.5)))
    assert v == "shorter but degraded" and any(r.startswith("refusal_share") for r in reasons)
    assert length_verdict(delta_of(distinct2_mean=(-0.2, -0.3, -0.1)))[0] == "shorter but degraded"
    assert length_verdict(delta_of(distinct2_mean=(0.2, 0.1, 0.3)))[0] == "shorter"  # more varied: better
    assert length_verdict(delta_of(looping_share=(0.2, 0.1, 0.3)))[0] == "shorter but degraded"
    nll = {"delta_nll_per_token": 0.3, "delta_nll_per_token_ci_low": 0.2, "delta_nll_per_token_ci_high": 0.4}
    v, reasons = length_verdict(delta_of(), nll)
    assert v == "shorter but degraded" and any("nll" in r for r in reasons)
    assert length_verdict(delta_of(), {**nll, "delta_nll_per_token_ci_low": -0.1})[0] == "shorter"
    longer = {**delta_of(), "chars_median_ci_low": 5.0, "chars_median_ci_high": 40.0, "chars_mean_ci_high": 9.0}
    assert length_verdict(longer)[0] == "longer"
    same = {**longer, "chars_median_ci_low": -5.0}
    assert length_verdict(same)[0] == "no detectable change"
    # median shorter, mean longer (a few runaway replies): neither "shorter" nor "longer"
    mixed = {**delta_of(), "chars_mean": 80.0, "chars_mean_ci_low": 10.0, "chars_mean_ci_high": 150.0}
    assert length_verdict(mixed)[0] == "mixed"
    assert any("likelihood not checked" in r for r in length_verdict(delta_of())[1])


def flat(metrics):
    """A metrics file as `dvc exp show` flattens it: "delta.chars_median_ci_low"."""
    return {f"{top}.{k}": v for top, d in metrics.items() for k, v in d.items()}


def test_a_model_that_apologizes_to_every_prompt_is_shorter_but_not_shorter(tmp_path):
    """The issue's failure, end to end through the real evaluate stage: real answers as the baseline, a "model" that
    answers every prompt with a short apology loop as the tuned one. Length says success; the verdict must not."""
    records = json.loads((ROOT / "data/real/dpo_en_demo.json").read_text())[:40]
    apologies = ["I'm sorry, I'm sorry. I'm sorry.", "I'm sorry. I'm sorry. I'm sorry.",
                 "I'm sorry, I'm sorry. I'm sorry, I'm sorry."]
    base = [{"id": f"p{i}", "reply": r["chosen"]["value"], "tokens": None, "finish_reason": "stop"}
            for i, r in enumerate(records)]
    tuned = [{**b, "reply": apologies[i % 3]} for i, b in enumerate(base)]
    run = StageRunner(copy_repo(tmp_path / "repo"))
    for name, replies in (("baseline", base), ("tuned", tuned)):
        path = run.root / f"data/infer/{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in replies), encoding="utf-8")
    run("evaluate", args=["--name", "baseline", "--replies", "data/infer/baseline.jsonl",
                          "--out", "metrics/baseline.json"])
    result = run("evaluate", args=["--name", "tuned", "--replies", "data/infer/tuned.jsonl",
                                   "--baseline", "data/infer/baseline.jsonl", "--out", "metrics/tuned.json"])
    tuned_metrics = json.loads((run.root / "metrics/tuned.json").read_text())
    d = tuned_metrics["delta"]
    assert d["chars_median_ci_high"] < 0 and d["chars_mean_ci_high"] < 0  # much shorter: every length number agrees
    assert tuned_metrics["tuned"]["refusal_share"] == 1.0 and tuned_metrics["tuned"]["repetitive_share"] == 1.0
    assert d["refusal_share_ci_low"] > 0.1 and d["repetitive_share_ci_low"] > 0.1 and d["distinct2_mean"] < -0.1
    assert d["verdict"] == "shorter but degraded"
    assert "refusal_share" in result.stderr and "repetitive_share" in result.stderr and "verdict" in result.stderr
    assert d["chars_mean_mde80"] > 0 and d["chars_median_mde80"] > 0
    # every baseline reply is new and every tuned one repetitive: the same Δ in every resample, nothing to detect
    assert d["repetitive_share_mde80"] == 0 and all(f"{k}_mde80" in d for k in ("refusal_share", "distinct2_mean"))

    # the report: the same metrics as a row of `dvc exp show`
    baseline_metrics = json.loads((run.root / "metrics/baseline.json").read_text())
    r = row("exp4", tuned_metrics["tuned"]["chars_mean"], tuned_metrics["tuned"]["chars_median"])
    r.update({**flat(baseline_metrics), **flat(tuned_metrics)})
    body, _, _ = report.table([r], ["exp4"])
    verdict = body[1][report.HEADERS.index("verdict")]
    assert verdict.startswith("shorter but degraded") and "refusal_share" in verdict and "repetitive_share" in verdict
    assert "shorter but degraded (refusal_share" in " ".join(report.render([r], ["exp4"]).split())


def lengths(n, seed):
    """n prompts' baseline and tuned reply lengths, drawn from real answers (chosen: baseline, rejected: tuned)."""
    records = json.loads((ROOT / "data/real/dpo_en_demo.json").read_text())
    pick = np.random.default_rng(seed).integers(0, len(records), n)
    return ([len(records[i]["chosen"]["value"]) for i in pick], [len(records[i]["rejected"]["value"]) for i in pick])


def test_the_detectable_difference_shrinks_as_the_test_set_grows():
    b40, t40 = lengths(40, 0)
    b160, t160 = lengths(160, 0)
    for stat in ("mean", "median"):
        small, large = paired_delta(b40, t40, stat, 2000, 1), paired_delta(b160, t160, stat, 2000, 1)
        # the standard error falls as 1/sqrt(n): four times the prompts, about half the MDE
        assert 0.3 < large["mde80"] / small["mde80"] < 0.75, (stat, small, large)
        # 2.8 standard errors; for the near-normal mean the 95% interval is 2 x 1.96 of them
        if stat == "mean":
            se = (small["ci_high"] - small["ci_low"]) / (2 * 1.96)
            assert small["mde80"] == pytest.approx(2.8 * se, rel=0.1)
        # the interval is bootstrap_delta's, to the digit: same seed, same resamples
        assert (small["delta"], small["ci_low"], small["ci_high"]) == bootstrap_delta(b40, t40, stat, 2000, 1)


def test_compare_says_how_many_prompts_the_recipe_s_own_effect_would_need():
    base, tuned = lengths(60, 3)
    rows = report.compare({"exp0": base, "exp1": base, "exp2": tuned, "exp3": tuned, "exp4": base}, 500, 0)
    c = {(x["later"], x["earlier"]): x for x in rows}
    q = c["exp2", "exp1"]
    assert q["prompts"] == 60
    for stat in ("mean", "median"):
        mde = paired_delta(base, tuned, stat, 500, 0)["mde80"]
        assert q[f"{stat}_mde80"] == round(mde, 2)
        assert q[f"{stat}_prompts_needed"] == math.ceil(60 * (mde / abs(q[stat]["recipe_delta"])) ** 2)
    assert q["median"]["recipe_delta"] == -88.0 and c["exp4", "exp3"]["mean"]["recipe_delta"] == -517.0
    assert prompts_needed(60, 44.0, -88.0) == 15 and prompts_needed(60, 88.0, -88.0) == 60
    assert prompts_needed(60, 100.0, 0) is None
    text = "\n".join(report.render_comparisons(rows))
    assert f"{q['median_mde80']:.1f}" in text and str(q["median_prompts_needed"]) in text
    assert "80% of the time" in text and "intervals exclude 0" in text
