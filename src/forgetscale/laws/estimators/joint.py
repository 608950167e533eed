"""Eq. 5 and Eq. 6 fitted together on both losses (the joint fit), sharing c_ft, s_ft and rho.

Why both: the separate fit lets L_ft alone decide rho and s_ft, which Eq. 6 then inherits; the
joint fit lets forgetting data inform them too. If the reconstructed form is right the two agree
within their intervals; if they disagree, the shared-constant assumption is what to doubt.
c_f_ft and s_f_ft come from Eq. 4 as in the paper; the fit starts from the separate solution.
"""

from __future__ import annotations

import numpy as np

from forgetscale.laws.estimators import forms
from forgetscale.laws.estimators.nonlinear import NonlinearLaw
from forgetscale.laws.estimators.power import (
    EXP_HI,
    EXP_LO,
    RHO_HI,
    RHO_LO,
    WIDE,
    _block,
    _block_internal,
    _block_natural,
)
from forgetscale.laws.estimators.registry import LAWS

FT_COLS = np.array([0, 1, 2, 3, 8, 9])  # constants the L_ft points depend on
F_COLS = np.array([4, 5, 6, 7, 8, 9])


class PowerJoint(NonlinearLaw):
    """Eq. 5 + Eq. 6 with shared c_ft (gauge), s_ft and rho; predicts L_ft and L_f."""

    name = "power_joint"
    title = "Eq. 5 + Eq. 6 fitted jointly (shared c_ft, s_ft, rho)"
    outputs = reads = ("ft", "f")
    names = forms.POWER_JOINT
    free = ("a_ft", "b_ft", "alpha_ft", "beta_ft", "a_f", "b_f", "alpha_f", "beta_f", "rho", "s_ft")
    borrowed = {"c_f_ft": "linear", "s_f_ft": "linear"}
    requires = ("linear", "power_ft", "power_f")

    def _predict(self, p, P, N, ft):
        return {"ft": forms.power_ft(P, N, p), "f": forms.power_f(P, N, p)}

    def _internal(self, data, nat):
        col = {n: nat[:, i] for i, n in enumerate(self.names)}
        ft = _block_internal(data, col["a_ft"], col["b_ft"], col["alpha_ft"], col["beta_ft"])
        f = _block_internal(data, col["a_f"], col["b_f"], col["alpha_f"], col["beta_f"])
        return np.stack([*ft, *f, np.log(col["rho"]), np.log(col["s_ft"])], axis=1)

    def _natural(self, data, theta, fixed):
        b = len(theta)
        c = np.full(b, self.gauge_c_ft)
        cf, sf = (np.broadcast_to(fixed[k], (b,)) for k in ("c_f_ft", "s_f_ft"))
        return np.stack([*_block_natural(data, theta[:, 0:4]), *_block_natural(data, theta[:, 4:8]),
                         np.exp(theta[:, 8]), c, np.exp(theta[:, 9]), cf, sf], axis=1)

    def _bounds(self, data):
        block_lo, block_hi = [-WIDE, -WIDE, EXP_LO, EXP_LO], [WIDE, WIDE, EXP_HI, EXP_HI]
        return (np.array(block_lo * 2 + [RHO_LO, np.log(1e-9)]),
                np.array(block_hi * 2 + [RHO_HI, np.log(10 * data.ft.max())]))

    def _weights(self, w):
        return np.concatenate([w, w], axis=1)

    def _model(self, data, fixed):
        c = self.gauge_c_ft
        y = np.concatenate([np.log(data.ft), np.log(data.f)])
        cf_all, sf_all = np.asarray(fixed["c_f_ft"], float), np.asarray(fixed["s_f_ft"], float)

        def model(theta, rows, jac):
            cf, sf = cf_all[rows][:, None], sf_all[rows][:, None]
            X1, dX1 = _block(data, *theta[:, 0:4].T, jac)
            X2, dX2 = _block(data, *theta[:, 4:8].T, jac)
            rho, s = np.exp(theta[:, 8])[:, None], np.exp(theta[:, 9])[:, None]
            with np.errstate(all="ignore"):
                lX1, lX2 = np.log(X1), np.log(X2)
                cY1, cY2 = c * np.exp(rho * lX1), c * np.exp(rho * lX2)
                p1 = cY1 + s
                p2 = sf - cf * (cY2 + s)
                f = np.concatenate([np.log(p1), np.where(p2 > 0, np.log(np.where(p2 > 0, p2, 1.0)), np.nan)], axis=1)
                if not jac:
                    return f, None
                ft = np.concatenate([(rho * cY1 / X1)[:, :, None] * dX1, (rho * lX1 * cY1)[:, :, None],
                                     np.broadcast_to(s, p1.shape)[:, :, None]], axis=2) / p1[:, :, None]
                fo = np.concatenate([(-cf * rho * cY2 / X2)[:, :, None] * dX2, (-cf * rho * lX2 * cY2)[:, :, None],
                                     np.broadcast_to(-cf * s, p2.shape)[:, :, None]], axis=2) / p2[:, :, None]
                J = [(FT_COLS, ft), (F_COLS, fo)]
                return f, J

        k = data.kP.size
        return model, y, np.concatenate([data.point, data.point + k])

    def _starts(self, data, fixed, deps):
        """The separate solution, and the same with rho moved (a and b rescaled to keep the fit close)."""
        ft, f = deps["power_ft"], deps["power_f"]
        col_ft = {n: ft[:, i] for i, n in enumerate(forms.POWER_FT)}
        col_f = {n: f[:, i] for i, n in enumerate(forms.POWER_F)}
        nat = np.stack([col_ft["a_ft"], col_ft["b_ft"], col_ft["alpha_ft"], col_ft["beta_ft"], col_f["a_f"],
                        col_f["b_f"], col_f["alpha_f"], col_f["beta_f"], col_ft["rho"], col_ft["c_ft"],
                        col_ft["s_ft"], col_f["c_f_ft"], col_f["s_f_ft"]], axis=1)
        base = self._internal(data, nat)
        starts = [base]
        for k in (0.6, 1.6):  # (NaN starts from failed separate fits are dropped below)
            th = base.copy()
            th[:, 8] += np.log(k)
            for block in (0, 4):  # keep X^rho at the centre: X' = X^(1/k)
                X, _ = _block(data, *th[:, block:block + 4].T, False)
                with np.errstate(all="ignore"):
                    log_m = (1.0 / k - 1.0) * np.median(np.log(X), axis=1)
                    th[:, block] += log_m
                    th[:, block + 1] += log_m
            starts.append(th)
        with np.errstate(all="ignore"):
            out = np.concatenate(starts)
        return out[np.all(np.isfinite(out), axis=1)] if np.isfinite(out).all(axis=1).any() else out


LAWS.add(PowerJoint.name, PowerJoint)
