"""Models saved by an earlier gaussad still load and score as they did.

tests/data/format2/ was written by gaussad at commit efb09ac, before the Gaussian detector became the
gaussad.gaussian package: three model folders of format 2 (the lite0 preset; the paper's pooled
score with shared Gaussians; a combined score with per-location Gaussians), the scores that code
gave on three images, and the MLflow pyfunc model of the lite0 folder as that code saved it (its
stored pyfunc_model.py imports the module paths of that time). Nothing here is regenerated: a
change that moves a module or changes a score fails these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gaussad.detectors import load_model

SAVED = Path(__file__).parent / "data" / "format2"
EXPECTED = json.loads((SAVED / "expected_scores.json").read_text())
IMAGES = [SAVED / "images" / name for name in EXPECTED["images"]]


@pytest.mark.parametrize("name", sorted(EXPECTED["scores"]))
def test_a_saved_folder_scores_as_when_it_was_saved(name):
    expected = EXPECTED["scores"][name]
    model = load_model(SAVED / name, device="cpu", runtime="torch", progress=False)
    scores = model.score(IMAGES)
    np.testing.assert_allclose(scores.image, expected["image"], rtol=1e-5)
    np.testing.assert_allclose(scores.maps.astype(np.float64).sum(), expected["map_sum"], rtol=1e-5)
    np.testing.assert_allclose(scores.maps.max(), expected["map_max"], rtol=1e-5)
    assert model.decision_threshold == pytest.approx(expected["decision_threshold"], rel=1e-12)


def test_a_pyfunc_model_saved_by_earlier_code_loads_and_predicts():
    mlflow = pytest.importorskip("mlflow")
    model = mlflow.pyfunc.load_model(str(SAVED / "pyfunc-lite0"))
    predictions = model.predict(pd.DataFrame({"image": [path.read_bytes() for path in IMAGES]}))
    expected = EXPECTED["scores"]["lite0"]
    # served on the default runtime (ONNX Runtime on a CPU), the scores above on torch's
    np.testing.assert_allclose(predictions["score"], expected["image"], rtol=1e-4)
    np.testing.assert_allclose(predictions["threshold"], expected["decision_threshold"], rtol=1e-12)
