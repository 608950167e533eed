"""Eq. 4, the linear trade-off L_f = -c_f_ft * L_ft + s_f_ft, fitted by ordinary least squares.

OLS (not log-space Huber) because that is what the paper's R^2 describes, and because the fit is
a straight line through points that all carry noise of the same size. Every bootstrap resample is
one weighted OLS, solved in closed form for all resamples at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from forgetscale.laws.estimators import forms
from forgetscale.laws.estimators.base import Law
from forgetscale.laws.estimators.registry import LAWS


class LinearLaw(Law):
    """Forgetting as a straight line in the fine-tuning loss (paper Fig. 2, Eq. 4)."""

    name = "linear"
    title = "Eq. 4 linear trade-off: L_f = -c_f_ft L_ft + s_f_ft"
    outputs = ("f",)
    reads = ("ft", "f")
    names = forms.LINEAR
    free = forms.LINEAR
    min_ranks = 1
    min_steps = 1
    given_ft = True
    space = "nats"

    def _solve(self, data, w, fixed, warm, deps):
        x, y = data.ft, data.f
        sw = w.sum(axis=1)
        mx = (w @ x) / sw
        my = (w @ y) / sw
        dx = x[None, :] - mx[:, None]
        var = np.sum(w * dx * dx, axis=1)
        cov = np.sum(w * dx * (y[None, :] - my[:, None]), axis=1)
        with np.errstate(all="ignore"):
            slope = np.where(var > 0, cov / var, np.nan)
        params = np.stack([-slope, my - slope * mx], axis=1)
        return params, np.isfinite(slope), np.zeros(params.shape, bool)

    def _predict(self, p: Mapping[str, np.ndarray], P, N, ft) -> dict[str, np.ndarray]:
        return {"f": forms.linear(ft, p)}

    def predict(self, L_ft: Any, N: Any = None, *, output: str | None = None) -> np.ndarray:
        """Predicted L_f for the given fine-tuning losses."""
        return super().predict(L_ft, output=output)

    def predict_interval(self, L_ft: Any, N: Any = None, *, output: str | None = None,
                         level: float = 0.95, kind: str = "mean") -> tuple[np.ndarray, np.ndarray]:
        return super().predict_interval(L_ft, output=output, level=level, kind=kind)


LAWS.add(LinearLaw.name, LinearLaw)
