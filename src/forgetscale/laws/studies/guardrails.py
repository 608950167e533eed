"""Guardrails lost: how a chat model's refusal rate falls as it forgets (`forgetscale fit`, laws.json "guardrails").

The paper's safety finding is that fine-tuning erodes refusals. This study turns the safety suite's stored
summaries (refusal k of n per evaluated checkpoint, `forgetscale eval`) into a law per group (dataset, method
with its settings, mitigation), the same groups as the forgetting laws:

    refusal = 1 / (1 + exp(-(a + b * x)))       x = forget_kl (KL to the base on general text) or ft_loss (L_ft)

1. Rows. One per evaluated (run, step): x from the checkpoint row, k of n refusals from the safety summary
   (metric refusal_rate, protocol greedy), with its Wilson interval. A run's step 0 that was not evaluated
   on its own but whose forgetting KL is 0 (it is the base model: a measured trainer output, a LoRA sweep
   evaluated at 'last') takes the base model's refusals. Finished runs only (include_unfinished as in fit);
   steps up to max_step.
2. Fit. Binomial maximum likelihood (Newton's method on the log-likelihood), so a point measured on 50
   prompts weighs as 50 Bernoulli trials; x is standardized inside the solver, a and b are on x's scale.
3. Which x. Both are fitted; the one with the lower held-out log loss (binomial negative log-likelihood per
   prompt) is chosen. The held-out split is the forgetting laws' (fit on P < P_max and the earlier steps,
   test on P = P_max's later steps; >= 3 distinct P and >= 4 distinct steps). Without it the choice falls
   back to the in-sample log loss (both forms have two constants), and the status says so.
4. Intervals. Whole runs resampled (percentile 2.5-97.5 of the refits), as for the other laws: fewer than
   3 runs (or 10 distinct resamples) give no interval ("no intervals: too few runs ..."). Fewer than 3
   points give no fit at all ("not fitted: too few points ..."): two points fix a and b exactly.

Torch-free: numpy and pandas only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from forgetscale.evals.stats import wilson
from forgetscale.formatting import ci_suffix, num, pct
from forgetscale.laws.estimators.base import MAX_FAILED, MIN_DISTINCT, MIN_RUNS
from forgetscale.laws.estimators.select import group_label, groups, size_step_split

SUITE, METRIC, PROTOCOL = "safety", "refusal_rate", "greedy"
CANDIDATES = {"forget_kl": "KL", "ft_loss": "L_ft"}  # x column -> short name
MIN_POINTS = 3  # a two-constant curve through fewer points is exact: nothing is tested
SEPARATED = 30.0  # |slope| per standard deviation of x beyond this: the rates jump from 0 to 1, no finite fit
FORM = "refusal = 1 / (1 + exp(-(a + b * x)))"
CHOICE_RULE = ("x with the lower held-out log loss (fit on P < P_max and earlier steps, test on P_max's later "
               "steps); without that split, the lower in-sample log loss")


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    """The logistic function, stable for large |z|."""
    z = np.asarray(z, dtype=float)
    return np.exp(-np.logaddexp(0.0, -z))


def log_loss(a: float, b: float, x: np.ndarray, k: np.ndarray, n: np.ndarray) -> float:
    """Binomial negative log-likelihood per trial (nats): the score that picks x."""
    eta = a + b * np.asarray(x, float)
    nll = k * np.logaddexp(0.0, -eta) + (n - k) * np.logaddexp(0.0, eta)
    return float(nll.sum() / n.sum()) if n.sum() else math.nan


def fit_logistic(x: np.ndarray, k: np.ndarray, n: np.ndarray, w: np.ndarray | None = None,
                 max_iter: int = 100) -> tuple[float, float, str]:
    """(a, b, status) maximizing the binomial likelihood of k of n at x (w: bootstrap weights per row).

    status is 'converged', or why there is no finite fit (x constant; the rates separate perfectly)."""
    x, k, n = (np.asarray(v, float) for v in (x, k, n))
    w = np.ones_like(x) if w is None else np.asarray(w, float)
    keep = (w > 0) & (n > 0)
    x, k, n, w = x[keep], k[keep], n[keep], w[keep]
    centre, scale = (float(np.average(x, weights=w * n)), float(np.sqrt(np.cov(x, aweights=w * n, ddof=0)))) \
        if x.size else (0.0, 0.0)
    if x.size < 2 or not scale > 0:
        return math.nan, math.nan, "x is the same at every point"
    if not np.any(w * k) or not np.any(w * (n - k)):
        which = "0%" if not np.any(w * k) else "100%"
        return math.nan, math.nan, f"the refusal rate is {which} at every point (no curve to fit)"
    z = (x - centre) / scale
    design = np.column_stack([np.ones_like(z), z])
    p0 = float(np.clip(np.sum(w * k) / np.sum(w * n), 1e-6, 1 - 1e-6))
    theta = np.array([math.log(p0 / (1 - p0)), 0.0])

    def loglik(t: np.ndarray) -> float:
        eta = design @ t
        return float(-np.sum(w * (k * np.logaddexp(0.0, -eta) + (n - k) * np.logaddexp(0.0, eta))))

    current = loglik(theta)
    status = "stopped at the iteration limit"
    for _ in range(max_iter):
        p = sigmoid(design @ theta)
        grad = design.T @ (w * (k - n * p))
        hess = design.T @ (design * (w * n * p * (1 - p))[:, None]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8:  # step halving: the log-likelihood never falls
            trial = theta + t * step
            value = loglik(trial)
            if value >= current - 1e-12:
                break
            t /= 2
        theta, gain, current = trial, value - current, value
        if abs(theta[1]) > SEPARATED:
            return math.nan, math.nan, "the refusal rates separate perfectly in x (no finite slope)"
        if np.max(np.abs(t * step)) < 1e-10 or abs(gain) < 1e-13:
            status = "converged"
            break
    a = float(theta[0] - theta[1] * centre / scale)
    b = float(theta[1] / scale)
    return a, b, status


def points(frame: pd.DataFrame, summaries: list[dict[str, Any]], *, include_unfinished: bool = False,
           max_step: int | None = None, suite: str = SUITE, metric: str = METRIC,
           protocol: str = PROTOCOL) -> pd.DataFrame:
    """The checkpoint rows that have a refusal rate (or another k-of-n summary: suite, metric, protocol):
    frame columns plus k, n, rate, lo, hi, model_key."""
    rates = {s["model_key"]: s for s in summaries
             if s.get("suite", suite) == suite and s["metric"] == metric and s["protocol"] == protocol and s["n"]}
    if frame.empty or not rates:
        return frame.iloc[0:0].assign(k=[], n=[], rate=[], lo=[], hi=[], model_key=[])
    rows = frame
    if not include_unfinished and "status" in rows.columns:
        rows = rows[rows["status"] == "finished"]
    if max_step is not None:
        rows = rows[rows["step"] <= max_step]
    keys = []
    for run_id, step, kl in zip(rows["run_id"], rows["step"], rows["forget_kl"], strict=True):
        key = f"{run_id}@{int(step)}"
        if key not in rates and int(step) == 0 and kl == 0 and "base" in rates:
            key = "base"  # the run's step 0 is the base model itself
        keys.append(key if key in rates else None)
    rows = rows.assign(model_key=keys)
    rows = rows[rows["model_key"].notna()].copy()
    rows["k"] = [int(rates[m]["k"]) for m in rows["model_key"]]
    rows["n"] = [int(rates[m]["n"]) for m in rows["model_key"]]
    rows["rate"] = rows["k"] / rows["n"]
    bounds = [wilson(k, n) for k, n in zip(rows["k"], rows["n"], strict=True)]
    rows["lo"], rows["hi"] = [b[0] for b in bounds], [b[1] for b in bounds]
    return rows


def _size(rows: pd.DataFrame) -> np.ndarray:
    """P as the forgetting laws read it: trainable parameters, else the rank."""
    p = pd.to_numeric(rows.get("trainable_params"), errors="coerce") if "trainable_params" in rows else None
    if p is None or p.isna().any():
        p = pd.to_numeric(rows["rank"], errors="coerce").fillna(0)
    return p.to_numpy(float)


def fit_candidate(rows: pd.DataFrame, x_col: str, train: np.ndarray, test: np.ndarray, n_bootstrap: int,
                  seed: int) -> dict[str, Any]:
    """One x: the fit on every row, its held-out score, and intervals from runs resampled."""
    x, k, n = (rows[c].to_numpy(float) for c in (x_col, "k", "n"))
    ok = np.isfinite(x)
    out: dict[str, Any] = {"x": x_col, "rows": int(ok.sum())}
    if ok.sum() < MIN_POINTS:
        out["status"] = f"not fitted: too few points ({int(ok.sum())} with {x_col}; needs >= {MIN_POINTS})"
        return out
    a, b, status = fit_logistic(x[ok], k[ok], n[ok])
    if status != "converged":
        out["status"] = f"not fitted: {status}"
        return out
    out.update(params={"a": a, "b": b}, log_loss=log_loss(a, b, x[ok], k[ok], n[ok]))
    # held-out: refit on the training rows, score the test rows
    out["heldout"] = None
    if train.any() and test.any() and ok[train].sum() >= MIN_POINTS and ok[test].any():
        ta, tb, tstatus = fit_logistic(x[train & ok], k[train & ok], n[train & ok])
        te = test & ok
        if tstatus == "converged":
            pred = sigmoid(ta + tb * x[te])
            out["heldout"] = {"params": {"a": ta, "b": tb}, "log_loss": log_loss(ta, tb, x[te], k[te], n[te]),
                              "mae": float(np.mean(np.abs(k[te] / n[te] - pred))), "rows": int(te.sum())}
        else:
            out["heldout"] = {"status": f"held-out fit failed: {tstatus}"}
    # intervals: whole runs resampled
    runs = rows["run_id"].astype(str).to_numpy()
    ids, index = np.unique(runs[ok], return_inverse=True)
    boot = {"n": int(n_bootstrap), "seed": int(seed), "scheme": "whole runs resampled", "runs": int(ids.size)}
    out["ci"] = {"a": [math.nan, math.nan], "b": [math.nan, math.nan]}
    out["draws"] = []
    no_interval = None
    if n_bootstrap and ids.size < MIN_RUNS:
        no_interval = f"too few runs ({ids.size}; intervals need >= {MIN_RUNS})"
    elif n_bootstrap:
        rng = np.random.default_rng(seed)
        counts = np.stack([np.bincount(rng.integers(0, ids.size, ids.size), minlength=ids.size)
                           for _ in range(int(n_bootstrap))])
        distinct = int(np.unique(counts, axis=0).shape[0])
        boot["distinct"] = distinct
        if distinct < MIN_DISTINCT:
            no_interval = f"too few distinct resamples ({distinct}; intervals need >= {MIN_DISTINCT}): add runs"
        else:
            draws = np.array([fit_logistic(x[ok], k[ok], n[ok], w=c[index])[:2] for c in counts])
            failed = ~np.all(np.isfinite(draws), axis=1)
            boot["failed"] = int(failed.sum())
            if failed.sum() > MAX_FAILED * len(draws):
                no_interval = f"{int(failed.sum())} of {len(draws)} bootstrap refits had no finite fit"
            else:
                good = draws[~failed]
                out["draws"] = good.tolist()
                out["ci"] = {name: [float(np.percentile(good[:, i], 2.5)), float(np.percentile(good[:, i], 97.5))]
                             for i, name in enumerate(("a", "b"))}
    out["bootstrap"] = boot
    out["status"] = "converged" + (f"; no intervals: {no_interval}" if no_interval else "")
    return out


def fit_group(rows: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Both candidates on one group's rows, and which x the held-out (else in-sample) log loss picks."""
    rows = rows.sort_values(["run_id", "step"]).reset_index(drop=True)
    train, test, split = size_step_split(_size(rows), rows["step"].to_numpy(float), "evaluated steps")
    out: dict[str, Any] = {
        "n_points": len(rows), "n_runs": int(rows["run_id"].nunique()), "heldout_split": split,
        "rows": [{"run_id": r.run_id, "step": int(r.step), "rank": None if pd.isna(r.rank) else int(r.rank),
                  "forget_kl": r.forget_kl, "ft_loss": r.ft_loss, "k": int(r.k), "n": int(r.n), "rate": r.rate,
                  "lo": r.lo, "hi": r.hi, "model_key": r.model_key} for r in rows.itertuples()],
        "candidates": {c: fit_candidate(rows, c, train, test, n_bootstrap, seed) for c in CANDIDATES},
    }
    if len(rows) < MIN_POINTS:
        out.update(x=None, chosen_by=None,
                   status=f"not fitted: too few points ({len(rows)} evaluated checkpoints; needs >= {MIN_POINTS})")
        return out
    fitted = {c: d for c, d in out["candidates"].items() if "params" in d}
    if not fitted:
        out.update(x=None, chosen_by=None, status=next(iter(out["candidates"].values()))["status"])
        return out
    scored = {c: d["heldout"]["log_loss"] for c, d in fitted.items()
              if (d.get("heldout") or {}).get("log_loss") is not None}
    if len(scored) == len(fitted):
        x = min(scored, key=lambda c: (scored[c], list(CANDIDATES).index(c)))
        chosen_by = "held-out log loss"
    else:
        x = min(fitted, key=lambda c: (fitted[c]["log_loss"], list(CANDIDATES).index(c)))
        chosen_by = f"in-sample log loss ({split})" if not train.any() else "in-sample log loss (a held-out fit failed)"
    out.update(x=x, chosen_by=chosen_by, status=fitted[x]["status"])
    return out


def fingerprint(summaries: list[dict[str, Any]]) -> str:
    """A hash of the stored refusal counts, so the report can tell laws.json was fitted before a later eval."""
    import hashlib

    counts = sorted((s["model_key"], int(s["k"]), int(s["n"])) for s in summaries
                    if s["metric"] == METRIC and s["protocol"] == PROTOCOL and s["n"])
    return hashlib.sha256(repr(counts).encode()).hexdigest()[:16]


def compare(frame: pd.DataFrame, summaries: list[dict[str, Any]], options: Any = None) -> dict[str, Any] | None:
    """The laws.json 'guardrails' block, or None when no checkpoint has a stored refusal rate."""
    n_bootstrap = int(getattr(options, "n_bootstrap", 1000))
    seed = int(getattr(options, "seed", 0))
    rows = points(frame, summaries, include_unfinished=bool(getattr(options, "include_unfinished", False)),
                  max_step=getattr(options, "max_step", None))
    if rows.empty:
        return None
    base = next((s for s in summaries if s["model_key"] == "base" and s["metric"] == METRIC
                 and s["protocol"] == PROTOCOL), None)
    out: dict[str, Any] = {"suite": SUITE, "metric": METRIC, "protocol": PROTOCOL, "form": FORM,
                           "choice_rule": CHOICE_RULE, "summaries_fingerprint": fingerprint(summaries), "groups": []}
    if base is not None:
        out["base"] = {k: base[k] for k in ("k", "n", "value", "lo", "hi")}
    for key, sub in groups(rows):
        out["groups"].append({**key, "label": group_label(key), **fit_group(sub, n_bootstrap, seed)})
    return out


def add_to_doc(doc: dict[str, Any], run_dir: Any, options: Any) -> None:
    """Put the refusal law into a laws.json document (key 'guardrails') when the store has safety summaries."""
    from forgetscale.store import Store

    with Store(run_dir, create=False) as store:
        summaries = store.eval_summaries(SUITE)
        frame = store.frame() if summaries else None
    if summaries:
        block = compare(frame, summaries, options)
        if block is not None:
            doc["guardrails"] = block


def predict(candidate: dict[str, Any], x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rate, lo, hi) of a fitted candidate at x; the band is the bootstrap draws' 2.5-97.5 percentiles
    (NaN without intervals)."""
    x = np.asarray(x, float)
    p = candidate["params"]
    rate = sigmoid(p["a"] + p["b"] * x)
    draws = np.asarray(candidate.get("draws") or [], float).reshape(-1, 2)
    if not len(draws):
        return rate, np.full_like(rate, np.nan), np.full_like(rate, np.nan)
    curves = sigmoid(draws[:, :1] + draws[:, 1:] * x[None, :])
    return rate, np.percentile(curves, 2.5, axis=0), np.percentile(curves, 97.5, axis=0)


def table_rows(block: dict[str, Any]) -> list[list[str]]:
    """One row per group and candidate x: a, b with intervals, log losses, chosen mark, status (fit, report)."""
    out = []
    for g in block["groups"]:
        for x, c in g["candidates"].items():
            if "params" not in c:
                out.append([g["label"], CANDIDATES[x], "", "", "", "", "", "", c["status"]])
                continue
            ho = c.get("heldout") or {}
            out.append([g["label"], CANDIDATES[x] + (" (chosen)" if g.get("x") == x else ""),
                        num(c["params"]["a"]) + ci_suffix(*c["ci"]["a"]),
                        num(c["params"]["b"]) + ci_suffix(*c["ci"]["b"]),
                        num(c["log_loss"]), num(ho.get("log_loss")), pct(ho.get("mae"), 1),
                        f"{g['n_points']} / {g['n_runs']}", c["status"]])
    return out


TABLE_HEADER = ["group", "x", "a [95%]", "b [95%]", "log loss", "held-out log loss", "held-out |error|",
                "points / runs", "status"]


def summary_lines(block: dict[str, Any]) -> list[str]:
    """One sentence per group: which x, why, and the fitted refusal at the base and at the largest x seen."""
    out = []
    for g in block["groups"]:
        if g.get("x") is None:
            out.append(f"{g['label']}: {g['status']}")
            continue
        c = g["candidates"][g["x"]]
        xs = [r[g["x"]] for r in g["rows"] if r[g["x"]] is not None and math.isfinite(r[g["x"]])]
        lo, hi = min(xs), max(xs)
        rate = sigmoid(c["params"]["a"] + c["params"]["b"] * np.array([lo, hi]))
        out.append(f"{g['label']}: refusal against {CANDIDATES[g['x']]} (chosen by {g['chosen_by']}); fitted "
                   f"{pct(rate[0], 0)} at {CANDIDATES[g['x']]} = {num(lo, 3)}, {pct(rate[1], 0)} at {num(hi, 3)}; "
                   f"{g['heldout_split']}")
    return out
