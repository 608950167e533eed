"""Which (rank, steps) to run: the options a fitted law offers for a fine-tuning goal and a forgetting
budget (`forgetscale plan`).

For each candidate P (ranks that were run, and powers of two around them: LoRA's P is exactly
proportional to its rank, so a new rank's P is known), the law's curves in N give:
- with an L_ft goal, the fewest steps that reach it, and what that run forgets;
- with a forgetting budget, the most steps the budget allows, and the L_ft reached there;
- with both, the options that meet both.
Compute per option is steps x tokens per step (LoRA's cost per step hardly depends on its rank); the
frontier is the set no other option beats on both compute and forgetting (with a budget alone: on
compute and L_ft). Every option carries the
new-run prediction interval (what a run you make lands in) and a note where it leaves the fitted range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from forgetscale.errors import ConfigError, DataError, UnknownNameError, did_you_mean
from forgetscale.laws.pipeline import forecast, lawfile, record

# form -> (law giving L_ft, law giving L_f), as `predict` names the forms
FORMS = {
    "power, separate": ("power_ft", "power_f"),
    "power, joint": ("power_joint", "power_joint"),
    "linear of power_ft": ("power_ft", "linear"),
    "multiplicative": ("mult_ft", "mult_f"),
}
MAX_GRID = 200_000  # whole steps searched per P (beyond: a geometric grid of this many)
Curve = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (P, N) -> loss


@dataclass(frozen=True)
class Goal:
    """What the user asks for: an L_ft to reach and/or a forgetting level not to exceed (nats, target units)."""

    ft: float | None = None
    forget: float | None = None

    def __post_init__(self) -> None:
        if self.ft is None and self.forget is None:
            raise ConfigError("give --ft-goal, --forget-budget or both")
        for key, v in (("--ft-goal", self.ft), ("--forget-budget", self.forget)):
            if v is not None and not (np.isfinite(v) and v > 0):
                raise ConfigError(f"{key} must be a finite number of nats > 0; got {v:g}")


def best_form(group: dict[str, Any]) -> str:
    """The form with the smallest held-out forgetting error relative to the KL rise (`fit`'s forecast
    table); the joint power law when the sweep had no held-out test."""
    usable = usable_forms(group)
    if not usable:
        raise DataError(f"no law with a (P, N) form was fitted for {group['label']}; see `forgetscale fit`")
    scores = {r["form"]: r["rise"] for r in (group.get("forecast_check") or {}).get("forms", [])
              if r["output"] == "f" and r["form"] in usable and r.get("rise") is not None and np.isfinite(r["rise"])}
    if scores:
        return min(scores, key=scores.get)
    return "power, joint" if "power, joint" in usable else usable[0]


def curves(group: dict[str, Any], form: str) -> tuple[Curve, Curve]:
    """Point predictions of L_ft and L_f at (P, N) for one form of a fitted group."""
    if form not in FORMS:
        raise UnknownNameError(did_you_mean("form", form, list(FORMS)))
    laws = lawfile.fitted_laws(group)
    ft_name, f_name = FORMS[form]
    missing = [n for n in (ft_name, f_name) if n not in laws]
    if missing:
        raise DataError(f"form '{form}' needs law '{missing[0]}', which was not fitted for {group['label']}")

    def ft(P: np.ndarray, N: np.ndarray) -> np.ndarray:
        return laws[ft_name].predict(P, N, output="ft")

    def f(P: np.ndarray, N: np.ndarray) -> np.ndarray:
        if f_name == "linear":
            return laws["linear"].predict(ft(P, N))
        return laws[f_name].predict(P, N, output="f")

    return ft, f


def candidate_params(group: dict[str, Any], ranks: Sequence[int] | None = None) -> list[tuple[int | None, float]]:
    """(rank, P) options: the ranks given, else the ranks run plus powers of two from 1 to 4x the largest.
    A method without ranks (full, top layers) offers the P values it was run with."""
    run_ranks: dict[str, float] = {}
    for d in group["laws"].values():
        run_ranks.update(d.get("ranks") or {})
    if not run_ranks:
        if ranks:
            raise ConfigError(f"{group['label']} has no adapter ranks; drop --ranks")
        ps = sorted({p for d in group["laws"].values() for p in (d.get("ranges") or {}).get("P", [])})
        return [(None, p) for p in ps]
    r = np.array([int(k) for k in run_ranks], float)
    p = np.array(list(run_ranks.values()), float)
    per_rank = float(r @ p / (r @ r))  # P = k * rank exactly for LoRA on fixed modules
    if ranks:
        bad = [x for x in ranks if x <= 0]
        if bad:
            raise ConfigError(f"--ranks must be > 0; got {bad[0]}")
        want = sorted(set(int(x) for x in ranks))
    else:
        top = int(r.max()) * 4
        want = sorted({int(x) for x in r} | {2**i for i in range(int(np.log2(top)) + 1)})
    return [(k, run_ranks.get(str(k), per_rank * k)) for k in want]


def _steps(lo: int, hi: int) -> np.ndarray:
    """Every whole step in [lo, hi] (a geometric grid when that is more than MAX_GRID steps)."""
    if hi - lo <= MAX_GRID:
        return np.arange(lo, hi + 1)
    return np.unique(np.round(np.geomspace(lo, hi, MAX_GRID)).astype(int))


def options(ft: Curve, f: Curve, params: list[tuple[int | None, float]], goal: Goal, *,
            min_step: int, max_steps: int) -> pd.DataFrame:
    """One row per candidate P: the steps the goal implies and the losses predicted there.

    `reaches` is False where no N <= max_steps reaches the L_ft goal (or, budget only, where even
    min_step forgets more than the budget)."""
    N = _steps(min_step, max_steps).astype(float)
    rows = []
    for rank, p in params:
        P = np.full(N.size, p)
        lft, lf = ft(P, N), f(P, N)
        if goal.ft is not None:
            ok = np.flatnonzero(lft <= goal.ft)
            i = int(ok[0]) if ok.size else None
        else:  # the most steps within the budget (forgetting grows with N)
            ok = np.flatnonzero(lf <= goal.forget)
            i = int(ok[-1]) if ok.size else None
        reaches = i is not None
        i = i if reaches else (N.size - 1 if goal.ft is not None else 0)
        within = goal.forget is None or bool(lf[i] <= goal.forget)
        rows.append({"rank": rank, "P": p, "N": int(N[i]), "ft": float(lft[i]), "f": float(lf[i]),
                     "reaches": reaches, "within_budget": within})
    out = pd.DataFrame(rows)
    out["feasible"] = out["reaches"] & out["within_budget"]
    out["frontier"] = _pareto(out, "f" if goal.ft is not None else "ft")
    return out


def _pareto(rows: pd.DataFrame, loss: str) -> np.ndarray:
    """Feasible options that no other feasible option beats on both steps and `loss` (forgetting for an
    L_ft goal, L_ft for a budget alone); ties kept."""
    keep = np.zeros(len(rows), bool)
    feas = rows[rows["feasible"]]
    for i, r in feas.iterrows():
        x = feas[loss]
        beaten = ((feas["N"] <= r["N"]) & (x <= r[loss]) & ((feas["N"] < r["N"]) | (x < r[loss]))).any()
        keep[rows.index.get_loc(i)] = not beaten
    return keep


def usable_forms(group: dict[str, Any]) -> list[str]:
    """The forms whose laws were fitted for this group."""
    laws = {n for n, d in group["laws"].items() if "params" in d}
    return [f for f, (a, b) in FORMS.items() if a in laws and b in laws]


def choose_form(group: dict[str, Any], target_steps: float,
                evidence: list[dict[str, Any]] | dict[str, Any] | None = None) -> record.Choice:
    """The form for a run of `target_steps` steps: the forecasting benchmark's rule (laws/pipeline/record.py)
    at this pilot's share of that run's compute, from the record of the group's data; without a stored
    record, the pilot's own held-out check."""
    evidence = record.load() if evidence is None else evidence
    pilot = record.pilot_steps(group)
    if not evidence:
        form = best_form(group)
        return record.Choice(form, pilot / target_steps, None, False, f"{form}: the smallest error on this pilot's "
                             "own held-out split (no forecasting-benchmark record is installed)")
    rec, note = record.for_data(evidence, group.get("key", {}).get("dataset", ""), group.get("models") or [])
    choice = record.select(rec, usable_forms(group), pilot, target_steps)
    return replace(choice, reason=f"{choice.reason} ({note})") if note else choice


def plan(group: dict[str, Any], goal: Goal, *, form: str | None = None, ranks: Sequence[int] | None = None,
         max_steps: int | None = None, level: float = 0.95,
         evidence: list[dict[str, Any]] | dict[str, Any] | None = None
         ) -> tuple[pd.DataFrame, record.Choice, list[str]]:
    """The options of a fitted group for `goal`: (table, the form used and why, warnings).

    Without `form`, the form is the benchmark rule's at the pilot's share of the longest option's
    compute (the riskiest forecast in the table; chosen once on a first pass, re-planned if it differs).
    Table columns: rank, P, N, ft and f (point predictions), their new-run intervals (ft_lo/ft_hi,
    f_lo/f_hi), reaches / within_budget / feasible / frontier, and `note` (outside the fitted range)."""
    fitted = [d for d in group["laws"].values() if "params" in d]
    if not fitted:
        raise DataError(f"no law with a (P, N) form was fitted for {group['label']}; see `forgetscale fit`")
    min_step = max(int(d["min_step"]) for d in fitted)
    n_hi = max(d["ranges"]["N"][1] for d in fitted)
    max_steps = int(max_steps or 4 * n_hi)
    if max_steps < min_step:
        raise ConfigError(f"--max-steps must be >= the laws' minimum step {min_step}; got {max_steps}")
    params = candidate_params(group, ranks)
    if form is not None:
        choice = record.Choice(form, float("nan"), None, True, f"{form}: chosen with --form")
    else:
        choice = choose_form(group, max_steps, evidence)  # a first pass: the longest run searched
    table = options(*curves(group, choice.form), params, goal, min_step=min_step, max_steps=max_steps)
    if form is None:
        rows = table[table["feasible"]] if table["feasible"].any() else table
        final = choose_form(group, float(rows["N"].max()), evidence)
        if final.form != choice.form:
            table = options(*curves(group, final.form), params, goal, min_step=min_step, max_steps=max_steps)
        choice = final
    form = choice.form
    pred = forecast.forecast(group, table["P"].to_numpy(float), table["N"].to_numpy(float), level)
    ft_law, f_law = FORMS[form]
    for out, law, col in (("ft", ft_law, "ft"), ("f", f_law, "f")):
        sub = pred[(pred["law"] == law) & (pred["output"] == out)]
        table[f"{col}_lo"] = sub["pi_lo"].to_numpy()
        table[f"{col}_hi"] = sub["pi_hi"].to_numpy()
    p_lo = min(d["ranges"]["P"][0] for d in fitted)
    p_hi = max(d["ranges"]["P"][1] for d in fitted)
    table["note"] = [
        ", ".join(x for x, out in (("P outside fitted", not p_lo <= p <= p_hi), ("N beyond fitted", n > n_hi)) if out)
        for p, n in zip(table["P"], table["N"], strict=True)
    ]
    warnings = []
    if not table["feasible"].any():
        warnings.append("no option meets the goal within --max-steps "
                        f"{max_steps}: loosen the goal or raise --max-steps")
    if (table["note"] != "").any():
        warnings.append(f"options outside the fitted range (P {p_lo:,.0f}-{p_hi:,.0f}, N <= {n_hi:g}) are "
                        "extrapolations: their intervals cover the law's uncertainty, not a change of form")
    return table, choice, warnings
