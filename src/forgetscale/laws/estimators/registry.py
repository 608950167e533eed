"""LAWS: every law under the name the CLI and laws.json use, and ORDER, the order they are fitted in.

Each law module adds its class here when it is imported (the estimators package imports them all), so
base.py can fit a law's dependencies by name without importing the law modules back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from forgetscale.registry import Registry

if TYPE_CHECKING:
    from forgetscale.laws.estimators.base import Law

LAWS: Registry[type[Law]] = Registry("law")

# Fit order: a law comes after the laws it borrows constants from.
ORDER = ("linear", "power_ft", "power_f", "power_joint", "mult_ft", "mult_f")
