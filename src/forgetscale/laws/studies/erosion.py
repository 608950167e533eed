"""Which data erodes what: refusals and multiple-choice answers at the same forgetting KL, across sweeps.

The paper found that instruction tuning erodes a chat model's safety while news erodes its reasoning. Two
sweeps of one design on different data (`forgetscale demo --study safety`) reach different KLs, so their
raw curves are not comparable; this study compares them at a matched KL:

1. Points. Per sweep (RUN_DIR), every evaluated checkpoint's forget_kl with its k-of-n refusals (safety suite)
   and its k-of-n agreements with the base's answers (choice suite, one protocol).
2. Curves. Per sweep and measure, the logistic curve in KL of the guardrail law (guardrails.fit_logistic:
   binomial maximum likelihood), read at the matched KL: the largest KL that every sweep reached, so no
   curve is read outside its own data.
3. Intervals. Bootstrap: a sweep's runs resampled whole, and each point's count redrawn binomially from its
   n (the prompts are a sample too); percentile 2.5-97.5. The difference between two sweeps uses
   independent draws of each. With fewer than MIN_RUNS runs a sweep gets no interval.

Torch-free: reads what `forgetscale eval` stored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forgetscale.laws.estimators.base import MIN_RUNS
from forgetscale.laws.studies.guardrails import fit_logistic, points, sigmoid

# measure -> (suite, metric, protocol): what is counted at each checkpoint
MEASURES = {"refusal": ("safety", "refusal_rate", "greedy"),
            "agreement": ("choice", "agreement_with_base", "loglik")}


def sweep_points(run_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Per measure, the evaluated checkpoints of one RUN_DIR: run_id, rank, step, forget_kl, k, n, rate, lo, hi."""
    from forgetscale.store import Store

    with Store(run_dir, create=False) as store:
        frame, summaries = store.frame(), store.eval_summaries()
    out = {}
    for name, (suite, metric, protocol) in MEASURES.items():
        rows = points(frame, summaries, suite=suite, metric=metric, protocol=protocol)
        out[name] = rows[["run_id", "rank", "step", "forget_kl", "k", "n", "rate", "lo", "hi"]].reset_index(drop=True)
    return out


def _draws(rows: pd.DataFrame, at: float, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """The curve's value at `at` under n_bootstrap resamples (runs whole, counts binomially); NaN where a
    refit has no finite curve."""
    runs = rows["run_id"].astype(str).to_numpy()
    ids, index = np.unique(runs, return_inverse=True)
    x, n = rows["forget_kl"].to_numpy(float), rows["n"].to_numpy(float)
    p = rows["k"].to_numpy(float) / np.maximum(n, 1)
    out = np.full(n_bootstrap, np.nan)
    for i in range(n_bootstrap):
        weights = np.bincount(rng.integers(0, ids.size, ids.size), minlength=ids.size)[index]
        k = rng.binomial(n.astype(int), p)
        a, b, status = fit_logistic(x, k, n, w=weights)
        if status == "converged":
            out[i] = float(sigmoid(a + b * at))
    return out


def at_matched_kl(sweeps: dict[str, dict[str, pd.DataFrame]], n_bootstrap: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """Each sweep's fitted refusal and agreement at the largest KL every sweep reached, with intervals, and
    the pairwise differences. `sweeps`: label -> sweep_points(run_dir)."""
    reached = [float(rows["forget_kl"].max()) for pts in sweeps.values() for rows in pts.values() if len(rows)]
    matched = min(reached) if reached else math.nan
    out: dict[str, Any] = {"kl": matched, "bootstrap": {"n": n_bootstrap, "seed": seed,
                           "scheme": "runs resampled whole; each point's count redrawn binomially"},
                           "measures": {}}
    rng = np.random.default_rng(seed)
    for measure in MEASURES:
        per: dict[str, Any] = {}
        draws: dict[str, np.ndarray] = {}
        for label, pts in sweeps.items():
            rows = pts[measure]
            entry: dict[str, Any] = {"points": len(rows), "runs": int(rows["run_id"].nunique()) if len(rows) else 0}
            if len(rows) < 3 or not math.isfinite(matched):
                entry["status"] = f"not fitted: too few points ({len(rows)}; needs >= 3)"
                per[label] = entry
                continue
            a, b, status = fit_logistic(rows["forget_kl"], rows["k"], rows["n"])
            if status != "converged":
                entry["status"] = f"not fitted: {status}"
                per[label] = entry
                continue
            entry.update(status="converged", params={"a": a, "b": b}, value=float(sigmoid(a + b * matched)),
                         ci=[math.nan, math.nan])
            if entry["runs"] >= MIN_RUNS and n_bootstrap:
                d = _draws(rows, matched, n_bootstrap, rng)
                good = d[np.isfinite(d)]
                if good.size >= 0.9 * n_bootstrap:
                    entry["ci"] = [float(np.percentile(good, 2.5)), float(np.percentile(good, 97.5))]
                    draws[label] = d
            else:
                entry["status"] += f"; no interval: too few runs ({entry['runs']}; needs >= {MIN_RUNS})"
            per[label] = entry
        labels = [k for k in per if "value" in per[k]]
        diffs = []
        for i, first in enumerate(labels):
            for second in labels[i + 1:]:
                diff = {"a": first, "b": second, "diff": per[first]["value"] - per[second]["value"],
                        "ci": [math.nan, math.nan]}
                if first in draws and second in draws:
                    d = draws[first] - draws[second]
                    d = d[np.isfinite(d)]
                    diff["ci"] = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
                diffs.append(diff)
        out["measures"][measure] = {"sweeps": per, "differences": diffs}
    return out


def verdict_lines(result: dict[str, Any]) -> list[str]:
    """The answer in words: per measure, which data leaves it lower at the matched KL, and whether the
    difference's interval excludes zero."""
    from forgetscale.formatting import pct

    what = {"refusal": "refuses", "agreement": "agrees with the base's multiple-choice answers"}
    lines = [f"at the same forgetting KL ({result['kl']:.3f} nats/token, the largest every sweep reached):"]
    for measure, block in result["measures"].items():
        for label, entry in block["sweeps"].items():
            if "value" in entry:
                lo, hi = entry["ci"]
                band = f" [{pct(lo, 0)}, {pct(hi, 0)}]" if math.isfinite(lo) else ""
                lines.append(f"  {label}: {what[measure]} {pct(entry['value'], 0)}{band}")
            else:
                lines.append(f"  {label} ({measure}): {entry['status']}")
        for d in block["differences"]:
            lo, hi = d["ci"]
            if not math.isfinite(lo):
                lines.append(f"  {measure}: {d['a']} - {d['b']} = {100 * d['diff']:+.0f} points (no interval)")
                continue
            lower = d["a"] if d["diff"] < 0 else d["b"]
            clear = hi < 0 or lo > 0
            lines.append(f"  {measure}: {d['a']} - {d['b']} = {100 * d['diff']:+.0f} points [{100 * lo:+.0f}, "
                         f"{100 * hi:+.0f}]: " + (f"{lower} erodes it more" if clear
                                                  else "no difference beyond noise"))
    return lines
