"""One way to check a setting, so every detector says the same thing about a bad value.

Each check returns the value converted to its type (settings read from JSON or YAML arrive as
floats or strings) or raises ValueError naming the setting, the value and what would be valid.
"""

from __future__ import annotations

from typing import Collection


def check_choice(name: str, value, choices: Collection) -> object:
    """`value` if it is one of `choices`."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(map(str, choices))}")
    return value


def check_number(name: str, value, kind: type = int, minimum: float | None = None, maximum: float | None = None,
                 open_low: bool = False, open_high: bool = False) -> int | float:
    """`value` as `kind` (int or float) within [minimum, maximum]; `open_low` / `open_high` leave
    out the bound itself; None for a bound means none."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if kind is int and not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    number = kind(number)
    too_low = minimum is not None and (number <= minimum if open_low else number < minimum)
    too_high = maximum is not None and (number >= maximum if open_high else number > maximum)
    if too_low or too_high or number != number:  # number != number: NaN
        raise ValueError(f"{name} must be {_allowed(minimum, maximum, open_low, open_high)}, got {value}")
    return number


def _allowed(minimum, maximum, open_low: bool, open_high: bool) -> str:
    if maximum is None:
        return f"> {minimum}" if open_low else f"at least {minimum}"
    if minimum is None:
        return f"< {maximum}" if open_high else f"at most {maximum}"
    return f"in {'(' if open_low else '['}{minimum}, {maximum}{')' if open_high else ']'}"
