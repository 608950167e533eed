"""Does a mitigation move the forgetting trade-off line, or only slide a run along it? (`forgetscale fit`)

Per cell (fine-tuning dataset, method group, rank) holding the control arm ('none') and other arms:

1. Trajectories. A trained run's is its checkpoints in step order from step 0. A derived arm's (scale,
   intruders) is its curve at the last step in the order of its grid value: scale's from s = 0 (the
   control's step-0 row: the base) through each measured s to s = 1 (the control's own row); intruders'
   from its lowest lambda to lambda = 1 (the control's row). Along a trajectory only the points that set a new lowest held-out L_ft
   are kept: a later point with a higher L_ft is dominated (more training, a worse fit).
2. Forgetting at matched loss. L* is the lowest held-out L_ft that every trajectory of both the arm and
   the control reaches; KL and L_f are interpolated linearly in L_ft at L* and at the points 25/50/75%
   of the way to it from the base's L_ft. Seeds pair the arms (same data order); the reduction
   1 - KL_arm / KL_none is taken per seed, and its 95% interval is the t interval over seeds.
   `depth` = how far L* is from the base as a share of the control's own gain: below MIN_DEPTH the arm
   barely fits the data, and no verdict is given (its comparison says little about fine-tuned models).
3. Lines. Eq. 4, L_f = -c L_ft + s, is fitted per arm (LinearLaw: OLS, runs bootstrapped, steps >= the
   fit's min_step). The gap between the arm's line and the control's at L* carries a bootstrap interval
   from the two fits' resamples: if it excludes 0 and the gap is at least MIN_GAP of the control's KL
   at L*, the arm moved the line; otherwise it slid along it. When either line is not identified (its
   slope's interval spans >10x, e.g. held-out L_ft stalls while forgetting grows) there is no line to
   move and no verdict: the matched-loss numbers still stand.
4. Cost: training wall time at the last step (evaluation excluded), mean over seeds, arm / control.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from forgetscale.errors import DataError
from forgetscale.formatting import ci_suffix, pct
from forgetscale.laws.estimators import fitting
from forgetscale.laws.estimators.groups import GROUP, add_groups
from forgetscale.laws.estimators.linear import LinearLaw

QUANTILES = (0.25, 0.5, 0.75, 1.0)
MIN_DEPTH = 0.25  # below this share of the control's L_ft gain, an arm has barely fine-tuned: no verdict
MIN_GAP = 0.1  # a line gap smaller than this share of the control's KL at L* counts as no move, however certain
CONTROL = "none"
TARGETS = {"kl": "forget_kl", "f": "forget_ce"}


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and its two-sided t interval over independent values (NaN interval for fewer than 2)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
    return mean, mean - half, mean + half


def frontier(points: pd.DataFrame) -> pd.DataFrame:
    """The points of a trajectory (in order) that set a new lowest L_ft."""
    best, keep = math.inf, []
    for i, ft in enumerate(points["ft"].to_numpy(float)):
        if np.isfinite(ft) and ft < best:
            best = ft
            keep.append(i)
    return points.iloc[keep]


def at_loss(points: pd.DataFrame, target: float, column: str) -> float:
    """`column` interpolated linearly in L_ft at `target` along a frontier (NaN where it is not reached)."""
    ft, y = points["ft"].to_numpy(float), points[column].to_numpy(float)
    if not len(ft) or target > ft[0] + 1e-12 or target < ft[-1] - 1e-12:
        return math.nan
    for a in range(len(ft) - 1):
        if ft[a] >= target >= ft[a + 1]:
            w = (ft[a] - target) / (ft[a] - ft[a + 1])
            return float(y[a] + w * (y[a + 1] - y[a]))
    return float(y[-1])


def _derived(cfg: dict[str, Any]) -> tuple[float, dict[float, str]] | None:
    """A derived run's grid value and its arm's curve ends (scale: s, 0 = base, 1 = control; intruders: lambda,
    1 = control), or None for a trained run."""
    from forgetscale.mitigations import MITIGATIONS

    if "source_run" not in cfg or cfg.get("name") not in MITIGATIONS:
        return None
    spec = MITIGATIONS.get(cfg["name"])
    if not spec.derived or spec.grid_key not in cfg:
        return None
    return float(cfg[spec.grid_key]), spec.curve_ends


def trajectories(rows: pd.DataFrame, arm_config: dict[str, dict[str, Any]]) -> dict[str, list[tuple[int, pd.DataFrame]]]:
    """arm tag -> [(seed, frontier)] for one cell's rows (columns ft, kl, f, step, seed, run_id, mitigation)."""
    out: dict[str, list[tuple[int, pd.DataFrame]]] = {}
    by_run = {r: g.sort_values("step") for r, g in rows.groupby("run_id")}
    curves: dict[tuple[str, str], list[tuple[float, pd.Series]]] = {}  # (tag, source run) -> [(value, last row)]
    ends: dict[str, dict[float, str]] = {}
    for run_id, g in by_run.items():
        arm = str(g["mitigation"].iloc[0])
        cfg = arm_config.get(run_id, {})
        derived = _derived(cfg)
        if derived is not None and cfg["source_run"] in by_run:
            last = g[g["step"] == g["step"].max()].iloc[0]
            curves.setdefault((arm, cfg["source_run"]), []).append((derived[0], last))
            ends[arm] = derived[1]
            continue
        out.setdefault(arm, []).append((int(g["seed"].iloc[0]), frontier(g)))
    for (tag, source), measured in curves.items():
        control = by_run[source]
        step = int(measured[0][1]["step"])
        at_step = control[control["step"] == step]
        known = {"base": control.iloc[0], "control": at_step.iloc[0] if len(at_step) else None}
        curve = dict(measured)
        for value, which in ends[tag].items():
            if value not in curve and known[which] is not None:
                curve[value] = known[which]
        points = pd.DataFrame([curve[v] for v in sorted(curve)])
        out.setdefault(tag, []).append((int(control["seed"].iloc[0]), frontier(points)))
    for arm in out:
        out[arm].sort(key=lambda x: x[0])
    return out


def _line(rows: pd.DataFrame, target: str, options: Any) -> LinearLaw | str:
    try:
        return LinearLaw(target=target, ft_column=options.ft_column, min_step=options.min_step,
                         include_unfinished=options.include_unfinished, n_bootstrap=options.n_bootstrap,
                         seed=options.seed, heldout=False).fit(rows)
    except DataError as err:
        return str(err)


def _line_dict(law: LinearLaw | str) -> dict[str, Any]:
    if isinstance(law, str):
        return {"status": f"not fitted: {law}"}
    c, s = law.params_["c_f_ft"], law.params_["s_f_ft"]
    return {"status": law.status_, "slope": -c, "slope_ci": [-law.ci_["c_f_ft"][1], -law.ci_["c_f_ft"][0]],
            "intercept": s, "intercept_ci": list(law.ci_["s_f_ft"]), "r2": law.r2_["f"], "n_rows": law.n_rows_,
            "min_step": law.min_step_}


def _gap(arm: LinearLaw | str, control: LinearLaw | str, at: float) -> dict[str, Any]:
    """Vertical distance of the arm's line above the control's at L_ft = `at`, with a bootstrap interval."""
    if isinstance(arm, str) or isinstance(control, str) or not math.isfinite(at):
        return {"value": math.nan, "ci": [math.nan, math.nan], "at": at}
    value = float(arm.predict([at])[0] - control.predict([at])[0])
    n = min(len(arm.boot_), len(control.boot_))
    if n == 0:
        return {"value": value, "ci": [math.nan, math.nan], "at": at}

    def draws(law: LinearLaw) -> np.ndarray:
        b = law.boot_[:n]
        return -b[:, 0] * at + b[:, 1]

    lo, hi = fitting.interval((draws(arm) - draws(control))[:, None])
    return {"value": value, "ci": [float(lo[0]), float(hi[0])], "at": at}


def verdict(gap: dict[str, Any], depth: float, kl_control: float, lines: dict[str, dict[str, Any]]) -> str:
    """'moved the line down/up' when both lines are identified, the gap's interval excludes 0 and the gap is
    at least MIN_GAP of the control's KL at L* (with 3 seeds a bootstrap interval can exclude 0 for a gap
    of no practical size); 'slid along the line' otherwise."""
    if not depth >= MIN_DEPTH:
        return (f"not comparable: reaches {100 * depth:.0f}% of the control's L_ft gain "
                f"(needs {100 * MIN_DEPTH:.0f}%)")
    for who, line in lines.items():
        if not str(line.get("status", "")).startswith("converged"):
            r2 = f" (R^2 {line['r2']:.2f})" if line.get("r2") is not None else ""
            since = f" on steps >= {line['min_step']}" if line.get("min_step") else ""
            hint = " (or refit from an earlier step: fit --min-step)" if line.get("min_step", 0) > 1 else ""
            return (f"no verdict: the {who}'s Eq. 4 line is not identified{r2}{since}; read the matched-loss "
                    f"numbers{hint}")
    lo, hi = gap["ci"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "no verdict: no interval for the line's gap"
    if (hi < 0 or lo > 0) and abs(gap["value"]) >= MIN_GAP * kl_control:
        return "moved the line down" if hi < 0 else "moved the line up"
    return "slid along the line"


def _cost(rows: pd.DataFrame) -> float:
    last = rows.sort_values("step").groupby("run_id").tail(1)
    return float(last["wall_s"].mean()) if len(last) else math.nan


def compare_cell(rows: pd.DataFrame, arm_config: dict[str, dict[str, Any]], options: Any) -> dict[str, Any]:
    """The comparison of every arm of one cell with its control (see the module docstring)."""
    paths = trajectories(rows.assign(ft=rows[options.ft_column], kl=rows["forget_kl"], f=rows["forget_ce"]),
                         arm_config)
    control_paths = paths.get(CONTROL, [])
    control_line = {t: _line(rows[rows["mitigation"] == CONTROL], col, options) for t, col in TARGETS.items()}
    control_cost = _cost(rows[rows["mitigation"] == CONTROL])
    base = float(np.mean([p["ft"].iloc[0] for _, p in control_paths])) if control_paths else math.nan
    control_gain = base - float(np.mean([p["ft"].iloc[-1] for _, p in control_paths])) if control_paths else math.nan
    out: dict[str, Any] = {
        "base_ft": base, "control": {"seeds": [s for s, _ in control_paths],
                                      "line": {t: _line_dict(v) for t, v in control_line.items()},
                                      "train_s": control_cost}, "arms": []}
    for arm in sorted(a for a in paths if a != CONTROL):
        arm_rows = rows[rows["mitigation"] == arm]
        arm_paths = paths[arm]
        entry: dict[str, Any] = {"arm": arm, "seeds": [s for s, _ in arm_paths]}
        lines = {t: _line(arm_rows, col, options) for t, col in TARGETS.items()}
        entry["line"] = {t: _line_dict(v) for t, v in lines.items()}
        cost = _cost(arm_rows)
        derived = bool(len(arm_rows)) and float(arm_rows["wall_s"].max()) == 0.0
        entry["cost"] = {"train_s": cost, "ratio": 1.0 if derived else cost / control_cost,
                         "note": "no training of its own: derived from the control run's weights" if derived else ""}
        if not control_paths:
            entry["status"] = "no control runs ('none') in this cell"
            out["arms"].append(entry)
            continue
        lowest = max(p["ft"].iloc[-1] for _, p in [*arm_paths, *control_paths])
        entry["matched_ft"] = lowest
        entry["depth"] = (base - lowest) / control_gain if control_gain > 0 else math.nan
        pairs = [(s, p, q) for s, p in arm_paths for s2, q in control_paths if s == s2]
        entry["paired_seeds"] = [s for s, _, _ in pairs]
        points = []
        for q in QUANTILES:
            target = base - q * (base - lowest)
            point: dict[str, Any] = {"q": q, "ft": target}
            at: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # target -> (arm, control) per paired seed
            for t in TARGETS:
                a = np.array([at_loss(p, target, t) for _, p, _ in pairs], dtype=float)
                c = np.array([at_loss(p, target, t) for _, _, p in pairs], dtype=float)
                at[t] = (a, c)
                point[f"{t}_arm"] = float(np.nanmean(a)) if np.isfinite(a).any() else math.nan
                point[f"{t}_none"] = float(np.nanmean(c)) if np.isfinite(c).any() else math.nan
                point[f"{t}_diff"], lo, hi = t_interval(a - c)
                point[f"{t}_diff_ci"] = [lo, hi]
            kl_arm, kl_none = at["kl"]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(kl_none > 0, 1.0 - kl_arm / kl_none, np.nan)
            point["reduction"], lo, hi = t_interval(ratio)
            point["reduction_ci"] = [lo, hi]
            points.append(point)
        entry["matched"] = points
        entry["gap"] = {t: _gap(lines[t], control_line[t], lowest) for t in TARGETS}
        entry["verdict"] = verdict(entry["gap"]["f"], entry["depth"], points[-1]["kl_none"],
                                   {"control": out["control"]["line"]["f"], "arm": entry["line"]["f"]})
        entry["status"] = "compared" if len(pairs) >= 2 else f"compared on {len(pairs)} paired seed(s): no interval"
        out["arms"].append(entry)
    return out


def arm_configs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """run_id -> the run's mitigation settings from its stored config ({} for the control or an unreadable one)."""
    out = {}
    for run in runs:
        try:
            out[run["run_id"]] = json.loads(run["config"]).get("mitigation") or {}
        except (TypeError, ValueError):
            out[run["run_id"]] = {}
    return out


def compare(frame: pd.DataFrame, runs: list[dict[str, Any]], options: Any) -> list[dict[str, Any]]:
    """The comparison for every cell of a sweep that holds a mitigation arm (empty list: no arms)."""
    if frame.empty or "mitigation" not in frame or set(frame["mitigation"].astype(str)) <= {CONTROL}:
        return []
    if not options.include_unfinished:
        frame = frame[frame["status"] == "finished"]
    arm_config = arm_configs(runs)
    frame = add_groups(frame)
    cells = []
    for (dataset, group, rank), rows in frame.groupby(["dataset", GROUP, frame["rank"].fillna(-1)], sort=True):
        if set(rows["mitigation"].astype(str)) <= {CONTROL}:
            continue
        rank_label = "" if rank == -1 else f" / r{int(rank)}"
        cell = {"dataset": str(dataset), "variant": str(group), "rank": None if rank == -1 else int(rank),
                "label": f"{dataset} / {group}{rank_label}", **compare_cell(rows, arm_config, options)}
        cells.append(cell)
    return cells


def add_to_doc(doc: dict[str, Any], run_dir: Any, options: Any) -> None:
    """Put the comparison into a laws.json document (key 'mitigation') when the sweep has arms."""
    from forgetscale.store import Store

    with Store(run_dir, create=False) as store:
        cells = compare(store.frame(), store.runs(), options)
    if cells:
        doc["mitigation"] = cells


def summary_lines(cell: dict[str, Any]) -> list[str]:
    """One sentence per arm: the headline numbers and the verdict."""
    out = []
    for a in cell["arms"]:
        if "matched" not in a:
            out.append(f"{a['arm']}: {a['status']}")
            continue
        p = {k: math.nan if v is None else v for k, v in a["matched"][-1].items()}  # laws.json stores NaN as null
        ci = ci_suffix(*p["reduction_ci"], lambda v: pct(v, 0))
        depth = math.nan if a["depth"] is None else a["depth"]
        out.append(f"{a['arm']}: KL at matched L_ft {p['ft']:.4f} is {100 * p['reduction']:.0f}%{ci} lower than the "
                   f"control's ({p['kl_arm']:.4f} vs {p['kl_none']:.4f}; depth {100 * depth:.0f}% of the control's "
                   f"gain); {a['verdict']}; training cost {a['cost']['ratio'] or math.nan:.2f}x")
    return out
