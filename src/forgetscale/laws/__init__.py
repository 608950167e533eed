"""Scaling laws for forgetting: the paper's forms and a competing one, as fit/predict estimators.

Every law is registered in LAWS under the name the CLI and laws.json use:

linear       Eq. 4   L_f = -c_f_ft * L_ft + s_f_ft                      (OLS)
power_ft     Eq. 5   L_ft = c_ft * ((a_ft/P)^alpha_ft + (b_ft/N)^beta_ft)^rho + s_ft
power_f      Eq. 6   L_f = -c_f_ft * (c_ft * ((a_f/P)^alpha_f + (b_f/N)^beta_f)^rho + s_ft) + s_f_ft,
                     shared constants taken from linear and power_ft (the separate fit)
power_joint  Eq. 5 + 6 fitted together on both losses
mult_ft      A * P^-alpha * N^-beta + E  for L_ft    (competing form)
mult_f       E - A * P^-alpha * N^-beta  for L_f     (competing form)

Layout, by kind; imports point down this list only (fit -> studies -> pipeline -> estimators):

fit.py        `forgetscale fit` on a run folder: the pipeline's per-group fits, then the studies on them,
              written as one laws.json (the only module that calls both)
studies/      what is computed from fits: laws across methods (crossmethod), mitigation arms at matched
              loss (mitigation), the paper's published constants (paper), simulated sweeps (synthetic),
              refusal rate against forgetting from the stored safety evals (guardrails)
pipeline/     from stored rows to laws.json and back: fit every group (fitall), the file (lawfile),
              forecasts from it (forecast), plan's options (plan), which form to trust at a pilot
              budget (record: the forecasting benchmark's rule)
estimators/   the law classes and their machinery: the rows a law accepts (select, groups), the forms,
              the fitters, the registry (LAWS, ORDER)

This package exports the estimators only; `import forgetscale.laws` loads no study and no torch.
"""

from __future__ import annotations

from forgetscale.laws.estimators.base import GAUGE_C_FT, Law
from forgetscale.laws.estimators.joint import PowerJoint
from forgetscale.laws.estimators.linear import LinearLaw
from forgetscale.laws.estimators.multiplicative import MultF, MultFT
from forgetscale.laws.estimators.power import PowerF, PowerFT
from forgetscale.laws.estimators.registry import LAWS, ORDER

__all__ = ["GAUGE_C_FT", "LAWS", "ORDER", "Law", "LinearLaw", "MultF", "MultFT", "PowerF", "PowerFT", "PowerJoint"]
