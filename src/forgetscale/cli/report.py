"""Write RUN_DIR/report.html (self-contained: figures embedded, opens offline) and RUN_DIR/figures/*.png.

The page shows forgetting against fine-tuning loss with the fitted line (the paper's Fig. 2), both
losses against steps per rank with the power laws and their 95% bands (Fig. 3), predicted against
observed for every law with held-out points marked, the extrapolation test, the fitted constants
with intervals, the paper's constants beside them, the rows used and the sweep's config. It reads
RUN_DIR/laws.json; if that is missing it runs `fit` with default options first.
"""

from __future__ import annotations

import argparse
import sys

NAME = "report"
HELP = "write a self-contained HTML report of the fitted laws (RUN_DIR/report.html)"
EPILOG = """examples:
  forgetscale report runs/demo                 # fits first if runs/demo/laws.json is missing
  forgetscale fit runs/demo --target forget_kl && forgetscale report runs/demo"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="sweep output folder (holds results.sqlite)")
    parser.add_argument("--no-fit", action="store_true", help="fail instead of fitting when laws.json is missing")


def run(args: argparse.Namespace) -> int:
    from forgetscale.report import build_report

    path, notes = build_report(args.run_dir, fit_if_missing=not args.no_fit)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    figures = sorted((path.parent / "figures").glob("*.png"))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {len(figures)} figures in {path.parent / 'figures'}")
    return 0
