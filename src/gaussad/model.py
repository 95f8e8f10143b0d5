"""Kept for model versions registered before the detectors moved: the pyfunc code MLflow stored with
each of them imports `load_model` from here. New code imports it from gaussad.detectors."""

from gaussad.detectors import load_model

__all__ = ["load_model"]
