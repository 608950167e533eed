"""Predict fine-tuning loss and forgetting at new (P, N) from the laws in RUN_DIR/laws.json.

Every fitted form answers: the paper's power laws (separate and joint), Eq. 4 applied to Eq. 5
("linear of power_ft"), and the multiplicative form, each with two intervals: the mean curve's (over
bootstrap refits: where the law's curve is) and a new run's (the curve's uncertainty plus one run's
scatter around it: where the run you are about to make will land). When the forms disagree by more
than their intervals, the forecast depends on the form chosen. Each table names the form the forecasting
benchmark's rule picks at this pilot's share of the run's compute (laws/pipeline/record.py), and why.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from forgetscale.errors import ConfigError
from forgetscale.formatting import fixed, interval
from forgetscale.laws.pipeline import fitall, forecast, lawfile, plan

NAME = "predict"
HELP = "forecast L_ft and L_f at given trainable parameters and steps, with intervals"
EPILOG = """examples:
  forgetscale predict runs/demo --rank 64 --steps 100 200 400
  forgetscale predict runs/demo --params 2.5e8 --steps 260
  forgetscale predict runs/demo --dataset news --rank 8 16 --steps 150
  forgetscale predict runs/pilot --against runs/target   # score the forecast of runs made later

--rank R uses the exact P the sweep stored for rank R of this method; --params gives P directly.
Run `forgetscale fit RUN_DIR` first."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="sweep output folder with laws.json")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--params", type=float, nargs="+", metavar="P", help="trainable parameter counts")
    where.add_argument("--rank", type=int, nargs="+", metavar="R", help="adapter ranks that were run (P looked up)")
    where.add_argument("--against", metavar="TARGET_DIR", default=None,
                       help="a RUN_DIR of runs made later: forecast their checkpoints and score the forecast")
    parser.add_argument("--steps", type=float, nargs="+", default=None, metavar="N", help="update steps")
    parser.add_argument("--dataset", default=None, help="fine-tuning dataset (when the sweep has several)")
    parser.add_argument("--method", default=None, help="method (when the sweep has several)")
    parser.add_argument("--mitigation", default=None, help="mitigation arm (when the sweep has several)")
    parser.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")


def _score_against(group: dict, target: Path, level: float) -> int:
    """Forecast every stored checkpoint of TARGET_DIR's runs and print the errors and coverage."""
    from forgetscale.laws.estimators.select import group_rows
    from forgetscale.store import Store

    with Store(target, create=False) as store:
        frame = store.frame()
    rows = group_rows(frame, group["key"])
    if rows.empty:
        raise ConfigError(f"{target} holds no runs of {group['label']} (its groups: "
                          f"{', '.join(sorted(frame['method'].astype(str).unique()))})")
    scored = forecast.against(group, rows, level)
    for warning in forecast.outside_range(group, scored["P"].unique(), scored["N"].max()):
        print(f"warning: {warning}", file=sys.stderr)
    out = Console()
    if not out.is_terminal:
        out = Console(width=150)
    pct = f"{100 * level:g}%"
    t = Table(title=f"{group['label']}: forecasts of {target} ({scored['run_id'].nunique()} runs)", title_justify="left")
    for col in ("form", "output", "P", "N", "forecast", "measured", "error (nats)", "error / change",
                f"{pct} new run", "covered"):
        t.add_column(col, justify="left" if col in ("form", "output") else "right")
    for r in scored.itertuples(index=False):
        t.add_row(r.form, {"ft": "L_ft", "f": "L_f"}[r.output], f"{r.P:,.0f}", f"{r.N:g}", fixed(r.forecast),
                  fixed(r.measured), f"{r.error:+.4f}", "-" if not math.isfinite(r.share_of_change)
                  else f"{100 * r.share_of_change:+.1f}%", interval(r.pi_lo, r.pi_hi),
                  "-" if r.covered is None else ("yes" if r.covered else "no"))
    out.print(t)
    return 0


def run(args: argparse.Namespace) -> int:
    if not 0 < args.level < 1:
        raise ConfigError(f"--level must be between 0 and 1; got {args.level}")
    if args.against is None and args.steps is None:
        raise ConfigError("--steps is required with --params or --rank")
    for n in args.steps or []:
        if not math.isfinite(n) or n <= 0 or not float(n).is_integer():
            raise ConfigError(f"--steps must be whole numbers of update steps > 0; got {n:g}")
    doc = lawfile.load(args.run_dir)
    group = forecast.choose_group(doc, args.dataset, args.method, args.mitigation)
    if args.against is not None:
        return _score_against(group, Path(args.against), args.level)
    if args.rank:
        points = [(forecast.params_for_rank(group, r), f"rank {r}") for r in args.rank]
    else:
        for p in args.params:
            if not math.isfinite(p) or p <= 0:
                raise ConfigError(f"--params must be finite numbers > 0; got {p:g}")
        points = [(p, "") for p in args.params]
    grid = [(p, n, label) for p, label in points for n in args.steps]
    P = np.array([g[0] for g in grid])
    N = np.array([g[1] for g in grid])
    table = forecast.forecast(group, P, N, args.level)
    out = Console()
    if not out.is_terminal:
        out = Console(width=140)
    results = Path(args.run_dir) / "results.sqlite"
    if results.exists():
        from forgetscale.store import Store

        with Store(results, create=False) as store:
            if group["label"] in fitall.stale_groups(store.frame(), {"groups": [group], "options": doc.get("options")}):
                print(f"warning: results.sqlite changed since laws.json was written; re-run `forgetscale fit "
                      f"{args.run_dir}`", file=sys.stderr)
    for warning in forecast.outside_range(group, P, N):
        print(f"warning: {warning}", file=sys.stderr)
    pct = f"{100 * args.level:g}%"
    choices = {n: plan.choose_form(group, n) for n in dict.fromkeys(N.tolist())}
    for p, n, label in grid:
        rows = table[(table["P"] == p) & (table["N"] == n)]
        t = Table(title=f"{group['label']}: P = {p:,.0f}{f' ({label})' if label else ''}, N = {n:g}",
                  title_justify="left")
        for col in ("form", "L_ft (nats)", f"{pct} mean", f"{pct} new run", "L_f (nats)", f"{pct} mean",
                    f"{pct} new run", "note"):
            t.add_column(col)
        for form in dict.fromkeys(rows["form"]):
            cells = {}
            for o in ("ft", "f"):
                r = rows[(rows["form"] == form) & (rows["output"] == o)]
                cells[o] = (("-", "", "") if r.empty else
                            (fixed(r["value"].iloc[0]), interval(r["lo"].iloc[0], r["hi"].iloc[0]),
                             interval(r["pi_lo"].iloc[0], r["pi_hi"].iloc[0])))
            statuses = " ".join(rows[rows["form"] == form]["status"])
            kinds = [k for k in ("not identifiable", "not converged", "no intervals") if k in statuses]
            note = "; ".join(kinds).replace("not identifiable", "some constants not identified")
            if form == choices[n].form:
                note = "; ".join(x for x in ("the rule's choice", note) if x)
            t.add_row(form, *cells["ft"], *cells["f"], note)
        out.print(t)
        out.print(f"form for N = {n:g}: {choices[n].reason}", highlight=False, soft_wrap=True)
    return 0
