"""The fit loop shared by every nonlinear law: multi-start on the full data, warm starts for resamples.

A subclass says how its constants map to internal coordinates (logs, with log P and log N centred),
gives the model with its exact Jacobian, a grid of starts, and box bounds; this class runs them
through the batched optimiser of `fitting`.
"""

from __future__ import annotations

import numpy as np

from forgetscale.laws.estimators import fitting
from forgetscale.laws.estimators.base import Law
from forgetscale.laws.estimators.select import FitData


class NonlinearLaw(Law):
    """A law fitted by log-space Huber least squares (everything except the linear law)."""

    def _internal(self, data: FitData, natural: np.ndarray) -> np.ndarray:
        """Natural constants (b, len(names)) -> internal coordinates (b, len(free))."""
        raise NotImplementedError

    def _natural(self, data: FitData, theta: np.ndarray, fixed: dict[str, np.ndarray]) -> np.ndarray:
        """Internal coordinates -> natural constants, filling in fixed and borrowed ones."""
        raise NotImplementedError

    def _model(self, data: FitData, fixed: dict[str, np.ndarray]) -> tuple[fitting.Model, np.ndarray, np.ndarray]:
        """The batched model (evaluated at design points), the log observations, and each one's point."""
        raise NotImplementedError

    def _starts(self, data: FitData, fixed: dict[str, np.ndarray], deps: dict[str, np.ndarray]) -> np.ndarray:
        """Internal starting points (starts, len(free)) for the full-data fit."""
        raise NotImplementedError

    def _bounds(self, data: FitData) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _weights(self, w: np.ndarray) -> np.ndarray:
        """Per-residual weights from per-row weights (the joint law has two residuals per row)."""
        return w

    def _solve(self, data, w, fixed, warm, deps):
        lower, upper = self._bounds(data)
        kw = {"lower": lower, "upper": upper, "delta": self.huber_delta}
        if warm is None:
            starts = self._starts(data, fixed, deps)
            fixed_s = {k: np.repeat(v, len(starts)) for k, v in fixed.items()}
            model, y, point = self._model(data, fixed_s)
            sol = fitting.multistart(model, starts, y, self._weights(w), point, **kw)
        else:
            theta0 = np.repeat(self._internal(data, warm), w.shape[0], axis=0)
            model, y, point = self._model(data, fixed)
            sol = fitting.lm_huber(model, theta0, y, self._weights(w), point, ftol=1e-9, **kw)
            self._rescue(data, w, fixed, deps, sol, kw)
        natural = self._natural(data, sol.theta, fixed)
        natural[~np.isfinite(sol.cost)] = np.nan
        return natural, sol.converged, sol.at_bound

    def _rescue(self, data, w, fixed, deps, sol: fitting.Solution, kw: dict) -> None:
        """Resamples the warm start could not serve (its prediction left the model's domain under that
        resample's borrowed constants) get the full multi-start, all of them in one batch."""
        bad = np.flatnonzero(~np.isfinite(sol.cost))
        if bad.size == 0:
            return
        starts, owner = [], []
        for i in bad:
            s = self._starts(data, {k: np.asarray(v)[[i]] for k, v in fixed.items()},
                             {k: v[[i]] for k, v in deps.items()})
            s = s[np.all(np.isfinite(s), axis=1)]
            starts.append(s)
            owner.append(np.full(len(s), i))
        if not sum(len(s) for s in starts):
            return
        starts, owner = np.concatenate(starts), np.concatenate(owner)
        model, y, point = self._model(data, {k: np.asarray(v)[owner] for k, v in fixed.items()})
        res = fitting.lm_huber(model, starts, y, self._weights(w[owner]), point, ftol=1e-9, **kw)
        for i in bad:
            mine = np.flatnonzero(owner == i)
            if mine.size and np.isfinite(res.cost[mine]).any():
                j = mine[np.argmin(np.where(np.isfinite(res.cost[mine]), res.cost[mine], np.inf))]
                sol.theta[i], sol.cost[i], sol.converged[i] = res.theta[j], res.cost[j], res.converged[j]

    def _jacobian(self, data: FitData, params: np.ndarray) -> np.ndarray | None:
        names = list(self.names)
        fixed = {k: params[:, names.index(k)] for k in self.borrowed}
        model, _, _ = self._model(data, fixed)
        _, J = model(self._internal(data, params), np.zeros(1, int), True)
        if isinstance(J, list):  # sparse blocks -> dense
            dense = np.zeros((sum(j.shape[1] for _, j in J), len(self.free)))
            start = 0
            for cols, j in J:
                dense[start:start + j.shape[1], cols] = j[0]
                start += j.shape[1]
            J = dense[None]
        return J[0] if J is not None and np.all(np.isfinite(J)) else None
