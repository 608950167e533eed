"""Plan the next fine-tune from fitted laws: which (rank, steps) reach an L_ft goal, within a
forgetting budget, at what compute, and where the answer leaves what the sweep measured.

Reads RUN_DIR/laws.json (run `forgetscale fit` first) and the sweep's own tokens per step and
seconds per step for the cost columns. `--paper DATASET` plans on the paper's published constants
instead (Llama 2 7B, no intervals).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from forgetscale.errors import ConfigError
from forgetscale.formatting import fixed, interval
from forgetscale.laws.estimators import forms
from forgetscale.laws.pipeline import forecast, lawfile, plan
from forgetscale.laws.studies import paper

NAME = "plan"
HELP = "which (rank, steps) reach an L_ft goal within a forgetting budget, with intervals and cost"
EPILOG = """examples:
  forgetscale plan runs/demo --ft-goal 2.95                    # fewest steps per rank to reach L_ft 2.95
  forgetscale plan runs/demo --forget-budget 3.12              # the best L_ft each rank reaches within L_f 3.12
  forgetscale plan runs/demo --ft-goal 2.95 --forget-budget 3.12 --ranks 4 16 64
  forgetscale plan --paper openorca --ft-goal 0.70             # on the paper's constants (Llama 2 7B)

Losses are in nats, in the units `fit` used (--target): forget_ce includes the base entropy, which
the KL column subtracts. Intervals are 95% new-run intervals: where a run you make will land.
'frontier' marks the options no other beats on both steps and forgetting. The form is the one the
forecasting benchmark (benchmarks/forecast_bench.py) found best at this pilot's share of the longest
option's compute; the output says which and why, and says so where no form was reliable there."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="sweep folder with laws.json")
    parser.add_argument("--paper", choices=sorted(paper.CONSTANTS), default=None,
                        help="plan on the paper's constants instead of a RUN_DIR")
    parser.add_argument("--ft-goal", type=float, default=None, help="fine-tuning loss to reach (nats)")
    parser.add_argument("--forget-budget", type=float, default=None, help="forgetting not to exceed (nats)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="candidate ranks (default: run ranks "
                        "and powers of two up to 4x the largest)")
    parser.add_argument("--max-steps", type=int, default=None, help="largest N considered (default 4x the fitted)")
    parser.add_argument("--form", default=None, help="law form (default: the forecasting benchmark's rule at "
                        "this pilot's share of the run's compute; see docs/laws.md)")
    parser.add_argument("--dataset", default=None, help="fine-tuning dataset (when the sweep has several)")
    parser.add_argument("--method", default=None, help="method (when the sweep has several)")
    parser.add_argument("--mitigation", default=None, help="mitigation arm (when the sweep has several)")
    parser.add_argument("--p-per-rank", type=int, default=paper.P_PER_RANK, help="with --paper: P per unit rank")


def paper_plan(dataset: str, goal: plan.Goal, ranks: list[int] | None, max_steps: int | None,
               p_per_rank: int) -> pd.DataFrame:
    """The options the paper's constants imply (no intervals: published constants carry none)."""
    p = paper.constants(dataset)
    candidates = [(r, float(p_per_rank * r)) for r in (ranks or paper.RANKS)]
    table = plan.options(lambda P, N: forms.power_ft(P, N, p), lambda P, N: forms.power_f(P, N, p),
                             candidates, goal, min_step=paper.MIN_STEP, max_steps=int(max_steps or 4 * paper.STEPS[-1]))
    for col in ("ft_lo", "ft_hi", "f_lo", "f_hi"):
        table[col] = np.nan
    table["note"] = ""
    return table


def group_frame(run_dir: Path, group: dict) -> pd.DataFrame | None:
    """The stored checkpoint rows of the fitted group (None without a results store)."""
    results = run_dir / "results.sqlite"
    if not results.exists():
        return None
    from forgetscale.laws.estimators.select import group_rows
    from forgetscale.store import Store

    with Store(results, create=False) as store:
        return group_rows(store.frame(), group["key"])


def sweep_costs(rows: pd.DataFrame | None) -> tuple[float, float]:
    """Tokens per step and seconds per step (training and checkpoints) as this group's runs measured them."""
    rows = None if rows is None else rows[rows["step"] > 0]
    if rows is None or rows.empty:
        return math.nan, math.nan
    last = rows.sort_values("step").groupby("run_id").tail(1)
    return float(np.median(rows["tokens_seen"] / rows["step"])), float(np.median(last["wall_s"] / last["step"]))


def run(args: argparse.Namespace) -> int:
    if (args.run_dir is None) == (args.paper is None):
        raise ConfigError("give RUN_DIR or --paper DATASET (not both)")
    goal = plan.Goal(args.ft_goal, args.forget_budget)
    warnings: list[str] = []
    tokens = seconds = math.nan
    if args.paper:
        table = paper_plan(args.paper, goal, args.ranks, args.max_steps, args.p_per_rank)
        title, form, base = f"paper constants, {args.paper}", "power, separate (paper)", math.nan
    else:
        doc = lawfile.load(args.run_dir)
        group = forecast.choose_group(doc, args.dataset, args.method, args.mitigation)
        table, choice, warnings = plan.plan(group, goal, form=args.form, ranks=args.ranks,
                                            max_steps=args.max_steps)
        form = choice.form
        rows = group_frame(Path(args.run_dir), group)
        tokens, seconds = sweep_costs(rows)
        title = group["label"]
        base = group_base_entropy(rows, doc)
    out = Console()
    if not out.is_terminal:
        out = Console(width=160)
    want = " and ".join(x for x in (f"L_ft <= {args.ft_goal:g}" if args.ft_goal else "",
                                    f"L_f <= {args.forget_budget:g}" if args.forget_budget else "") if x)
    t = Table(title=f"{title}: {want} (form: {form}; 95% new-run intervals)", title_justify="left")
    cols = ["rank", "P", "steps", "L_ft", "95% new run", "L_f", "95% new run"]
    if math.isfinite(base):
        cols.append("KL")
    cols += ["tokens", "est. time", "meets", "note"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("meets", "note") else "right", overflow="fold")
    for r in table.itertuples(index=False):
        meets = ("frontier" if r.frontier else "yes") if r.feasible else (
            "goal not reached" if not r.reaches else "over budget")
        cells = ["-" if r.rank is None or (isinstance(r.rank, float) and math.isnan(r.rank)) else str(int(r.rank)),
                 f"{r.P:,.0f}", str(r.N), fixed(r.ft), interval(r.ft_lo, r.ft_hi), fixed(r.f), interval(r.f_lo, r.f_hi)]
        if math.isfinite(base):
            cells.append(fixed(r.f - base))
        cells += ["-" if not math.isfinite(tokens) else f"{tokens * r.N:,.0f}",
                  "-" if not math.isfinite(seconds) else _duration(seconds * r.N), meets, r.note]
        t.add_row(*cells)
    out.print(t)
    if not args.paper:
        out.print(f"form: {choice.reason}", highlight=False, soft_wrap=True)
    if math.isfinite(seconds):
        out.print(f"cost: {tokens:,.0f} tokens and {seconds:.2f} s per step, as this sweep measured them "
                  "(LoRA's cost per step hardly depends on rank)", highlight=False)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def group_base_entropy(rows: pd.DataFrame | None, doc: dict) -> float:
    """The base model's entropy on the forgetting set (L_f at step 0), when the laws are on forget_ce."""
    if rows is None or doc.get("options", {}).get("target", "forget_ce") != "forget_ce":
        return math.nan
    base = rows.loc[rows["step"] == 0, "forget_ce"]
    return float(base.median()) if len(base) else math.nan


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
