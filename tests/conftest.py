"""Shared fixtures: a tiny demo dataset written once per test session."""

from __future__ import annotations

import pytest

from gaussad.demo import write_demo_dataset

_DEMO_SPEC = {
    "n_train": 20,
    "n_test_good": 6,
    "n_test_per_defect": 4,
    "image_size": 96,
    # category -> its defect types (brushed is grayscale, weave RGB)
    "defects": {"brushed": ("crack", "dent", "scratch"), "weave": ("hole", "stain", "thread")},
}


@pytest.fixture(scope="session")
def demo_spec():
    """The arguments the shared demo dataset was written with (what the data tests expect back)."""
    return _DEMO_SPEC


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """<root>/{brushed, weave} in MVTec AD layout, written once; tests must treat it as read-only."""
    root = tmp_path_factory.mktemp("demo")
    spec = _DEMO_SPEC
    write_demo_dataset(
        root,
        seed=0,
        categories=list(spec["defects"]),
        n_train=spec["n_train"],
        n_test_good=spec["n_test_good"],
        n_test_per_defect=spec["n_test_per_defect"],
        image_size=spec["image_size"],
    )
    return root
