"""Fitting machinery shared by every law: batched log-space Huber Levenberg-Marquardt and the run bootstrap.

Why batched: a bootstrap resample of whole runs keeps every checkpoint and only changes how often
each run counts, so all 1,000 resamples are the same least-squares problem with different weights.
Solving them together as one (resamples x points) array problem (and the multi-start grid the
same way) is what makes `forgetscale fit` interactive; see benchmarks/bench_fit.py.

Method (Besiroglu et al. 2024, Chinchilla re-analysis): residuals are log(pred) - log(obs), the loss
is Huber with a small delta (robust to a few bad checkpoints), parameters are optimised as logs so
they stay positive, and the result is never rounded. Each Levenberg-Marquardt step solves the
iteratively-reweighted Gauss-Newton system, whose gradient is the exact Huber gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

HUBER_DELTA = 1e-3
# model(theta (b, p), rows (b,), jac) -> (log prediction (b, k), d log prediction / d theta (b, k, p) or None)
# at the k distinct design points; `rows` says which resamples the b parameter rows belong to (for
# per-resample fixed constants). A sparse Jacobian may come as [(columns, (b, k_g, p_g)), ...] over
# consecutive blocks of points (the joint law: L_ft points need no L_f constants and vice versa).
Model = Callable[[np.ndarray, np.ndarray, bool], tuple[np.ndarray, np.ndarray | None]]


@dataclass
class Solution:
    """Optimiser output for a batch of problems (one row per start or per bootstrap resample)."""

    theta: np.ndarray  # (b, p) internal parameters
    cost: np.ndarray  # (b,) Huber cost; inf where the model could not be evaluated
    converged: np.ndarray  # (b,) bool
    n_iter: np.ndarray  # (b,) iterations taken
    at_bound: np.ndarray  # (b, p) bool: parameter pinned to its box


class _Residuals:
    """Observations sorted by design point, so per-point sums are one reduceat.

    Seeds of one rank share every (P, N) point: the model and its Jacobian are evaluated once per
    point and the Huber weights summed per point, which divides the work by the number of seeds.
    """

    def __init__(self, y: np.ndarray, point: np.ndarray, delta: float) -> None:
        self.order = np.argsort(point, kind="stable")
        self.y = y[self.order]
        self.point = point[self.order]
        self.seg = np.flatnonzero(np.r_[True, self.point[1:] != self.point[:-1]])
        if self.seg.size != int(self.point.max()) + 1:
            raise ValueError("every design point needs at least one observation")
        self.delta = delta

    def weights(self, w: np.ndarray) -> np.ndarray:
        return w[:, self.order]

    def _residuals(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row residuals, and which problems have a prediction outside the model's domain."""
        bad = ~np.all(np.isfinite(f), axis=1)
        if bad.any():
            f = np.where(np.isfinite(f), f, 0.0)
        return f[:, self.point] - self.y, bad

    def cost(self, f: np.ndarray, w: np.ndarray) -> np.ndarray:
        r, bad = self._residuals(f)
        psi = np.clip(r, -self.delta, self.delta)  # Huber: psi * (r - psi / 2) is r^2/2 inside, d|r| - d^2/2 outside
        cost = np.einsum("bm,bm->b", w * psi, r - 0.5 * psi)
        cost[bad] = np.inf
        return cost

    def system(self, f: np.ndarray, J: np.ndarray, w: np.ndarray):
        """Huber cost, exact gradient, and the reweighted Gauss-Newton matrix (IRLS majoriser)."""
        r, bad = self._residuals(f)
        psi = np.clip(r, -self.delta, self.delta)
        wpsi = w * psi
        cost = np.einsum("bm,bm->b", wpsi, r - 0.5 * psi)
        cost[bad] = np.inf
        omega = np.divide(wpsi, r, out=w.copy(), where=np.abs(r) > self.delta)  # IRLS weight w * psi / r
        om = np.add.reduceat(omega, self.seg, axis=1)
        omr = np.add.reduceat(wpsi, self.seg, axis=1)
        if isinstance(J, np.ndarray):
            J = [(None, J)]
        b = f.shape[0]
        p = sum(Jg.shape[2] for _, Jg in J) if J[0][0] is None else 1 + max(int(c.max()) for c, _ in J)
        g, H = np.zeros((b, p)), np.zeros((b, p, p))
        start = 0
        for cols, Jg in J:  # blocks of consecutive design points that depend on a subset of columns
            sl = slice(start, start + Jg.shape[1])
            start = sl.stop
            if bad.any():
                Jg = np.where(np.isfinite(Jg), Jg, 0.0)
            with np.errstate(invalid="ignore", over="ignore"):  # a diverging trial step: its cost is inf anyway
                gg = np.einsum("bkp,bk->bp", Jg, omr[:, sl])
                HH = np.matmul(np.swapaxes(Jg * om[:, sl, None], 1, 2), Jg)
            if cols is None:
                g, H = gg, HH
            else:
                g[:, cols] += gg
                H[:, cols[:, None], cols[None, :]] += HH
        return cost, g, H


def lm_huber(
    model: Model,
    theta0: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    point: np.ndarray,
    *,
    lower: np.ndarray,
    upper: np.ndarray,
    delta: float = HUBER_DELTA,
    max_iter: int = 400,
    ftol: float = 1e-10,
    window: int = 10,
    window_ftol: float = 1e-5,
) -> Solution:
    """Minimise sum_i w_i huber(log pred(point_i) - log y_i) for every row of theta0 at once.

    y is log observations (m,) and point (m,) the design point of each; w is (b, m) or (m,)
    non-negative weights. Steps that leave the model's domain (a non-positive prediction) are
    rejected like any step that raises the cost. Levenberg-Marquardt with Nielsen's damping update.
    A problem stops when one step lowers the cost by less than `ftol` (relative), or `window` steps
    together by less than `window_ftol`.
    """
    theta = np.clip(np.array(theta0, dtype=float), lower, upper)
    b, p = theta.shape
    res = _Residuals(np.asarray(y, float), np.asarray(point), delta)
    w_all = res.weights(np.broadcast_to(np.asarray(w, dtype=float), (b, y.size)))
    f, J = model(theta, np.arange(b), True)
    cost, g, H = res.system(f, J, w_all)
    converged = np.zeros(b, bool)
    n_iter = np.zeros(b, int)
    # working set: the problems still running, compacted as they finish
    idx = np.flatnonzero(np.isfinite(cost))
    th, c, gk, Hk, wk = theta[idx], cost[idx], g[idx], H[idx], w_all[idx]
    lam, nu, snapshot = np.full(idx.size, 1e-3), np.full(idx.size, 2.0), c.copy()
    eye = np.eye(p)
    for it in range(max_iter):
        if idx.size == 0:
            break
        diag = np.maximum(np.diagonal(Hk, axis1=1, axis2=2), 1e-12)
        A = Hk + lam[:, None, None] * (diag[:, :, None] * eye)
        try:
            step = -np.linalg.solve(A, gk[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = -np.stack([np.linalg.lstsq(a, gg, rcond=None)[0] for a, gg in zip(A, gk, strict=True)])
        trial = np.clip(th + step, lower, upper)
        step = trial - th
        f_t, J_t = model(trial, idx, True)
        c_t, g_t, H_t = res.system(f_t, J_t, wk)
        n_iter[idx] += 1
        ok = c_t < c
        rel = (c - c_t) / np.maximum(c, 1e-300)
        # gain ratio: actual decrease over the decrease the quadratic model promised (Nielsen's rule)
        promised = -(np.einsum("bp,bp->b", step, gk) + 0.5 * np.einsum("bp,bpq,bq->b", step, Hk, step))
        gain = (c - c_t) / np.maximum(promised, 1e-300)
        th[ok], c[ok], gk[ok], Hk[ok] = trial[ok], c_t[ok], g_t[ok], H_t[ok]
        lam[ok] = np.maximum(lam[ok] * np.maximum(1.0 / 3.0, 1.0 - (2.0 * np.minimum(gain[ok], 1.0) - 1.0) ** 3), 1e-12)
        nu[ok] = 2.0
        lam[~ok] *= nu[~ok]
        nu[~ok] *= 2.0
        done = (ok & ((rel < ftol) | (np.abs(step).max(axis=1) < 1e-12))) | (~ok & (lam > 1e10))
        if it % window == window - 1:  # crawling: IRLS on a nearly-L1 loss can creep for hundreds of steps
            done |= (snapshot - c) <= window_ftol * c
            snapshot = c.copy()
        if done.any() or it == max_iter - 1:
            theta[idx], cost[idx] = th, c
            converged[idx[done]] = True
            keep = ~done
            idx, th, c, gk, Hk, wk = idx[keep], th[keep], c[keep], gk[keep], Hk[keep], wk[keep]
            lam, nu, snapshot = lam[keep], nu[keep], snapshot[keep]
    at_bound = (theta <= lower + 1e-6) | (theta >= upper - 1e-6)
    return Solution(theta, cost, converged, n_iter, at_bound)


def multistart(model: Model, starts: np.ndarray, y: np.ndarray, w: np.ndarray, point: np.ndarray,
               **kw) -> Solution:
    """Run every start together, keep the lowest-cost one, and polish it with strict stopping rules."""
    sol = lm_huber(model, starts, y, w, point, **kw)
    cost = np.where(np.isfinite(sol.cost), sol.cost, np.inf)
    best = int(np.argmin(cost))
    if not np.isfinite(cost[best]):
        return Solution(sol.theta[best:best + 1], sol.cost[best:best + 1], np.zeros(1, bool),
                        sol.n_iter[best:best + 1], sol.at_bound[best:best + 1])
    strict = {**kw, "ftol": 1e-13, "window_ftol": 1e-10, "max_iter": 3000}
    return lm_huber(model, sol.theta[best:best + 1], y, np.asarray(w)[:1] if np.ndim(w) == 2 else w, point, **strict)


def scale_offset(g: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relative least squares for the linear coefficients of a start: (C, s) minimising
    sum_i ((C g_i + s) / y_i - 1)^2 for every row of g (b, m), in closed form (a 2x2 system).

    Why relative: the laws are fitted on log residuals, so a start should match every observation to
    the same fraction, not the largest ones best. Rows whose system is singular give NaN.
    """
    Z = g / y
    one = 1.0 / y
    a11, a12, a22 = (Z * Z).sum(1), (Z * one).sum(1), (one * one).sum()
    b1, b2 = Z.sum(1), one.sum()
    det = a11 * a22 - a12 * a12
    with np.errstate(all="ignore"):
        return (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det


def scale_given_offset(g: np.ndarray, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The same relative least squares for C alone, with the offset s (b,) held fixed."""
    Z = g / y
    with np.errstate(all="ignore"):
        return (Z * (1 - s[:, None] * (1.0 / y))).sum(1) / (Z * Z).sum(1)


def bootstrap_counts(run_codes: np.ndarray, strata: np.ndarray, n_boot: int, seed: int,
                     min_strata: int = 2) -> tuple[np.ndarray, int]:
    """How often each run enters each resample: (n_boot, runs) counts, and how many draws were redone.

    Whole runs are resampled because the checkpoints of one run are correlated. Runs are drawn
    across the group, not within each P: a sweep usually has one run per rank, where resampling
    within a rank would show no variation at all, and in simulations with three seeds per rank
    within-rank resampling gave intervals that covered the truth less often than stated. A draw
    that keeps fewer than `min_strata` distinct P values (strata) is redone, since no law with a
    P term can be fitted on it.
    """
    n_runs = int(run_codes.max()) + 1 if run_codes.size else 0
    rng = np.random.default_rng(seed)
    _, stratum = np.unique(strata, return_inverse=True)
    need = min(min_strata, int(stratum.max()) + 1 if stratum.size else 0)
    counts = np.zeros((n_boot, n_runs), dtype=np.int64)
    redrawn = 0
    for i in range(n_boot):
        while True:
            pick = rng.integers(0, n_runs, size=n_runs)
            if np.unique(stratum[pick]).size >= need:
                break
            redrawn += 1
        np.add.at(counts[i], pick, 1)
    return counts, redrawn


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis, ignoring failed resamples (NaN)."""
    tail = 50.0 * (1.0 - level)
    draws = np.asarray(draws, dtype=float)
    if draws.shape[0] == 0:  # no resamples (no intervals): NaN, not an error
        nan = np.full(draws.shape[1:], np.nan)
        return nan, nan.copy()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, which is the answer
        lo, hi = np.nanpercentile(draws, [tail, 100.0 - tail], axis=0)
    return lo, hi


def weak_directions(J: np.ndarray, names: list[str], cond_limit: float = 1e8) -> list[str]:
    """Parameters on the nearly-flat direction of the Jacobian (empty when it is well conditioned)."""
    scale = np.linalg.norm(J, axis=0)
    if np.any(scale == 0):
        return [n for n, s in zip(names, scale, strict=True) if s == 0]
    _, s, vt = np.linalg.svd(J / scale, full_matrices=False)
    if s[-1] > 0 and s[0] / s[-1] < cond_limit:
        return []
    v = np.abs(vt[-1])
    return [n for n, x in zip(names, v, strict=True) if x > 0.3]


def r2(obs: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination in the loss's own units (as the paper reports it)."""
    ss_res = float(np.sum((obs - pred) ** 2))
    ss_tot = float(np.sum((obs - obs.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def mare(obs: np.ndarray, pred: np.ndarray) -> float:
    """Mean absolute relative error: the held-out extrapolation error we report."""
    return float(np.mean(np.abs(pred - obs) / np.abs(obs))) if obs.size else float("nan")
