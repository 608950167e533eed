"""One error family: the CLI catches ForgetscaleError and prints its one-line message (exit 2)."""

from __future__ import annotations

import difflib


class ForgetscaleError(ValueError):
    """Base of every error a user can cause; its message is one line that names the problem."""


class ConfigError(ForgetscaleError):
    """`<file>:<line> <key>: must be <rule>; got <value>.`"""


class DataError(ForgetscaleError):
    """`<file>:<line>: <what is wrong>; <how to fix>.`"""


class ModelError(ForgetscaleError):
    """A model that cannot be found, loaded or used as asked."""


class StoreError(ForgetscaleError):
    """A results store that is missing, foreign or inconsistent."""


class NotFittedError(ForgetscaleError, AttributeError):
    """`<Law> is not fitted; call fit() first.`"""


class UnknownNameError(ForgetscaleError, KeyError):
    """`unknown method 'lroa'; did you mean 'lora'? known: ...`"""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


def did_you_mean(kind: str, name: str, known: list[str] | tuple[str, ...] | set[str]) -> str:
    """The message for an unknown name, with the closest known names."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{name}'{hint} known: {', '.join(known)}"


class RunFailed(Exception):
    """One run that cannot go on (non-finite loss, a missing source run): the executor records it as failed
    and the sweep continues. Not a ForgetscaleError: nothing the user typed is wrong."""
