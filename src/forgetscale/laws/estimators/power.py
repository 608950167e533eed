"""The paper's shifted power laws: Eq. 5 for L_ft, Eq. 6 for L_f, separately and jointly.

Gauge: c * ((a/P)^alpha + (b/N)^beta)^rho does not change when c grows by k^rho while a^alpha and
b^beta shrink by k, so no data can fix c_ft, a and b together. We pin c_ft (`gauge_c_ft`, default
the paper's 0.002) and fit a and b on that scale; forms.regauge rewrites any constants to it.

Internally a is fitted as log(a / P0) and b as log(b / N0), P0 and N0 being the geometric means of
the data, which keeps the columns of the Jacobian nearly orthogonal.

"Separate" (power_ft then power_f) follows the paper's order: Eq. 4 and Eq. 5 first, then Eq. 6
with their c_f_ft, s_f_ft, c_ft, s_ft and rho held fixed. "Joint" (power_joint) fits Eq. 5 and
Eq. 6 together on both losses, sharing c_ft, s_ft and rho (c_f_ft, s_f_ft still from Eq. 4).
"""

from __future__ import annotations

import itertools

import numpy as np

from forgetscale.laws.estimators import fitting, forms
from forgetscale.laws.estimators.base import RHO_RANGE
from forgetscale.laws.estimators.nonlinear import NonlinearLaw
from forgetscale.laws.estimators.registry import LAWS
from forgetscale.laws.estimators.select import FitData

WIDE = 50.0  # bound on log (a/P0)^alpha and log (b/N0)^beta: never binds in a sensible fit
EXP_LO, EXP_HI = np.log(1e-4), np.log(10.0)  # alpha, beta
RHO_LO, RHO_HI = np.log(RHO_RANGE[0]), np.log(RHO_RANGE[1])
GRID_ALPHA = (0.02, 0.08, 0.3)
GRID_BETA = (0.05, 0.15, 0.5)
GRID_RHO = (1.0, 3.0, 8.0, 20.0)
GRID_RATIO = (0.25, 1.0, 4.0)  # (a/P)^alpha : (b/N)^beta at the centre of the data


def _block(data: FitData, lu0, lv0, lal, lbe, jac: bool):
    """X = (a/P)^alpha + (b/N)^beta at every design point (b, k), and dX / d(internal block coordinates).

    The block is parameterised by log u0 = alpha log(a/P0) and log v0 = beta log(b/N0), the two terms'
    logs at the centre of the data, rather than by log a and log b: the terms' sizes are what the data
    see, and a small exponent no longer sends log a off to infinity along a flat valley.
    """
    al, be = np.exp(lal)[:, None], np.exp(lbe)[:, None]
    lu = lu0[:, None] - al * data.uP[None, :]
    lv = lv0[:, None] - be * data.uN[None, :]
    u, v = np.exp(lu), np.exp(lv)
    kP, kN = data.kP, data.kN
    X = u[:, kP] + v[:, kN]
    if not jac:
        return X, None
    dX = np.stack([u[:, kP], v[:, kN], (-al * data.uP * u)[:, kP], (-be * data.uN * v)[:, kN]], axis=2)
    return X, dX


def _block_grid(data: FitData, rhos=GRID_RHO) -> np.ndarray:
    """Starting (log u0, log v0, log alpha, log beta, rho) rows with X = 1 + ratio at the data's centre.

    The exponents scale as 8 / rho, so every start has log-slopes rho * alpha of a sensible size.
    """
    rows = []
    for al, be, rho, ratio in itertools.product(GRID_ALPHA, GRID_BETA, rhos, GRID_RATIO):
        al, be = al * 8.0 / rho, be * 8.0 / rho
        rows.append([np.log(ratio), 0.0, np.log(al), np.log(be), rho])
    return np.array(rows)


def _rescale(start: np.ndarray, log_m: np.ndarray) -> np.ndarray:
    """Multiply X by exp(log_m) (per row)."""
    out = start.copy()
    out[:, 0] += log_m
    out[:, 1] += log_m
    return out


def _block_internal(data: FitData, a, b, alpha, beta) -> list[np.ndarray]:
    with np.errstate(divide="ignore"):  # a or b may have underflowed to 0 (exponent at its bound)
        return [alpha * (np.log(a) - data.lp0), beta * (np.log(b) - data.ln0), np.log(alpha), np.log(beta)]


def _block_natural(data: FitData, theta: np.ndarray) -> list[np.ndarray]:
    alpha, beta = np.exp(theta[:, 2]), np.exp(theta[:, 3])
    with np.errstate(over="ignore"):
        return [np.exp(theta[:, 0] / alpha + data.lp0), np.exp(theta[:, 1] / beta + data.ln0), alpha, beta]


class PowerFT(NonlinearLaw):
    """Eq. 5: L_ft = c_ft * ((a_ft/P)^alpha_ft + (b_ft/N)^beta_ft)^rho + s_ft."""

    name = "power_ft"
    title = "Eq. 5 power law for L_ft"
    outputs = reads = ("ft",)
    names = forms.POWER_FT
    free = ("a_ft", "b_ft", "alpha_ft", "beta_ft", "rho", "s_ft")

    def _predict(self, p, P, N, ft):
        return {"ft": forms.power_ft(P, N, p)}

    def _internal(self, data, nat):
        a, b, al, be, rho, _c, s = nat.T
        return np.stack([*_block_internal(data, a, b, al, be), np.log(rho), np.log(s)], axis=1)

    def _natural(self, data, theta, fixed):
        c = np.full(len(theta), self.gauge_c_ft)
        return np.stack([*_block_natural(data, theta), np.exp(theta[:, 4]), c, np.exp(theta[:, 5])], axis=1)

    def _bounds(self, data):
        hi_s = np.log(10 * data.ft.max())
        return (np.array([-WIDE, -WIDE, EXP_LO, EXP_LO, RHO_LO, np.log(1e-9)]),
                np.array([WIDE, WIDE, EXP_HI, EXP_HI, RHO_HI, hi_s]))

    def _model(self, data, fixed):
        c, y = self.gauge_c_ft, np.log(data.ft)

        def model(theta, rows, jac):
            X, dX = _block(data, *theta[:, :4].T, jac)
            rho, s = np.exp(theta[:, 4])[:, None], np.exp(theta[:, 5])[:, None]
            with np.errstate(all="ignore"):
                lX = np.log(X)
                cY = c * np.exp(rho * lX)
                pred = cY + s
                f = np.log(pred)
                if not jac:
                    return f, None
                g = (rho * cY / X)[:, :, None] * dX
                J = np.concatenate([g, (rho * lX * cY)[:, :, None], np.broadcast_to(s, pred.shape)[:, :, None]], axis=2)
                return f, J / pred[:, :, None]

        return model, y, data.point

    def _starts(self, data, fixed, deps):
        grid = _block_grid(data)
        X = _block(data, *grid[:, :4].T, False)[0][:, data.point]
        rho = grid[:, 4:5]
        g = X**rho
        C, s = fitting.scale_offset(g, data.ft)  # start: (C g + s) / L_ft ~ 1, relative least squares
        bad_s = ~(s > 0) | (s >= data.ft.min())
        s = np.where(bad_s, 0.5 * data.ft.min(), s)
        C = np.where(bad_s, fitting.scale_given_offset(g, data.ft, s), C)
        ok = np.isfinite(C) & (C > 0)
        log_m = np.log(C[ok] / self.gauge_c_ft) / rho[ok, 0]
        starts = _rescale(grid[ok], log_m)
        return np.column_stack([starts[:, :4], np.log(starts[:, 4]), np.log(s[ok])])


class PowerF(NonlinearLaw):
    """Eq. 6 with the shared constants held at their Eq. 4 / Eq. 5 values (the separate fit)."""

    name = "power_f"
    title = "Eq. 6 power law for L_f (separate: shared constants from Eq. 4, 5)"
    outputs = ("f",)
    reads = ("ft", "f")
    names = forms.POWER_F
    free = ("a_f", "b_f", "alpha_f", "beta_f")
    borrowed = {"rho": "power_ft", "c_ft": "power_ft", "s_ft": "power_ft", "c_f_ft": "linear", "s_f_ft": "linear"}
    requires = ("linear", "power_ft")

    def _predict(self, p, P, N, ft):
        return {"f": forms.power_f(P, N, p)}

    def _internal(self, data, nat):
        return np.stack(_block_internal(data, *nat[:, :4].T), axis=1)

    def _natural(self, data, theta, fixed):
        b = len(theta)
        rest = [np.broadcast_to(fixed[k], (b,)) for k in ("rho", "c_ft", "s_ft", "c_f_ft", "s_f_ft")]
        return np.stack([*_block_natural(data, theta), *rest], axis=1)

    def _bounds(self, data):
        return np.array([-WIDE, -WIDE, EXP_LO, EXP_LO]), np.array([WIDE, WIDE, EXP_HI, EXP_HI])

    def _model(self, data, fixed):
        y = np.log(data.f)
        rho_all = np.asarray(fixed["rho"], float)
        K_all = np.asarray(fixed["c_f_ft"] * fixed["c_ft"], float)
        S_all = np.asarray(fixed["s_f_ft"] - fixed["c_f_ft"] * fixed["s_ft"], float)

        def model(theta, rows, jac):
            rho, K, S = rho_all[rows][:, None], K_all[rows][:, None], S_all[rows][:, None]
            X, dX = _block(data, *theta.T, jac)
            with np.errstate(all="ignore"):
                KY = K * np.exp(rho * np.log(X))
                pred = S - KY
                f = np.where(pred > 0, np.log(np.where(pred > 0, pred, 1.0)), np.nan)
                if not jac:
                    return f, None
                return f, (-(rho * KY / X) / pred)[:, :, None] * dX

        return model, y, data.point

    def _starts(self, data, fixed, deps):
        rho, K = float(fixed["rho"][0]), float(fixed["c_f_ft"][0] * fixed["c_ft"][0])
        grid = _block_grid(data, rhos=(rho,))
        S = float(fixed["s_f_ft"][0] - fixed["c_f_ft"][0] * fixed["s_ft"][0])
        gap = (S - data.f) / K
        target = np.log(gap[gap > 0]) / rho if np.any(gap > 0) else np.zeros(1)
        X = _block(data, *grid[:, :4].T, False)[0][:, data.point]
        log_m = np.median(target) - np.median(np.log(X), axis=1)
        return _rescale(grid, log_m)[:, :4]


LAWS.add(PowerFT.name, PowerFT)
LAWS.add(PowerF.name, PowerF)
