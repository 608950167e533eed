"""Print what the paper's published constants (arXiv 2401.05605, Table 1) predict.

The default grid (ranks 8-256, steps 50-260, P = 2,498,560 x rank for LoRA on Llama 2 7B) is the
reference table the project checks itself against. Columns: Eq. 5 (fine-tuning loss), Eq. 6
(forgetting) and Eq. 4 applied to Eq. 5 (forgetting through the linear trade-off); the last two
agree within 0.007 nats, which is the evidence for the reconstructed form of Eq. 6.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from forgetscale.errors import ConfigError
from forgetscale.laws.studies import paper

NAME = "paper-laws"
HELP = "print the paper's published laws on a (rank, step) grid"
EPILOG = """examples:
  forgetscale paper-laws                              # the reference table, both datasets
  forgetscale paper-laws --dataset news --ranks 8 64 --steps 100 1000
  forgetscale paper-laws --csv > paper.csv            # the rows of paper-table1-predictions.csv
  forgetscale paper-laws --constants --dataset openorca

The constants are valid for Llama 2 7B chat with LoRA on all linear modules and N >= 50."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=sorted(paper.CONSTANTS), default=None, help="default: both")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(paper.RANKS), help="LoRA ranks")
    parser.add_argument("--steps", type=int, nargs="+", default=list(paper.STEPS), help="update steps")
    parser.add_argument("--p-per-rank", type=int, default=paper.P_PER_RANK,
                        help="trainable parameters per unit rank (default: Llama 2 7B, all linear modules)")
    parser.add_argument("--csv", action="store_true", help="print CSV (6 decimals) instead of a table")
    parser.add_argument("--constants", action="store_true", help="print the 13 constants instead")


def run(args: argparse.Namespace) -> int:
    datasets = [args.dataset] if args.dataset else ["openorca", "news"]
    if args.constants:
        t = Table(title="paper constants (Table 1)", caption=paper.SOURCE, title_justify="left")
        t.add_column("constant")
        for d in datasets:
            t.add_column(d, justify="right")
        for name in paper.CONSTANTS["openorca"]:
            t.add_row(name, *(repr(paper.CONSTANTS[d][name]) for d in datasets))
        Console().print(t)
        return 0
    for key, values in (("ranks", args.ranks), ("steps", args.steps)):
        bad = [v for v in values if v <= 0]
        if bad:
            raise ConfigError(f"--{key} must be > 0; got {bad[0]}")
    if any(s < paper.MIN_STEP for s in args.steps):
        print(f"warning: the paper's laws hold for N >= {paper.MIN_STEP}; smaller steps are extrapolations",
              file=sys.stderr)
    table = paper.predictions(datasets, args.ranks, args.steps, args.p_per_rank)
    if args.csv:
        sys.stdout.write(table.to_csv(index=False, float_format="%.6f", lineterminator="\n"))
        return 0
    t = Table(title="paper constants (Table 1): predictions in nats", title_justify="left")
    for col in ("dataset", "rank", "P", "N", "L_ft (Eq. 5)", "L_f (Eq. 6)", "L_f (Eq. 4 of Eq. 5)"):
        t.add_column(col, justify="left" if col == "dataset" else "right")
    for r in table.itertuples(index=False):
        t.add_row(r.dataset, str(r.rank), f"{r.trainable_params:,}", str(r.step), f"{r.ft_loss_eq5:.6f}",
                  f"{r.forgetting_eq6:.6f}", f"{r.forgetting_eq4_of_eq5:.6f}")
    Console().print(t)
    return 0
