"""Run the embedded demo sweep (SmolLM2-135M-Instruct, LoRA ranks 2/8/32, news -> Wikipedia forgetting)."""

from __future__ import annotations

import argparse
from importlib.resources import files
from pathlib import Path

NAME = "demo"
HELP = "run the embedded demo sweep offline (~10 min on a 2-core CPU)"
EPILOG = """examples:
  forgetscale demo                 # writes runs/demo/results.sqlite
  forgetscale demo --out /tmp/d --set train.steps=16"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a demo config key (dotted), value parsed as YAML; repeatable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def demo_config_path() -> Path:
    return Path(str(files("forgetscale") / "resources" / "demo.yaml"))


def run(args: argparse.Namespace) -> int:
    from forgetscale.cli.sweep import finish_sweep
    from forgetscale.config import load_config, parse_overrides
    from forgetscale.sweep import run_sweep

    cfg = load_config(demo_config_path(), parse_overrides(args.overrides))
    store = run_sweep(cfg, args.out, progress=not args.no_progress)
    return finish_sweep(cfg, store, args.out, progress=not args.no_progress)
