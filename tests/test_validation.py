"""gaussad.validation: one way to check a number, saying what is allowed."""

from __future__ import annotations

import pytest

from gaussad.validation import check_number


@pytest.mark.parametrize("value, kind, bounds, message", [
    (0, int, dict(minimum=1), "batch_size must be at least 1, got 0"),
    (2.5, int, dict(minimum=1), "batch_size must be a whole number, got 2.5"),
    ("many", int, {}, "batch_size must be a number, got 'many'"),
    (True, int, {}, "batch_size must be a number, got True"),
    (float("nan"), float, dict(minimum=0, maximum=1), r"batch_size must be in \[0, 1\], got nan"),
    (1.0, float, dict(minimum=0, maximum=1, open_high=True), r"batch_size must be in \[0, 1\), got 1.0"),
    (0.0, float, dict(minimum=0, open_low=True), "batch_size must be > 0, got 0.0"),
])
def test_check_number_says_what_is_allowed(value, kind, bounds, message):
    with pytest.raises(ValueError, match=message):
        check_number("batch_size", value, kind, **bounds)


def test_check_number_converts_what_json_and_yaml_give():
    assert check_number("epochs", 3.0) == 3 and isinstance(check_number("epochs", 3.0), int)
    assert check_number("rate", "1e-3", float) == 0.001
