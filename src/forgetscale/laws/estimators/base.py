"""The estimator contract every law follows (scikit-learn style), and the fit template they share.

`fit(frame)` selects rows, fits the full data (multi-start), refits each run-bootstrap resample
(warm-started, batched), refits on the held-out split, and sets the learned attributes, which end
in `_`: `params_`, `ci_`, `boot_`, `status_` (never None), `r2_`, `heldout_mare_`, `heldout_errors_`,
`noise_`, `weak_`.

Two intervals: `predict_interval(kind="mean")` is the bootstrap interval of the mean curve (the
uncertainty of the constants); `kind="new_run"` adds the scatter of one new run around that curve
(seed-to-seed and measurement noise, estimated from the fit's residuals), which is what a run not
yet made falls inside.
A law that reuses another law's constants (Eq. 6 reuses Eq. 4 and Eq. 5) takes that law's values
per bootstrap resample, so the uncertainty of the shared constants carries through.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

import numpy as np
import pandas as pd

from forgetscale.errors import DataError, NotFittedError
from forgetscale.laws.estimators import fitting
from forgetscale.laws.estimators.select import (
    FT_COLUMNS,
    TARGETS,
    FitData,
    Selection,
    heldout_split,
    select_rows,
)
from forgetscale.laws.estimators.settings import Setting
from forgetscale.registry import Registry

FORECAST_METRICS = ("mae", "mare", "rise", "bias")


def heldout_errors(te: FitData, output: str, pred: np.ndarray) -> dict[str, float]:
    """Forecast errors on held-out rows, in the units that matter.

    mae: mean |error| in nats; mare: relative to the loss itself (for forget_ce that includes the base
    entropy, which no fine-tune moves, so it flatters); rise: mean |error| over the mean distance the
    runs moved from their base (the KL rise for L_f, the L_ft drop for L_ft); bias: the signed mean error
    on the same scale (negative: the law under-predicts the change)."""
    obs = te.ft if output == "ft" else te.f
    base = te.ft0 if output == "ft" else te.f0
    err = pred - obs
    moved = float(np.mean(np.abs(obs - base))) if obs.size else float("nan")
    sign = 1.0 if output == "f" else -1.0  # L_f rises from its base, L_ft falls
    with np.errstate(all="ignore"):
        return {"mae": float(np.mean(np.abs(err))) if obs.size else float("nan"),
                "mare": fitting.mare(obs, pred),
                "rise": float(np.mean(np.abs(err)) / moved) if moved > 0 else float("nan"),
                "bias": float(sign * np.mean(err) / moved) if moved > 0 else float("nan"),
                "rows": int(obs.size)}

GAUGE_C_FT = 0.002  # c_ft is pinned here (see forms.regauge): the paper's OpenOrca value, so a, b read on its scale
RHO_RANGE = (0.05, 100.0)  # box on rho (power laws); a fit that ends on it has not identified rho
WEAK_RATIO = 10.0  # a constant whose 95% bootstrap interval spans more than this factor is reported as not identified
MIN_RUNS = 3  # fewer runs: every resample is (nearly) the original sweep, so no interval is given
MIN_DISTINCT = 10  # fewer distinct resamples than this: a percentile interval is false precision, none is given
MAX_FAILED = 0.1  # more bootstrap refits than this share failing: no interval (not converging: said in status)
OUTPUT_COLUMN = {"ft": "ft_loss", "f": "forgetting"}


def _step_or_auto(v: Any) -> bool:
    return v == "auto" or (isinstance(v, int) and v >= 1)


def _resamples(v: Any) -> bool:
    return isinstance(v, int) and (v == 0 or v >= 20)


def _positive(v: Any) -> bool:
    return v > 0


class Law:
    """Base estimator. Subclasses set the class attributes and implement `_solve` and `_predict`."""

    name: ClassVar[str]
    title: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]]  # "ft" (L_ft), "f" (L_f), or both
    reads: ClassVar[tuple[str, ...]]  # which losses the fit reads ("ft", "f")
    names: ClassVar[tuple[str, ...]]  # every constant of the form, in print order
    free: ClassVar[tuple[str, ...]]  # the constants this law fits (the rest are fixed or borrowed)
    borrowed: ClassVar[dict[str, str]] = {}  # constant -> law it is taken from
    requires: ClassVar[tuple[str, ...]] = ()
    given_ft: ClassVar[bool] = False  # predicts from a measured L_ft (Eq. 4), not from (P, N): not a forecast
    space: ClassVar[str] = "log"  # where residuals are measured: "log" (log-space fits) or "nats" (OLS)
    min_ranks: ClassVar[int] = 2
    min_steps: ClassVar[int] = 3

    def __init__(
        self,
        *,
        target: Annotated[str, Setting(
            "forgetting measure: CE against the base model (the paper's L_f) or its KL part", choices=TARGETS,
        )] = "forget_ce",
        ft_column: Annotated[str, Setting(
            "fine-tuning loss: held-out (default) or on training blocks", choices=FT_COLUMNS,
        )] = "ft_loss",
        min_step: Annotated[int | str, Setting(
            "smallest step fitted (default: min(50, 20% of the largest step))", parse=int,
            check=_step_or_auto, rule="'auto' or an integer >= 1",
        )] = "auto",
        include_unfinished: Annotated[bool, Setting("also use rows of unfinished runs")] = False,
        n_bootstrap: Annotated[int, Setting(
            "bootstrap resamples (default 1000; 0: none)", flag="--bootstrap",
            check=_resamples, rule="0 (no intervals) or an integer >= 20",
        )] = 1000,
        seed: Annotated[int, Setting("bootstrap seed (default 0)")] = 0,
        huber_delta: Annotated[float, Setting(
            "Huber threshold on log residuals (1e-3)", check=_positive, rule="> 0",
        )] = fitting.HUBER_DELTA,
        gauge_c_ft: Annotated[float, Setting(
            "value c_ft is pinned to (see forms.regauge)", flag=None, check=_positive, rule="> 0",
        )] = GAUGE_C_FT,
        heldout: Annotated[bool, Setting(
            "also refit on the held-out split and score its forecast", option=False,
        )] = True,
    ) -> None:
        self.target, self.ft_column, self.min_step = target, ft_column, min_step
        self.include_unfinished, self.n_bootstrap, self.seed = include_unfinished, n_bootstrap, seed
        self.huber_delta, self.gauge_c_ft, self.heldout = huber_delta, gauge_c_ft, heldout

    @classmethod
    def _param_names(cls) -> tuple[str, ...]:
        """The settings: every keyword of __init__ (scikit-learn's rule), so none is listed twice."""
        return tuple(p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY)

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._param_names()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    # -- hooks ----------------------------------------------------------------------------------
    def _solve(self, data: FitData, w: np.ndarray, fixed: dict[str, np.ndarray], warm: np.ndarray | None,
               deps: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fit every row of weights `w` (b, n): natural constants (b, len(names)), converged (b,), and
        which free constants ended on their box bound (b, len(free))."""
        raise NotImplementedError

    def _predict(self, p: Mapping[str, np.ndarray], P: np.ndarray, N: np.ndarray,
                 ft: np.ndarray | None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _jacobian(self, data: FitData, params: np.ndarray) -> np.ndarray | None:
        """Log-residual Jacobian in the free constants at the optimum (None: nothing to check)."""
        return None

    # -- validation -----------------------------------------------------------------------------
    def _columns(self) -> tuple[str, ...]:
        """The stored columns this law reads: the L_ft column and/or the forgetting target."""
        return tuple(self.ft_column if r == "ft" else self.target for r in self.reads)

    def _validate(self, data: FitData) -> None:
        law = f"law '{self.name}'"
        ranks = np.unique(data.P)
        if ranks.size < self.min_ranks:
            raise DataError(
                f"{law} needs at least {self.min_ranks} distinct ranks (trainable_params) to identify its P "
                f"exponent; got {ranks.size} (P={', '.join(f'{p:.0f}' for p in ranks)})"
            )
        steps = np.unique(data.N)
        if steps.size < self.min_steps:
            raise DataError(f"{law} needs at least {self.min_steps} distinct steps >= min_step; got {steps.size}")
        if self.n_bootstrap and len(data.run_ids) < 2:
            raise DataError(f"{law} needs at least 2 runs to bootstrap its intervals; got 1 ({data.run_ids[0]})")
        if data.n < len(self.free) + 2:
            raise DataError(f"{law} needs at least {len(self.free) + 2} checkpoints; got {data.n}")
        for col, values in ((self.ft_column, data.ft), (self.target, data.f)):
            if col in self._columns() and np.ptp(values) == 0:
                raise DataError(
                    f"{law} needs {col} to vary across checkpoints; it is constant ({values[0]:.6g}) "
                    f"over all {data.n} rows"
                )

    # -- fit ------------------------------------------------------------------------------------
    def _settings_key(self) -> tuple:
        """Settings that change a fit, other than min_step (whose effect is in the rows)."""
        p = self.get_params()
        return tuple(p[k] for k in sorted(p) if k != "min_step")

    def _dependencies(self, sel: Selection, fingerprint: str, given: Mapping[str, Law] | None) -> dict[str, Law]:
        """The fitted laws whose constants this one borrows: reused when fitted on the same rows and
        settings (so they share bootstrap resamples), otherwise fitted here on our rows."""
        out: dict[str, Law] = {}
        for name in self.requires:
            dep = (given or {}).get(name)
            if dep is None or getattr(dep, "fingerprint_", None) != fingerprint:
                params = {**self.get_params(), "min_step": sel.min_step}
                dep = LAWS.get(name)(**params).fit(sel.rows, deps={**(given or {}), **out})
                if dep.fingerprint_ != fingerprint:
                    raise DataError(f"law '{self.name}' and law '{name}' selected different rows; "
                                    "make the used columns finite on the same checkpoints")
            out[name] = dep
        return out

    def _borrow(self, deps: dict[str, Law], which: str) -> dict[str, np.ndarray]:
        """Constants taken from other laws, as (b,) arrays: 'full', 'boot' or 'heldout' values."""
        fixed: dict[str, np.ndarray] = {}
        for const, law in self.borrowed.items():
            dep = deps[law]
            col = list(dep.names).index(const)
            if which == "full":
                fixed[const] = np.array([dep.params_[const]])
            elif which == "boot":
                fixed[const] = dep.boot_[:, col]
            else:
                fixed[const] = np.array([np.nan if dep.heldout_params_ is None else dep.heldout_params_[const]])
        return fixed

    def fit(self, frame: pd.DataFrame, deps: Mapping[str, Law] | None = None) -> Law:
        """Fit on stored checkpoint rows (Store.frame() of one group); returns self."""
        sel = select_rows(frame, law=self.name, columns=self._columns(), min_step=self.min_step,
                          include_unfinished=self.include_unfinished)
        data = FitData.from_frame(sel.rows, self.target, self.ft_column)
        self._validate(data)
        self.fingerprint_ = None
        fingerprint = data.fingerprint(self._settings_key())
        dep = self._dependencies(sel, fingerprint, deps)
        names = list(self.names)
        full, conv, bound = self._solve(data, np.ones((1, data.n)), self._borrow(dep, "full"), None,
                                        {k: np.array([[v.params_[c] for c in v.names]]) for k, v in dep.items()})
        self.params_ = dict(zip(names, (float(x) for x in full[0]), strict=True))
        self.at_bound_ = [n for n, b in zip(self.free, bound[0], strict=True) if b]
        rho = self.params_.get("rho") if "rho" in self.borrowed else None
        pinned = rho is not None and not RHO_RANGE[0] * (1 + 1e-6) < rho < RHO_RANGE[1] * (1 - 1e-6)
        self._borrowed_at_bound = ["rho"] if pinned else []
        self.converged_ = bool(conv[0])
        self.selection_ = sel
        self.excluded_ = dict(sel.excluded)
        self.rows_ = sel.used()
        self.min_step_ = sel.min_step
        self.n_rows_ = data.n
        self.ranges_ = {"P": [float(data.P.min()), float(data.P.max())], "N": [float(data.N.min()), float(data.N.max())]}
        self.ranks_ = self._ranks(sel.rows)
        self.fingerprint_ = fingerprint
        self._fit_bootstrap(data, dep, full)
        self._fit_heldout(data, dep)
        self._fit_noise(data, full)
        pred = self._predict(self._columns_of(full), data.P, data.N, data.ft)
        self.r2_ = {o: fitting.r2(self._obs(data, o), pred[o][0]) for o in self.outputs}
        self._set_status(data, full)
        return self

    @staticmethod
    def _ranks(rows: pd.DataFrame) -> dict[str, float]:
        if "rank" not in rows:
            return {}
        pairs = rows.dropna(subset=["rank"]).groupby("rank")["trainable_params"].first()
        return {str(int(r)): float(p) for r, p in pairs.items()}

    @staticmethod
    def _obs(data: FitData, output: str) -> np.ndarray:
        return data.ft if output == "ft" else data.f

    def _columns_of(self, params: np.ndarray) -> dict[str, np.ndarray]:
        return {n: params[:, i : i + 1] for i, n in enumerate(self.names)}

    def _fit_bootstrap(self, data: FitData, dep: dict[str, Law], full: np.ndarray) -> None:
        self.bootstrap_ = {"n": int(self.n_bootstrap), "seed": int(self.seed), "scheme": "none", "redrawn": 0}
        self.boot_ = np.empty((0, len(self.names)))
        self.ci_ = {n: (float("nan"), float("nan")) for n in self.names}
        if not self.n_bootstrap:
            return
        # the same draws for every law (min_strata fixed), so borrowed constants come from the same resample
        counts, redrawn = fitting.bootstrap_counts(data.run, data.run_strata(), int(self.n_bootstrap), int(self.seed))
        n_runs, distinct = len(data.run_ids), int(np.unique(counts, axis=0).shape[0])
        self.bootstrap_.update(scheme="whole runs resampled across the group", redrawn=int(redrawn),
                               distinct=distinct)
        if n_runs < MIN_RUNS:
            self.bootstrap_["no_interval"] = f"too few runs ({n_runs}; intervals need >= {MIN_RUNS})"
            return
        if distinct < MIN_DISTINCT:
            self.bootstrap_["no_interval"] = (f"too few distinct resamples ({distinct} of {self.n_bootstrap} "
                                              f"from {n_runs} runs; intervals need >= {MIN_DISTINCT}): add runs")
            return
        w = counts[:, data.run].astype(float)
        dep_boot = {k: v.boot_ for k, v in dep.items()}
        boot, conv, _ = self._solve(data, w, self._borrow(dep, "boot"), full, dep_boot)
        failed = ~np.all(np.isfinite(boot), axis=1)
        boot[failed] = np.nan
        # a refit stopped by the iteration limit is kept: its predictions agree with the converged refits'
        # (the slow directions are the constants' flat ones), but the status says how many there were
        not_converged = int((~conv & ~failed).sum())
        self.bootstrap_.update(failed=int(failed.sum()), not_converged=not_converged)
        if failed.sum() > MAX_FAILED * len(boot):  # too few refits for any interval worth printing
            self.bootstrap_["no_interval"] = f"{int(failed.sum())} of {len(boot)} bootstrap refits failed"
            self.boot_ = np.full_like(boot, np.nan)
            return
        if not_converged > MAX_FAILED * len(boot):
            self.bootstrap_["note"] = (f"{not_converged} of {len(boot)} bootstrap refits stopped at the iteration "
                                       "limit (kept: their predictions agree; their constants may not)")
        self.boot_ = boot
        lo, hi = fitting.interval(boot)
        self.ci_ = {n: (float(a), float(b)) for n, a, b in zip(self.names, lo, hi, strict=True)}

    def _fit_heldout(self, data: FitData, dep: dict[str, Law]) -> None:
        self.heldout_params_ = None
        self.heldout_mare_ = {o: float("nan") for o in self.outputs}
        self.heldout_errors_: dict[str, dict[str, Any]] = {}
        self.heldout_test_: FitData | None = None
        train, test, desc = heldout_split(data)
        if train.any() and int(train.sum()) < len(self.free) + 2:
            desc = f"no held-out test: {int(train.sum())} training rows for {len(self.free)} constants"
            train = test = np.zeros_like(train)
        self.heldout_split_ = {"description": desc, "test": [], "p_max": None, "n_cut": None}
        if not self.heldout or not train.any():
            return
        tr = data.subset(train, self.target, self.ft_column)
        dep_ho = {k: np.array([[v.heldout_params_[c] for c in v.names]]) for k, v in dep.items()
                  if v.heldout_params_ is not None}
        if len(dep_ho) < len(dep):
            return
        params, _, _ = self._solve(tr, np.ones((1, tr.n)), self._borrow(dep, "heldout"), None, dep_ho)
        self.heldout_params_ = dict(zip(self.names, (float(x) for x in params[0]), strict=True))
        te = data.subset(test, self.target, self.ft_column)
        self.heldout_test_ = te
        pred = self._predict(self._columns_of(params), te.P, te.N, te.ft)
        for o in self.outputs:
            self.heldout_errors_[o] = {**heldout_errors(te, o, pred[o][0]), "given_ft": self.given_ft}
            self.heldout_mare_[o] = self.heldout_errors_[o]["mare"]
        self.heldout_split_.update(
            p_max=float(data.P.max()), n_cut=float(data.N[train].max()),
            test=[[str(r), int(s)] for r, s in zip(data.frame["run_id"][test], data.frame["step"][test], strict=True)],
        )

    def _fit_noise(self, data: FitData, full: np.ndarray) -> None:
        """How far one run's checkpoints scatter around the fitted curve, per output: the part of a
        new run's prediction interval that no amount of fitting removes.

        Residuals are taken in the space the law is fitted in (log for the power laws, nats for the
        straight line). Their spread is split into a per-run offset (seed-to-seed: a run sits above or
        below the curve as a whole) and the point-to-point rest (measurement noise); a new checkpoint
        deviates by both. Degrees of freedom use the runs, not the rows, when the runs' offsets dominate
        (Kish's design effect), so a sweep of few runs gets wide t quantiles rather than false precision.
        """
        pred = self._predict(self._columns_of(full), data.P, data.N, data.ft)
        self.noise_ = {}
        for o in self.outputs:
            obs, p = self._obs(data, o), pred[o][0]
            with np.errstate(all="ignore"):
                r = obs - p if self.space == "nats" else np.log(obs) - np.log(p)
            if not np.all(np.isfinite(r)):
                continue
            n, k = r.size, len(data.run_ids)
            dof_fit = max(1, n - len(self.free))
            total = float(np.sum(r**2) / dof_fit)
            means = np.bincount(data.run, weights=r, minlength=k) / np.maximum(np.bincount(data.run, minlength=k), 1)
            within = r - means[data.run]
            point = float(np.sum(within**2) / max(1, n - k)) if n > k else float("nan")
            run = max(0.0, total - point) if np.isfinite(point) else total
            icc = run / total if total > 0 else 0.0
            m = n / k
            n_eff = n / (1.0 + (m - 1.0) * icc)
            dof = float(max(1.0, n_eff - 1.0))
            self.noise_[o] = {"sd": float(np.sqrt(total)), "run_sd": float(np.sqrt(run)),
                              "point_sd": float(np.sqrt(point)) if np.isfinite(point) else None,
                              "dof": dof, "space": self.space, "runs": k, "rows": n}

    def _set_status(self, data: FitData, full: np.ndarray) -> None:
        """'converged', 'not converged: why' or 'not identifiable: which constants and why' (never None)."""
        self.weak_ = []
        if not np.all(np.isfinite(full)):
            bad = [n for n, x in zip(self.names, full[0], strict=True) if not np.isfinite(x)]
            self.weak_ = list(self.free)
            self.status_ = (f"not identifiable: {', '.join(bad)} beyond floating-point range (an exponent went to 0)"
                            if len(bad) < len(self.names) else "not converged: the optimiser found no solution")
            return
        if not self.converged_:
            self.weak_ = list(self.free)
            self.status_ = "not converged: iteration limit reached before the loss stopped falling"
            return
        J = self._jacobian(data, full)
        flat = [] if J is None else fitting.weak_directions(J, list(self.free))
        wide = []
        no_interval = self.bootstrap_.get("no_interval")
        for name in self.free:
            lo, hi = self.ci_[name]
            if self.n_bootstrap and not no_interval and (
                    not np.isfinite(lo) or not np.isfinite(hi) or lo <= 0 or hi / lo > WEAK_RATIO):
                wide.append(name)
        reasons = []
        pinned = [*self.at_bound_, *(f"{n} (from {self.borrowed[n]})" for n in getattr(self, "_borrowed_at_bound", []))]
        if pinned:
            # the other shape constants' intervals are then conditional on the bound: not to be quoted either
            coupled = [n for n in self.free if not n.startswith(("s_", "E")) and n not in self.at_bound_]
            reasons.append(f"{', '.join(pinned)} ran to {'its bound' if len(pinned) == 1 else 'their bounds'}" +
                           (f" (intervals of {', '.join(coupled)} assume it)" if coupled else ""))
            self.at_bound_ = [*self.at_bound_, *coupled]
        flat = [n for n in flat if n not in self.at_bound_]
        if flat:
            reasons.append(f"{', '.join(flat)} on a flat direction of the loss")
        wide = [n for n in wide if n not in self.at_bound_ and n not in flat]
        if wide:
            reasons.append(f"{', '.join(wide)} (95% interval spans >{WEAK_RATIO:g}x)")
        self.weak_ = [*self.at_bound_, *flat, *wide]
        if reasons:
            self.status_ = "not identifiable: " + "; ".join(reasons)
        else:
            self.status_ = "converged"
        if no_interval:
            self.status_ += f"; no intervals: {no_interval}"
        elif self.bootstrap_.get("note"):
            self.status_ += f"; {self.bootstrap_['note']}"

    # -- predict --------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "params_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit() first")

    def predict(self, P: Any, N: Any = None, *, output: str | None = None) -> np.ndarray:
        """Predicted L_ft ('ft') or L_f ('f', the default when the law has it) at (P, N)."""
        self._check_fitted()
        return self._predict_draws(np.array([[self.params_[n] for n in self.names]]), P, N, output)[0]

    def predict_interval(self, P: Any, N: Any = None, *, output: str | None = None, level: float = 0.95,
                         kind: str = "mean") -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval over the bootstrap resamples: of the mean curve (kind='mean'), or of
        where one new run's checkpoint falls (kind='new_run': the curve's draws plus the run scatter
        in noise_). NaN where the fit gave no intervals."""
        self._check_fitted()
        draws = self._predict_draws(self.boot_, P, N, output)
        if kind == "new_run":
            draws = self.new_run_draws(draws, output or self.outputs[-1])
        elif kind != "mean":
            raise ValueError(f"kind must be 'mean' or 'new_run'; got {kind!r}")
        return fitting.interval(draws, level)

    def new_run_draws(self, draws: np.ndarray, output: str) -> np.ndarray:
        """Mean-curve draws (b, n) turned into draws of a new run's value: each gets a t-distributed
        deviation with the residual scale and degrees of freedom of noise_ (fixed seed: reproducible)."""
        noise = getattr(self, "noise_", {}).get(output)
        if noise is None or not len(draws):
            return np.full_like(draws, np.nan)
        rng = np.random.default_rng([int(self.seed), 2401])
        dev = noise["sd"] * rng.standard_t(noise["dof"], size=draws.shape)
        with np.errstate(all="ignore"):
            return draws + dev if noise["space"] == "nats" else draws * np.exp(dev)

    def _predict_draws(self, params: np.ndarray, P: Any, N: Any, output: str | None) -> np.ndarray:
        output = output or self.outputs[-1]
        if output not in self.outputs:
            raise DataError(f"law '{self.name}' predicts {' and '.join(self.outputs)}; got output '{output}'")
        P = np.atleast_1d(np.asarray(P, dtype=float))
        N = np.atleast_1d(np.asarray(N if N is not None else np.nan, dtype=float))
        P, N = np.broadcast_arrays(P, N)
        return self._predict(self._columns_of(params), P, N, P)[output]

    def score(self, frame: pd.DataFrame) -> float:
        """R^2 of the main output on the rows this law would select from `frame`."""
        self._check_fitted()
        sel = select_rows(frame, law=self.name, columns=self._columns(), min_step=self.min_step_,
                          include_unfinished=self.include_unfinished)
        data = FitData.from_frame(sel.rows, self.target, self.ft_column)
        out = self.outputs[-1]
        pred = self._predict(self._columns_of(np.array([[self.params_[n] for n in self.names]])),
                             data.P, data.N, data.ft)
        return fitting.r2(self._obs(data, out), pred[out][0])


# Every law class by the name the CLI and laws.json use. It lives beside the contract, so a law can fit its
# dependencies by name while the law modules import this one (never the other way round).
LAWS: Registry[type[Law]] = Registry("law")
