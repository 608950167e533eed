"""A law's settings are declared once, in `Law.__init__`'s signature (scikit-learn style): name, type and
default there, and beside them, as `Annotated[type, Setting(...)]`, the help text, the command-line flag
and the rule a value must follow. `get_params`, `FitOptions` and the flags of `forgetscale fit` are read
from that signature with `declared()`, so a new setting is one parameter, not four edits.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """What a signature's default cannot say about one setting."""

    help: str  # the one help text (the --help of `forgetscale fit`)
    flag: str | None = ""  # the command-line flag: "" for --<name with dashes>, None for none
    choices: tuple[str, ...] = ()  # the allowed values (checked, and listed in --help)
    parse: Callable[[str], Any] | None = None  # flag text -> value, when not the default's own type
    check: Callable[[Any], bool] | None = None  # is a value valid (beyond choices)? False fails with `rule`
    rule: str = ""  # the valid values in words: "<name> must be <rule>; got <value>"
    option: bool = True  # False: the pipeline sets it per fit, so it is neither an option nor a flag

    def problem(self, name: str, value: Any) -> str | None:
        """The error message for a value that breaks the rule, or None."""
        if self.choices and value not in self.choices:
            return f"{name} must be one of {', '.join(self.choices)}; got {value!r}"
        if self.check is not None and not self.check(value):
            return f"{name} must be {self.rule}; got {value!r}"
        return None


@dataclass(frozen=True)
class Declared:
    """One keyword-only parameter of a signature and its Setting."""

    name: str
    type: Any
    default: Any
    setting: Setting


def declared(func: Callable[..., Any]) -> list[Declared]:
    """The keyword-only parameters of `func` annotated with a Setting, in signature order."""
    hints = typing.get_type_hints(func, include_extras=True)
    out = []
    for p in inspect.signature(func).parameters.values():
        hint = hints.get(p.name)
        if p.kind is not p.KEYWORD_ONLY or typing.get_origin(hint) is not typing.Annotated:
            continue
        kind, *extras = typing.get_args(hint)
        setting = next((x for x in extras if isinstance(x, Setting)), None)
        if setting is not None:
            out.append(Declared(p.name, kind, p.default, setting))
    return out
