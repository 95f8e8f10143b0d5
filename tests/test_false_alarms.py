"""gaussad.false_alarms against SciPy: the Clopper-Pearson bound is scipy.stats.beta's quantile, the
binomial CDF scipy.stats.binom's; the threshold on a budget from held-out normal scores, end to end
in GaussianAD, evaluate and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from gaussad.data import load_category
from gaussad.evaluate import evaluate
from gaussad.false_alarms import binomial_cdf, budget_threshold, clopper_pearson_upper, images_needed
from gaussad.gaussian import GaussianAD

CASES = [(0, 1), (0, 10), (1, 10), (3, 20), (0, 299), (2, 300), (17, 1000), (99, 100)]


@pytest.mark.parametrize("k, n", CASES)
def test_the_bound_is_scipys_beta_quantile(k, n):
    want = stats.beta.ppf(0.95, k + 1, n - k)
    assert clopper_pearson_upper(k, n) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert clopper_pearson_upper(k, n, 0.99) == pytest.approx(stats.beta.ppf(0.99, k + 1, n - k), rel=1e-9)


@pytest.mark.parametrize("k, n, p", [(0, 10, 0.1), (3, 20, 0.25), (17, 1000, 0.02), (5, 5, 0.3)])
def test_the_binomial_cdf_is_scipys(k, n, p):
    assert binomial_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-10)


@pytest.mark.parametrize("budget", [0.01, 0.05, 0.2])
def test_images_needed_is_the_fewest_that_certify_the_budget(budget):
    needed = images_needed(budget)
    assert clopper_pearson_upper(0, needed) <= budget < clopper_pearson_upper(0, needed - 1)
    assert images_needed(0.01) == 299


@pytest.mark.parametrize("seed, m, budget", [(0, 400, 0.02), (1, 1000, 0.01), (2, 60, 0.1)])
def test_the_threshold_is_the_lowest_whose_bound_is_within_the_budget(seed, m, budget):
    scores = np.random.default_rng(seed).normal(size=m)
    chosen = budget_threshold(scores, budget)
    alarms = int((scores >= chosen.threshold).sum())
    assert alarms == chosen.held_out_alarms and chosen.n_held_out == m
    assert chosen.bound == clopper_pearson_upper(alarms, m) <= budget
    assert clopper_pearson_upper(alarms + 1, m) > budget  # one alarm more would break the budget


def test_tied_scores_never_let_more_alarms_through():
    scores = np.array([1.0] * 50 + [5.0] * 10)  # ten images tie at the top
    chosen = budget_threshold(scores, 0.1)  # 60 images allow a few alarms, not ten
    assert (scores >= chosen.threshold).sum() == chosen.held_out_alarms == 0


def test_too_few_held_out_images_say_how_many_would_do():
    message = "a false-alarm rate of 0.01 needs at least 299 held-out normal images.*holds out 20"
    with pytest.raises(ValueError, match=message):
        budget_threshold(np.arange(20.0), 0.01)


@pytest.fixture(scope="module")
def category(demo_root):
    return load_category(demo_root, "weave")


SMALL = dict(backbone="tf_efficientnet_lite0", weights="package:efficientnet-lite0", levels=(3, 4), image_size=64,
             device="cpu", progress=False)


def test_a_model_on_a_budget_decides_with_it_and_evaluate_reports_the_rates(category, tmp_path):
    model = GaussianAD(**SMALL, false_alarm_rate=0.3).fit(category.train, holdout=0.5)  # 10 held out
    normal = np.asarray(model.fit_info["normal_image_scores"])
    assert len(normal) == 10
    want = budget_threshold(normal, 0.3)
    assert model.thresholds["image_false_alarm"] == want.threshold == model.decision_threshold
    assert model.fit_info["false_alarm_bound"] == want.bound
    metrics = evaluate(model, category, tmp_path / "evaluation", n_overlays=0)
    scores = model.score(category.test).image
    labels = np.asarray(category.test.labels)
    assert metrics["decision_threshold"] == "image_false_alarm"  # it still decides once evaluated
    assert metrics["false_alarm_rate"] == pytest.approx(np.mean(scores[labels == 0] >= want.threshold))
    assert metrics["miss_rate"] == pytest.approx(np.mean(scores[labels == 1] < want.threshold))
    assert json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["false_alarm_budget"] == 0.3
    model.save(tmp_path / "model")
    assert GaussianAD.load(tmp_path / "model", device="cpu", progress=False).decision_threshold == want.threshold


def test_fit_refuses_a_budget_its_hold_out_cannot_certify_before_any_compute(demo_root, tmp_path, capsys):
    from gaussad.cli import main

    assert main(["fit", str(demo_root / "weave"), "-o", str(tmp_path / "m"), "--preset", "lite0",
                 "--false-alarm-rate", "0.01", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert "false_alarm_rate 0.01 needs at least 299 held-out normal images" in err and "hold out 2" in err
    assert not (tmp_path / "m").exists()
