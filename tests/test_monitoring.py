"""gaussad.monitoring against SciPy (the binomial tail, the two-sample Kolmogorov-Smirnov statistic and
the Kolmogorov distribution), its false drift alarms on unshifted scores over many windows, and
`gaussad monitor` on real scores of the demo data: defective images drift, good ones do not."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from gaussad.data import load_category
from gaussad.gaussian import GaussianAD
from gaussad.monitoring import alarm_p_value, kolmogorov_sf, ks_p_value, ks_statistic, monitor


@pytest.mark.parametrize("alarms, n, rate", [(0, 50, 0.01), (3, 50, 0.01), (10, 200, 0.05), (7, 7, 0.5)])
def test_the_alarm_p_value_is_scipys_binomial_tail(alarms, n, rate):
    assert alarm_p_value(alarms, n, rate) == pytest.approx(stats.binom.sf(alarms - 1, n, rate), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("seed, m, n, shift", [(0, 30, 50, 0.0), (1, 100, 40, 0.5), (2, 17, 23, 1.5)])
def test_the_ks_statistic_is_scipys_and_its_p_value_the_kolmogorov_distributions(seed, m, n, shift):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=m) + shift, rng.normal(size=n)
    assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
    d, p = ks_p_value(a, b)
    assert p == pytest.approx(stats.kstwobign.sf(d * np.sqrt(m * n / (m + n))), rel=1e-9, abs=1e-15)
    for x in (0.3, 0.8, 1.36, 2.5):
        assert kolmogorov_sf(x) == pytest.approx(stats.kstwobign.sf(x), rel=1e-9, abs=1e-15)


def test_on_unshifted_scores_windows_drift_about_as_often_as_the_level():
    """2 000 windows of 50 normal scores against 200 held-out ones: the share that drifts is about
    alpha (the two tests are conservative: the KS p-value from the limit, the binomial's discrete)."""
    rng = np.random.default_rng(0)
    normal = rng.normal(size=200)
    threshold = np.quantile(normal, 0.95)
    report = monitor(rng.normal(size=2000 * 50), normal, threshold, window=50, alpha=0.05)
    share = len(report["drift_windows"]) / len(report["windows"])
    assert share <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 2000), share
    shifted = monitor(rng.normal(size=50) + 1.0, normal, threshold, alpha=0.05)
    assert shifted["drift"] and shifted["p_value"] < 1e-4


def test_a_shift_of_every_position_shows_in_the_feature_test():
    """Same maxima, higher map means (a whole-image shift): the feature test sees it, the others not."""
    rng = np.random.default_rng(1)
    normal, normal_means = rng.normal(size=100), rng.normal(size=100)
    scores, means = rng.normal(size=60), rng.normal(size=60) + 1.5
    report = monitor(scores, normal, np.quantile(normal, 0.95), map_means=means, normal_map_means=normal_means)
    assert report["ks_p_value"] > 0.01 and report["feature_p_value"] < 1e-6 and report["drift"]
    assert report["p_value"] == pytest.approx(3 * report["feature_p_value"])  # Bonferroni over three tests
    without = monitor(scores, normal, np.quantile(normal, 0.95))
    assert without["feature_p_value"] is None and not without["drift"]


def test_monitor_flags_defective_images_and_not_good_ones(demo_root, tmp_path, capsys):
    from gaussad.cli import main

    category = load_category(demo_root, "brushed")
    model = GaussianAD.from_preset("lite0", image_size=96, pixel_channels=64, device="cpu", progress=False)
    model.fit(category.train, holdout=0.5)  # 10 held-out normal images
    model.save(tmp_path / "model")
    good = [p for p, label in zip(category.test.paths, category.test.labels) if not label]
    defective = [p for p, label in zip(category.test.paths, category.test.labels) if label]
    assert main(["monitor", str(tmp_path / "model"), *map(str, good), "-o", str(tmp_path / "good"), "--quiet"]) == 0
    assert main(["monitor", str(tmp_path / "model"), *map(str, defective), "-o", str(tmp_path / "bad"),
                 "--window", "6", "--quiet"]) == 0
    good_report = json.loads((tmp_path / "good" / "monitor.json").read_text())
    bad_report = json.loads((tmp_path / "bad" / "monitor.json").read_text())
    assert not good_report["drift"] and bad_report["drift"]
    assert {"drift", "p_value", "alarm_rate", "expected_alarm_rate", "n_images"} <= set(bad_report)
    assert bad_report["n_images"] == len(defective) and len(bad_report["windows"]) == 2
    assert (tmp_path / "bad" / "monitor.png").stat().st_size > 10_000
    assert capsys.readouterr().out.splitlines()[-1].startswith("DRIFT:")
    normal = model.fit_info["normal_image_scores"]
    scored = model.score(defective)
    want = monitor(scored.image, normal, model.decision_threshold, window=6, map_means=scored.maps.mean((1, 2)),
                   normal_map_means=model.fit_info["normal_map_means"])
    assert bad_report["p_value"] == pytest.approx(want["p_value"], rel=1e-6)
    # the same from predict's table
    predict = ["predict", str(tmp_path / "model"), *map(str, defective), "-o", str(tmp_path / "pred"), "--quiet"]
    assert main(predict) == 0
    assert main(["monitor", str(tmp_path / "model"), "--scores", str(tmp_path / "pred" / "predictions.csv"),
                 "--window", "6", "-o", str(tmp_path / "from-csv"), "--quiet"]) == 0
    from_csv = json.loads((tmp_path / "from-csv" / "monitor.json").read_text())
    assert from_csv["p_value"] == pytest.approx(bad_report["p_value"], rel=1e-6)
