"""LAWS: every law under the name the CLI and laws.json use, and ORDER, the order they are fitted in.

LAWS is defined in base.py beside the Law contract (base fits a law's dependencies by name, so it must
not import this module back) and re-exported here. Each law module adds its class to it when it is
imported (the estimators package imports them all).
"""

from __future__ import annotations

from forgetscale.laws.estimators.base import LAWS

__all__ = ["LAWS", "ORDER"]

# Fit order: a law comes after the laws it borrows constants from.
ORDER = ("linear", "power_ft", "power_f", "power_joint", "mult_ft", "mult_f")
