"""The competing form: multiplicative power laws in P and N (Chinchilla-like).

L_ft = A * P^-alpha * N^-beta + E          (mult_ft)
L_f  = E - A * P^-alpha * N^-beta          (mult_f: forgetting rises towards a ceiling E)

Four constants each, no gauge freedom, no shared constants: the simplest law that still lets P and
N act as power laws. Compare it with the paper's forms by held-out error, not only by R^2 (a form
with more constants always fits the seen data at least as well).
Internally A is fitted at the data's centre (P0, N0): A = A0 * P0^alpha * N0^beta.
"""

from __future__ import annotations

import itertools

import numpy as np

from forgetscale.laws.estimators import fitting, forms
from forgetscale.laws.estimators.nonlinear import NonlinearLaw
from forgetscale.laws.estimators.registry import LAWS

GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
EXP_LO, EXP_HI = np.log(1e-4), np.log(10.0)


class _Mult(NonlinearLaw):
    sign: float  # +1: A g + E (falls with P, N); -1: E - A g (rises with P, N)
    names = free = forms.MULT
    min_ranks = 2
    min_steps = 3

    def _obs_of(self, data):
        raise NotImplementedError

    def _internal(self, data, nat):
        A, al, be, E = nat.T
        return np.stack([np.log(A) - al * data.lp0 - be * data.ln0, np.log(al), np.log(be), np.log(E)], axis=1)

    def _natural(self, data, theta, fixed):
        al, be = np.exp(theta[:, 1]), np.exp(theta[:, 2])
        A = np.exp(theta[:, 0] + al * data.lp0 + be * data.ln0)
        return np.stack([A, al, be, np.exp(theta[:, 3])], axis=1)

    def _bounds(self, data):
        hi = np.log(10 * self._obs_of(data).max())
        return np.array([-50.0, EXP_LO, EXP_LO, np.log(1e-9)]), np.array([50.0, EXP_HI, EXP_HI, hi])

    def _model(self, data, fixed):
        y = np.log(self._obs_of(data))
        lp, ln = data.uP[data.kP], data.uN[data.kN]
        sign = self.sign

        def model(theta, rows, jac):
            lA, al, be, E = theta[:, 0:1], np.exp(theta[:, 1:2]), np.exp(theta[:, 2:3]), np.exp(theta[:, 3:4])
            with np.errstate(all="ignore"):
                Ag = np.exp(lA - al * lp - be * ln)
                pred = sign * Ag + E
                f = np.where(pred > 0, np.log(np.where(pred > 0, pred, 1.0)), np.nan)
                if not jac:
                    return f, None
                J = np.stack([sign * Ag, -sign * Ag * al * lp, -sign * Ag * be * ln,
                              np.broadcast_to(E, pred.shape)], axis=2)
                return f, J / pred[:, :, None]

        return model, y, data.point

    def _starts(self, data, fixed, deps):
        y = self._obs_of(data)
        lp, ln = data.uP[data.iP], data.uN[data.iN]
        grid = np.array(list(itertools.product(GRID, GRID)))
        g = np.exp(-grid[:, :1] * lp - grid[:, 1:] * ln)
        k, E = fitting.scale_offset(g, y)  # start: (k g + E) / y ~ 1, relative least squares
        A = self.sign * k
        ok = np.isfinite(A) & (A > 0) & (E > 0)
        ok &= np.all(self.sign * A[:, None] * g + E[:, None] > 0, axis=1)
        if not ok.any():  # fall back to a flat start: E at the mean, A small
            A, E, ok = np.full(len(grid), 0.01 * y.mean()), np.full(len(grid), y.mean()), np.ones(len(grid), bool)
        return np.column_stack([np.log(A[ok]), np.log(grid[ok, 0]), np.log(grid[ok, 1]), np.log(E[ok])])


class MultFT(_Mult):
    """Competing form for L_ft: A * P^-alpha * N^-beta + E."""

    name = "mult_ft"
    title = "competing form for L_ft: A P^-alpha N^-beta + E"
    outputs = reads = ("ft",)
    sign = 1.0

    def _obs_of(self, data):
        return data.ft

    def _predict(self, p, P, N, ft):
        return {"ft": forms.mult_ft(P, N, p)}


class MultF(_Mult):
    """Competing form for L_f: E - A * P^-alpha * N^-beta."""

    name = "mult_f"
    title = "competing form for L_f: E - A P^-alpha N^-beta"
    outputs = reads = ("f",)
    sign = -1.0

    def _obs_of(self, data):
        return data.f

    def _predict(self, p, P, N, ft):
        return {"f": forms.mult_f(P, N, p)}


LAWS.add(MultFT.name, MultFT)
LAWS.add(MultF.name, MultF)
