"""Forecasts from fitted laws: L_ft and L_f at new (P, N) with bootstrap intervals (`forgetscale predict`).

Each interval is the percentile interval of the prediction over the stored bootstrap draws, so it
carries the uncertainty of every constant together (including their correlations), not a
propagation of the per-constant intervals. A forecast outside the P and N the fit saw is an
extrapolation: it is still printed, with a warning, because forecasting the expensive run is the
point, but its interval only covers parameter uncertainty, not a change of form.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from forgetscale.errors import DataError, UnknownNameError, did_you_mean
from forgetscale.laws.estimators import fitting
from forgetscale.laws.estimators.base import Law
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


def _draws(laws: dict[str, Law], name: str, output: str, P: np.ndarray, N: np.ndarray,
           heldout: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Point prediction (n,) and bootstrap draws (b, n) of one forecast row."""
    law = laws[name]
    if name == "linear":  # Eq. 4 of Eq. 5, resample by resample
        ft_law = laws["power_ft"]
        lin = np.array([[law.params_[k] for k in law.names]])
        ft_point = ft_law.predict(P, N, output="ft")
        point = law._predict_draws(lin, ft_point, None, "f")[0]
        ft_draws = ft_law._predict_draws(ft_law.boot_, P, N, "ft") if len(ft_law.boot_) else np.empty((0, P.size))
        draws = -law.boot_[:, :1] * ft_draws + law.boot_[:, 1:2] if len(law.boot_) else ft_draws
        return point, draws
    point = law.predict(P, N, output=output)
    draws = law._predict_draws(law.boot_, P, N, output) if len(law.boot_) else np.empty((0, P.size))
    return point, draws


def forecast(group: dict[str, Any], P: Any, N: Any, level: float = 0.95) -> pd.DataFrame:
    """One row per (form, output, P, N): prediction and its bootstrap interval."""
    laws = lawfile.fitted_laws(group)
    P, N = np.broadcast_arrays(np.atleast_1d(np.asarray(P, float)), np.atleast_1d(np.asarray(N, float)))
    rows = []
    for form, name, output in FORECASTS:
        if name not in laws or (name == "linear" and "power_ft" not in laws):
            continue
        point, draws = _draws(laws, name, output, P, N)
        lo, hi = fitting.interval(draws, level) if len(draws) else (np.full(P.size, np.nan),) * 2
        for i in range(P.size):
            rows.append({"form": form, "law": name, "output": output, "P": P[i], "N": N[i], "value": point[i],
                         "lo": lo[i], "hi": hi[i], "status": laws[name].status_})
    if not rows:
        raise DataError(f"no law with a P, N form was fitted for {group['label']}; see `forgetscale fit` output")
    return pd.DataFrame(rows)


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
