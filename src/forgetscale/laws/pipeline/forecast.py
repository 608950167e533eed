"""Forecasts from fitted laws: L_ft and L_f at new (P, N) with two intervals (`forgetscale predict`).

The mean-curve interval is the percentile interval of the prediction over the stored bootstrap draws,
so it carries the uncertainty of every constant together (including their correlations). The
new-run (prediction) interval adds the scatter of one run around the curve (Law.noise_): a run you
make next lands inside it, not inside the mean-curve interval. A forecast outside the P and N the fit
saw is an extrapolation: it is still printed, with a warning, because forecasting the expensive run is
the point, but neither interval covers a change of form.

`heldout_check` scores every form on the same held-out rows (the largest P's later steps, fitted on
the rest) in nats and relative to how far the runs moved from their base, beside a naive baseline.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from forgetscale.errors import DataError, UnknownNameError, did_you_mean
from forgetscale.laws.estimators import fitting, forms
from forgetscale.laws.estimators.base import Law, heldout_errors
from forgetscale.laws.estimators.select import base_column, with_base
from forgetscale.laws.pipeline import lawfile

# (form as printed, law, output); "linear of power_ft" is Eq. 4 applied to Eq. 5 (the paper's third column)
FORECASTS = (
    ("power, separate", "power_ft", "ft"),
    ("power, separate", "power_f", "f"),
    ("power, joint", "power_joint", "ft"),
    ("power, joint", "power_joint", "f"),
    ("linear of power_ft", "linear", "f"),
    ("multiplicative", "mult_ft", "ft"),
    ("multiplicative", "mult_f", "f"),
)


def choose_group(doc: dict[str, Any], dataset: str | None = None, method: str | None = None,
                 mitigation: str | None = None) -> dict[str, Any]:
    """The one group matching the filters; a sweep with one group (or one group with fitted laws) needs none.

    `method` matches a method name ('lora') or a group label ('lora[attn]'); where both LoRA on every
    linear module ('lora') and another LoRA group exist, 'lora' means the group labelled 'lora'.
    """
    def method_label(g: dict[str, Any]) -> str:
        return g["key"].get("variant", g["key"]["method"])

    want = {"dataset": dataset, "mitigation": mitigation}
    hits = [g for g in doc["groups"] if all(v is None or g["key"].get(k) == v for k, v in want.items())]
    if method is not None:
        exact = [g for g in hits if method_label(g) == method]
        hits = exact or [g for g in hits if g["key"]["method"] == method]
    if len(hits) > 1:  # groups where no law could be fitted (a method with one run) cannot forecast
        fitted = [g for g in hits if any("params" in d for d in g["laws"].values())]
        hits = fitted if len(fitted) == 1 else hits
    if len(hits) == 1:
        return hits[0]
    labels = [g["label"] for g in doc["groups"]]
    if not hits:
        known = {"dataset": {g["key"]["dataset"] for g in doc["groups"]},
                 "method": {method_label(g) for g in doc["groups"]} | {g["key"]["method"] for g in doc["groups"]},
                 "mitigation": {g["key"].get("mitigation") for g in doc["groups"]}}
        given = {"dataset": dataset, "method": method, "mitigation": mitigation}
        key = next((k for k, v in given.items() if v is not None and v not in known[k]), "dataset")
        raise UnknownNameError(did_you_mean(key, str(given[key]), sorted(str(x) for x in known[key])))
    raise DataError(f"laws.json holds {len(hits)} groups ({'; '.join(labels)}); choose one with --dataset/--method")


def params_for_rank(group: dict[str, Any], rank: int) -> float:
    """P of a rank as stored for this group's method (exact trainable-parameter count)."""
    ranks: dict[str, float] = {}
    for d in group["laws"].values():
        ranks.update(d.get("ranks") or {})
    if str(int(rank)) not in ranks:
        known = ", ".join(sorted(ranks, key=int)) or "none"
        raise DataError(f"rank {rank} was not run for {group['label']}, so its P is unknown (ranks run: {known}); "
                        "pass --params P instead")
    return float(ranks[str(int(rank))])


def _draws(laws: dict[str, Law], name: str, output: str, P: np.ndarray,
           N: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point prediction (n,), mean-curve draws (b, n) and new-run draws (b, n) of one forecast row."""
    law = laws[name]
    empty = np.empty((0, P.size))
    if name == "linear":  # Eq. 4 of Eq. 5, resample by resample
        ft_law = laws["power_ft"]
        lin = np.array([[law.params_[k] for k in law.names]])
        ft_point = ft_law.predict(P, N, output="ft")
        point = law._predict_draws(lin, ft_point, None, "f")[0]
        n = min(len(ft_law.boot_), len(law.boot_))
        if not n:
            return point, empty, empty
        ft_draws = ft_law._predict_draws(ft_law.boot_[:n], P, N, "ft")
        c, s = law.boot_[:n, :1], law.boot_[:n, 1:2]
        ft_new = ft_law.new_run_draws(ft_draws, "ft")  # a new run's own L_ft, then its own scatter about Eq. 4
        return point, -c * ft_draws + s, law.new_run_draws(-c * ft_new + s, "f")
    point = law.predict(P, N, output=output)
    if not len(law.boot_):
        return point, empty, empty
    draws = law._predict_draws(law.boot_, P, N, output)
    return point, draws, law.new_run_draws(draws, output)


def forecast(group: dict[str, Any], P: Any, N: Any, level: float = 0.95) -> pd.DataFrame:
    """One row per (form, output, P, N): prediction, mean-curve interval (lo, hi) and new-run
    prediction interval (pi_lo, pi_hi); NaN intervals where the fit gave none."""
    laws = lawfile.fitted_laws(group)
    P, N = np.broadcast_arrays(np.atleast_1d(np.asarray(P, float)), np.atleast_1d(np.asarray(N, float)))
    rows = []
    nan = (np.full(P.size, np.nan),) * 2
    for form, name, output in FORECASTS:
        if name not in laws or (name == "linear" and "power_ft" not in laws):
            continue
        point, draws, new = _draws(laws, name, output, P, N)
        lo, hi = fitting.interval(draws, level) if len(draws) else nan
        pi_lo, pi_hi = fitting.interval(new, level) if len(new) else nan
        status = laws[name].status_ if name != "linear" else "; ".join(
            dict.fromkeys([laws["power_ft"].status_, laws[name].status_]))
        for i in range(P.size):
            rows.append({"form": form, "law": name, "output": output, "P": P[i], "N": N[i], "value": point[i],
                         "lo": lo[i], "hi": hi[i], "pi_lo": pi_lo[i], "pi_hi": pi_hi[i], "status": status})
    if not rows:
        raise DataError(f"no law with a P, N form was fitted for {group['label']}; see `forgetscale fit` output")
    return pd.DataFrame(rows)


def heldout_check(fitted: dict[str, Law]) -> dict[str, Any] | None:
    """Every form's forecast of the held-out rows from the fit on the others, on one scale.

    Rows: each (P, N) law and output; Eq. 4 twice, once given the held-out rows' measured L_ft (not a
    forecast: it needs the run to have been made) and once of Eq. 5's forecast L_ft (a true forecast);
    and a baseline that reuses the nearest fitted checkpoint (largest fitted P, latest fitted step),
    which any law should beat. None when the sweep is too small for a held-out test."""
    ref = next((law for law in fitted.values() if law.heldout_test_ is not None), None)
    if ref is None:
        return None
    rows: list[dict[str, Any]] = []
    for form, name, output in FORECASTS:
        law = fitted.get(name)
        if law is None or law.heldout_params_ is None:
            continue
        if name == "linear":
            rows.append({"form": "Eq. 4 given measured L_ft", "law": name, "output": "f", "given_ft": True,
                         **law.heldout_errors_["f"]})
            ft_law = fitted.get("power_ft")
            if ft_law is None or ft_law.heldout_params_ is None:
                continue
            te = law.heldout_test_
            ft_pred = forms.power_ft(te.P, te.N, ft_law.heldout_params_)
            pred = forms.linear(ft_pred, law.heldout_params_)
            rows.append({"form": form, "law": name, "output": "f", "given_ft": False,
                         **heldout_errors(te, "f", pred)})
            continue
        rows.append({"form": form, "law": name, "output": output, "given_ft": False, **law.heldout_errors_[output]})
    split = ref.heldout_split_
    for output in ("ft", "f"):
        law = next((x for x in fitted.values() if output in x.reads and x.heldout_test_ is not None), None)
        if law is None:
            continue
        sel = law.selection_.rows
        col = law.ft_column if output == "ft" else law.target
        train = sel[(sel["trainable_params"] < split["p_max"]) & (sel["step"] <= split["n_cut"])]
        nearest = train.sort_values(["trainable_params", "step"]).iloc[-1]
        te = law.heldout_test_
        pred = np.full(te.n, float(nearest[col]))
        rows.append({"form": "baseline: nearest fitted checkpoint", "law": "", "output": output, "given_ft": False,
                     **heldout_errors(te, output, pred)})
    return {"description": split["description"], "forms": rows}


def against(group: dict[str, Any], rows: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Score forecasts against runs measured later (a target run made after the pilot sweep was fitted).

    `rows` are Store.frame() rows of the measured runs, step 0 included (it gives each run's base, so
    errors can be stated relative to the run's own KL rise / L_ft drop). One row per (form, output,
    run, step >= the laws' minimum step): forecast, measured, error in nats, error as a share of the
    measured change, and whether the new-run interval covered the measured value."""
    laws = lawfile.fitted_laws(group)
    if not laws:
        raise DataError(f"no law was fitted for {group['label']}")
    any_law = next(iter(laws.values()))
    cols = {"ft": any_law.ft_column, "f": any_law.target}
    missing = [c for c in ("run_id", "step", "trainable_params", *cols.values()) if c not in rows.columns]
    if missing:
        raise DataError(f"the measured runs have no '{missing[0]}' column")
    min_step = max(int(law.min_step_) for law in laws.values())
    rows = with_base(rows, tuple(cols.values()))  # each run's step-0 value beside every row (NaN if none)
    test = rows[rows["step"] >= min_step].sort_values(["run_id", "step"])
    if test.empty:
        raise DataError(f"the measured runs have no checkpoint at step >= {min_step} (the laws' minimum step)")
    table = forecast(group, test["trainable_params"].to_numpy(float), test["step"].to_numpy(float), level)
    out = []
    for (form, law, output), sub in table.groupby(["form", "law", "output"], sort=False):
        measured = test[cols[output]].to_numpy(float)
        start = test[base_column(cols[output])].to_numpy(float)
        for i, r in enumerate(sub.itertuples(index=False)):
            change = abs(measured[i] - start[i])
            err = r.value - measured[i]
            out.append({"form": form, "law": law, "output": output, "run_id": test["run_id"].iloc[i],
                        "P": r.P, "N": r.N, "forecast": r.value, "measured": measured[i], "error": err,
                        "share_of_change": err / change if change > 0 else np.nan,
                        "pi_lo": r.pi_lo, "pi_hi": r.pi_hi,
                        "covered": (bool(r.pi_lo <= measured[i] <= r.pi_hi)
                                    if np.isfinite(r.pi_lo) and np.isfinite(r.pi_hi) else None)})
    return pd.DataFrame(out)


def outside_range(group: dict[str, Any], P: Any, N: Any) -> list[str]:
    """Warnings for (P, N) outside what the fits saw, or below the minimum step."""
    ranges = [d["ranges"] for d in group["laws"].values() if "ranges" in d]
    steps = [d["min_step"] for d in group["laws"].values() if "min_step" in d]
    if not ranges:
        return []
    p_lo, p_hi = min(r["P"][0] for r in ranges), max(r["P"][1] for r in ranges)
    n_lo, n_hi = min(r["N"][0] for r in ranges), max(r["N"][1] for r in ranges)
    out = []
    for p, n in zip(*np.broadcast_arrays(np.atleast_1d(P), np.atleast_1d(N)), strict=True):
        if not p_lo <= p <= p_hi:
            out.append(f"P={p:.4g} is outside the fitted P range [{p_lo:.4g}, {p_hi:.4g}]: an extrapolation")
        if n < min(steps):
            out.append(f"N={n:g} is below the minimum step {min(steps)}: the laws do not hold there")
        elif not n_lo <= n <= n_hi:
            out.append(f"N={n:g} is outside the fitted step range [{n_lo:g}, {n_hi:g}]: an extrapolation")
    return list(dict.fromkeys(out))
