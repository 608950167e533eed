"""How often the intervals hold what they claim, on sweeps simulated from known constants.

Each replicate simulates a sweep (synthetic.simulate_frame: log-normal noise per checkpoint plus an
offset per run), fits the laws on its pilot rows, and forecasts one target (P, N). Two claims are
checked: the mean-curve interval holds the true curve, and the new-run interval holds the value a
fresh run (a new seed, same noise) measures there. `python benchmarks/bench_coverage.py` prints the
table docs/laws.md quotes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from forgetscale.laws.estimators import forms
from forgetscale.laws.pipeline import forecast
from forgetscale.laws.pipeline.fitall import FitOptions, fit_group
from forgetscale.laws.studies import paper, synthetic

TRUTH = {"ft": forms.power_ft, "f": forms.power_f}


@dataclass(frozen=True)
class Design:
    """A simulated sweep and the forecast asked of it."""

    name: str
    ranks: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: tuple[int, ...]
    pilot_ranks: tuple[int, ...]  # rows the laws are fitted on ...
    pilot_max_step: int  # ... up to this step
    target: tuple[int, int]  # (rank, step) forecast
    noise: float = 0.01
    run_noise: float = 0.005
    laws: tuple[str, ...] = ("linear", "power_ft", "power_f", "power_joint")
    constants: Mapping[str, float] = field(default_factory=lambda: paper.in_gauge("openorca", 0.002))


STEPS = tuple(range(10, 261, 10))
DESIGNS = {
    "paper, in range": Design("paper, in range", paper.RANKS, (0,), STEPS, paper.RANKS, 260, (64, 200)),
    "3 seeds, in range": Design("3 seeds, in range", paper.RANKS, (0, 1, 2), STEPS, paper.RANKS, 260, (64, 200)),
    # 4 pilot runs: with 3 (one seed per rank) a fit gives no interval at all (7 distinct resamples)
    "paper, extrapolated": Design("paper, extrapolated", paper.RANKS, (0,), STEPS, (8, 16, 32, 64), 100, (256, 260)),
    "3 seeds, extrapolated": Design("3 seeds, extrapolated", paper.RANKS, (0, 1, 2), STEPS, (8, 16, 32), 100,
                                    (256, 260)),
}


def _fresh_run(design: Design, rng: np.random.Generator) -> dict[str, float]:
    """What one new run measures at the target: the true curve times its run offset and point noise."""
    rank, step = design.target
    P = paper.P_PER_RANK * rank
    out = {}
    for o, fn in TRUTH.items():
        out[o] = float(fn(P, step, design.constants) * np.exp(rng.normal(0, design.run_noise) + rng.normal(0, design.noise)))
    return out


def replicate(design: Design, seed: int, n_bootstrap: int = 200, level: float = 0.95) -> pd.DataFrame:
    """One simulated sweep: per (form, output) whether each interval covered (NaN: no interval)."""
    frame = synthetic.simulate_frame(design.constants, ranks=design.ranks, seeds=design.seeds, steps=design.steps,
                                     noise=design.noise, run_noise=design.run_noise, seed=seed)
    pilot = frame[frame["rank"].isin(design.pilot_ranks) & (frame["step"] <= design.pilot_max_step)]
    fitted, _ = fit_group(pilot, FitOptions(n_bootstrap=n_bootstrap, seed=seed, laws=design.laws), heldout=False)
    rank, step = design.target
    P = float(paper.P_PER_RANK * rank)
    fresh = _fresh_run(design, np.random.default_rng([seed, 7]))
    rows = []
    for form, name, output in forecast.FORECASTS:
        if name not in fitted or (name == "linear" and "power_ft" not in fitted):
            continue
        point, draws, new = forecast._draws(fitted, name, output, np.array([P]), np.array([float(step)]))
        truth = float(TRUTH[output](P, step, design.constants))
        row = {"design": design.name, "seed": seed, "form": form, "output": output, "truth": truth,
               "fresh": fresh[output], "value": float(point[0])}
        for kind, d, target in (("mean", draws, truth), ("new_run", new, fresh[output])):
            if len(d) and np.isfinite(d).mean() > 0.9:
                lo, hi = np.nanpercentile(d[:, 0], [50 * (1 - level), 100 - 50 * (1 - level)])
                row[f"{kind}_covered"] = float(lo <= target <= hi)
                row[f"{kind}_width"] = float(hi - lo)
            else:
                row[f"{kind}_covered"] = row[f"{kind}_width"] = np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def coverage(designs: Iterable[Design], replicates: int = 50, n_bootstrap: int = 200,
             level: float = 0.95) -> pd.DataFrame:
    """Coverage per (design, form, output) over `replicates` simulated sweeps."""
    runs = pd.concat([replicate(d, s, n_bootstrap, level) for d in designs for s in range(replicates)],
                     ignore_index=True)
    return (runs.groupby(["design", "form", "output"], sort=False)
            .agg(replicates=("seed", "size"), mean_covered=("mean_covered", "mean"),
                 new_run_covered=("new_run_covered", "mean"), new_run_width=("new_run_width", "median"),
                 abs_error=("value", lambda v: float(np.median(np.abs(v - runs.loc[v.index, "truth"])))))
            .reset_index())
