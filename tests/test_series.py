"""The recipe's series plan and the report table, on numbers whose right answer is known."""
import pytest

from ernie_dpo.report import ReportError, render, table
from ernie_dpo.series import count_pairs, plan


def test_plan_on_the_recipe_numbers_gives_the_recipe_settings():
    """Recipe (batch 1): exp1/exp2 614 pairs, 614 steps, warmup 50; exp3 1804 steps; exp4 3608 steps, warmup 360."""
    p = plan({"near_baseline": 614, "ratio_1.2": 5000, "ratio_2": 1804}, global_batch_size=1, warmup_steps=50)
    assert p["exp1"] == {"trainset.strategy": "near_baseline", "trainset.min_ratio": 1.2, "trainset.size": 0,
                         "train.max_steps": 614, "train.warmup_steps": 50}
    assert p["exp2"]["trainset.size"] == 614 and p["exp2"]["train.max_steps"] == 614  # equal size to exp1
    assert (p["exp3"]["trainset.min_ratio"], p["exp3"]["train.max_steps"], p["exp3"]["train.warmup_steps"]) == (2.0, 1804, 50)
    assert (p["exp4"]["train.max_steps"], p["exp4"]["train.warmup_steps"]) == (3608, 360)
    # every experiment sets every varied key, so nothing is inherited from whatever ran before
    assert all(set(v) == set(p["exp1"]) for v in p.values())


def test_plan_counts_epochs_not_pairs_at_a_larger_batch():
    p = plan({"near_baseline": 103, "ratio_1.2": 210, "ratio_2": 110}, global_batch_size=8, warmup_steps=4)
    assert [p[n]["train.max_steps"] for n in ("exp1", "exp2", "exp3", "exp4")] == [13, 13, 14, 28]
    assert p["exp4"]["train.warmup_steps"] == 2


def test_plan_refuses_an_empty_variant():
    with pytest.raises(ValueError, match="baseline_tolerance"):
        plan({"near_baseline": 0, "ratio_1.2": 10, "ratio_2": 5}, 1, 50)


def test_counts_use_string_lengths(sample_records):
    c = count_pairs(sample_records, baseline_mean=90.0, tolerance=0.3)
    assert c["ratio_2"] < c["ratio_1.2"] and 0 < c["near_baseline"] <= c["ratio_1.2"]


def row(name, mean, median, **extra):
    r = {"Experiment": name, "typ": "branch_commit", "rev": "abc", "model.name_or_path": "tiny",
         "baseline.len_mean": 93.2, "baseline.len_median": 76.0, "baseline.replies": 60, "infer.top_p": 0.7,
         "infer.temperature": 0.7, "infer.max_dec_len": 160, "evaluate.bootstrap_samples": 2000,
         "trainset.strategy": "ratio", "trainset.min_ratio": 1.2, "trainset.baseline_tolerance": 0.3,
         "trainset.pairs": 103, "train.fine_tuning": "full", "train.max_steps": 13, "train.warmup_steps": 4,
         "train.global_batch_size": 8, "train.learning_rate": 5e-5, "tuned.len_mean": mean, "tuned.len_median": median,
         "delta.len_mean": mean - 93.2, "delta.len_mean_ci_low": -1.0, "delta.len_mean_ci_high": 1.0,
         "delta.len_median": median - 76, "delta.len_median_ci_low": -2.0, "delta.len_median_ci_high": 2.0,
         "probes_baseline.pass_rate": 0.2, "probes_tuned.pass_rate": 0.25, "probes_tuned.retention": 1.25}
    r.update(extra)
    return r


def test_report_rows_follow_the_recipe_layout_and_name_what_is_missing():
    rows = [row("exp2", 80.0, 50.0), row("exp4", 40.5, 30.0, **{"trainset.min_ratio": 2.0})]
    body, problems, _ = table(rows, ["exp1", "exp2", "exp3", "exp4"])
    assert [r[0] for r in body] == ["exp0", "exp1", "exp2", "exp3", "exp4"]
    assert body[0][3:5] == ["93.2", "76.0"] and body[2][3:5] == ["80.0", "50.0"] and body[4][3:5] == ["40.5", "30.0"]
    assert body[4][1] == "rejected ≥ 2× chosen, 103 pairs" and body[1][1] == "not run"
    assert problems == ["exp1: no finished experiment of that name", "exp3: no finished experiment of that name"]
    text = render([{"typ": "baseline", "rev": "abc1234ffff"}] + rows, ["exp2", "exp4"])
    assert "experiments of commit abc1234" in text
    assert "tiny demo model" in text and "| exp4 " in text and "888.8" in text  # recipe reference shown apart
    for published in ("888.8", "879.5", "864.7", "1145.1", "628.1", "| 515 ", "| 442 ", "| 354 ", "| 412 ", "| 331 "):
        assert published in text, published  # all five recipe rows, as published


def test_null_metrics_show_as_a_dash():
    rows = [row("exp2", 50.0, 40.0, **{"probes_tuned.retention": "None", "probes_baseline.pass_rate": None})]
    body, _, _ = table(rows, ["exp2"])
    assert body[0][7] == "—" and body[1][8] == "—"


def test_file_prefixed_columns_are_read_too():
    r = row("exp2", 50.0, 40.0)
    r["params.yaml:train.learning_rate"] = r.pop("train.learning_rate")
    r["metrics/train.json:train.learning_rate"] = 0.0  # an older commit's metric of the same name
    body, _, _ = table([r], ["exp2"])
    assert "lr 5e-05" in body[1][2]


def test_the_newest_commit_s_experiment_wins():
    rows = [{"typ": "baseline", "rev": "new"}, row("exp2", 50.0, 40.0),
            {"typ": "baseline", "rev": "old"}, row("exp2", 80.0, 70.0)]
    body, _, _ = table(rows, ["exp2"])
    assert body[1][3] == "50.0"


def test_report_refuses_experiments_with_different_baselines():
    rows = [row("exp2", 80.0, 50.0), row("exp4", 40.0, 30.0, **{"baseline.len_mean": 120.0})]
    with pytest.raises(ReportError, match="do not share one baseline"):
        table(rows, ["exp2", "exp4"])
