"""Each detector's settings as one declarative table: names, types, bounds, defaults and help.

A detector declares `SETTINGS = SettingsTable([Setting(...), ...])`; from that one table come
the keys config.json keeps, the meaning of a key missing from a folder saved before it existed,
the validation of values from Python, the CLI or params.yaml, the CLI flags and their help, and
the refusal of a setting that has no effect under the others. A new setting is one row.

    SETTINGS.validate({"spatial": "foo"})   -> ValueError: unknown spatial mode 'foo': use one of ...
    SETTINGS.validate({"ridge": 0.5})       -> ValueError: ridge needs covariance 'ridge', got ...
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable

from gaussad.validation import check_choice, check_number

MISSING = object()  # `before` of a setting that folders of the current format always hold
KINDS = ("int", "float", "choice", "text", "levels", "ints", "bool")


@dataclass(frozen=True)
class Setting:
    """One row of a settings table.

    kind: int | float | choice (one of `choices`) | text | levels (whole numbers >= 0, kept sorted)
    | ints (whole numbers >= `minimum`, in order) | bool (true or false; on the command line a flag
    that sets it true). `optional`: None is a value too (it means what
    `help` says). `minimum`/`maximum` (open with `open_low`/`open_high`) bound numbers; `odd`
    asks for an odd whole number. `before`: what a folder saved before the setting existed meant.
    `applies(settings)` False means the setting has no effect under the others: a value other than
    its default is then refused, naming `needs` and the `depends` settings' values. `flag`: offered
    on the command line. `label`: how messages name it (default: its name)."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    open_low: bool = False
    open_high: bool = False
    optional: bool = False
    odd: bool = False
    before: Any = MISSING
    applies: Callable[[dict], bool] | None = None
    needs: str = ""
    depends: tuple[str, ...] = ()
    flag: bool = True
    label: str = ""

    def __post_init__(self):
        check_choice("setting kind", self.kind, KINDS)
        if self.applies is not None and not (self.needs and self.depends):
            raise ValueError(f"setting {self.name}: `applies` needs `needs` and `depends` for its message")

    def check(self, value: Any) -> Any:
        """`value` converted to the setting's type (YAML and JSON give floats, strings, lists), or a
        ValueError that names the setting, the value and what is allowed."""
        label = self.label or self.name
        if value is None and self.optional:
            return None
        if self.kind == "choice":
            return check_choice(label, value, self.choices)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{label} must be true or false, got {value!r}")
            return value
        if self.kind == "text":
            if not isinstance(value, str) or not value:
                raise ValueError(f"{label} must be a non-empty string, got {value!r}")
            return value
        if self.kind in ("levels", "ints"):
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise ValueError(f"{label} must be a list of whole numbers, got {value!r}")
            numbers = [check_number(label, v, int, 0 if self.kind == "levels" else self.minimum)
                       for v in value]
            if not numbers:
                raise ValueError(f"{label} must name at least one value, got {value!r}")
            return sorted(numbers) if self.kind == "levels" else numbers
        number = check_number(label, value, int if self.kind == "int" else float, self.minimum, self.maximum,
                              self.open_low, self.open_high)
        if self.odd and number % 2 == 0:
            raise ValueError(f"{label} must be odd (a centred k×k window), got {number}")
        return number

    def argparse_options(self, show_default: bool = True) -> dict:
        """add_argument's options for the setting's flag (--name-with-dashes)."""
        text = f"{self.help} (default {self._shown_default()})" if show_default else self.help
        options: dict = {"help": text.replace("%", "%%")}  # argparse formats help with %
        if self.kind == "choice":
            options["choices"] = self.choices
        elif self.kind in ("int", "float"):
            options["type"] = int if self.kind == "int" else float
        elif self.kind in ("levels", "ints"):
            options.update(type=int, nargs="+")
        elif self.kind == "bool":
            options.update(action="store_const", const=True)
        return options

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    def _shown_default(self) -> str:
        if isinstance(self.default, (list, tuple)):
            return " ".join(map(str, self.default))
        return "none" if self.default is None else str(self.default)


class SettingsTable:
    """The settings of one detector, in order (see the module docstring)."""

    def __init__(self, rows: Iterable[Setting], owner: str = "the detector"):
        """`owner`: what messages say the settings are of (the detector class's name)."""
        self.rows = {row.name: row for row in rows}
        self.owner = owner
        unknown = {d for row in self.rows.values() for d in row.depends} - set(self.rows)
        if unknown:
            raise ValueError(f"settings depend on unknown settings {sorted(unknown)}")

    @property
    def names(self) -> tuple[str, ...]:
        """The keys config.json keeps, in the table's order."""
        return tuple(self.rows)

    def defaults(self) -> dict:
        return {name: row.default for name, row in self.rows.items()}

    def added_since(self) -> dict:
        """{name: what a folder saved before the setting existed meant}, for the newer settings."""
        return {name: row.before for name, row in self.rows.items() if row.before is not MISSING}

    def validate(self, values: dict, source: str = "", check_effect: bool | Collection[str] = True) -> dict:
        """Every setting, the defaults under `values`, checked and converted. An unknown key, a bad
        value, or a value other than the default for a setting that has no effect under the others
        is one ValueError; `source` (e.g. "params.yaml: model.") comes before the setting's name.
        `check_effect`: True checks the effect of every setting, a collection of names only of those
        (what a user gave over a preset: a preset's own values are not the user's doing), False none
        (a saved folder: what had no effect then has none now)."""
        unknown = sorted(set(values) - set(self.rows))
        if unknown:
            raise ValueError(f"{source}{unknown[0]} is not a setting of {self.owner} (it takes {', '.join(self.rows)})")
        settings = {}
        for name, row in self.rows.items():
            try:
                settings[name] = row.check(values.get(name, row.default))
            except ValueError as err:
                raise ValueError(f"{source}{name}: {err}" if source else str(err)) from None
        if check_effect:
            checked = self.rows if check_effect is True else check_effect
            for name, row in self.rows.items():
                changed = settings[name] != row.check(row.default)
                if name in checked and row.applies is not None and changed and not row.applies(settings):
                    got = ", ".join(f"{d} {settings[d]!r}" for d in row.depends)
                    raise ValueError(f"{source}{name} needs {row.needs}, got {got}: leave {name} out or change "
                                     f"{' / '.join(row.depends)}")
        return settings

    def add_flags(self, group: argparse._ActionsContainer, names: Iterable[str], show_default: bool = True) -> None:
        """The flags of the settings `names` (those offered on the command line) in `group`."""
        for name in names:
            row = self.rows[name]
            group.add_argument(row.flag_name, dest=name, **row.argparse_options(show_default))

    def flag_names(self) -> list[str]:
        return [name for name, row in self.rows.items() if row.flag]
