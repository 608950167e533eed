"""Scaling laws for forgetting: the paper's forms and a competing one, as fit/predict estimators.

Every law is registered in LAWS under the name the CLI and laws.json use:

linear       Eq. 4   L_f = -c_f_ft * L_ft + s_f_ft                      (OLS)
power_ft     Eq. 5   L_ft = c_ft * ((a_ft/P)^alpha_ft + (b_ft/N)^beta_ft)^rho + s_ft
power_f      Eq. 6   L_f = -c_f_ft * (c_ft * ((a_f/P)^alpha_f + (b_f/N)^beta_f)^rho + s_ft) + s_f_ft,
                     shared constants taken from linear and power_ft (the separate fit)
power_joint  Eq. 5 + 6 fitted together on both losses
mult_ft      A * P^-alpha * N^-beta + E  for L_ft    (competing form)
mult_f       E - A * P^-alpha * N^-beta  for L_f     (competing form)
"""

from __future__ import annotations

from forgetscale.laws.base import GAUGE_C_FT, Law
from forgetscale.registry import Registry

LAWS: Registry[type[Law]] = Registry("law")

from forgetscale.laws.joint import PowerJoint  # noqa: E402
from forgetscale.laws.linear import LinearLaw  # noqa: E402
from forgetscale.laws.multiplicative import MultF, MultFT  # noqa: E402
from forgetscale.laws.power import PowerF, PowerFT  # noqa: E402

# Fit order: a law comes after the laws it borrows constants from.
ORDER = ("linear", "power_ft", "power_f", "power_joint", "mult_ft", "mult_f")
for _law in (LinearLaw, PowerFT, PowerF, PowerJoint, MultFT, MultF):
    LAWS.add(_law.name, _law)

__all__ = ["GAUGE_C_FT", "LAWS", "ORDER", "Law", "LinearLaw", "MultF", "MultFT", "PowerF", "PowerFT", "PowerJoint"]
