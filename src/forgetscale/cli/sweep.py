"""Run (or resume) a forgetting sweep described by a YAML config."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from forgetscale.cli.eval import run_after_sweep
from forgetscale.cli.tables import print_summary
from forgetscale.config import load_config, parse_overrides
from forgetscale.executors import EXECUTORS
from forgetscale.tracking import LOG_HELP, open_sink

NAME = "sweep"
HELP = "run or resume a forgetting sweep from a YAML config"
EPILOG = """examples:
  forgetscale sweep configs/quickstart.yaml --out runs/quickstart
  forgetscale sweep my.yaml --out runs/x --set train.steps=200 --set train.lr=3e-4
  forgetscale sweep my.yaml --out runs/x --executor ray                      # a local Ray instance
  forgetscale sweep my.yaml --out /shared/x --executor ray --address auto   # join the cluster on this node
Re-running the same command resumes: finished runs are skipped, an interrupted run continues.
Ray needs `pip install 'forgetscale[ray]'`; sizing and artefacts: docs/distributed.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="sweep config (YAML)")
    parser.add_argument("--out", type=Path, required=True, help="run directory (holds results.sqlite)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted), value parsed as YAML; repeatable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--executor", default="local", choices=EXECUTORS.names(),
                        help="local: runs one after another in this process (default); ray: each run a Ray task "
                        "with the config's `resources`")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="ray: the cluster to join (e.g. auto, HOST:6379); default $RAY_ADDRESS, else a new "
                        "local instance")
    parser.add_argument("--log", default=None, metavar="mlflow[:URI]", help=LOG_HELP)


def run(args: argparse.Namespace) -> int:
    from forgetscale.sweep import run_sweep

    cfg = load_config(args.config, parse_overrides(args.overrides))
    if cfg.evals.suites:  # an unknown suite or task, or a missing extra, before any training
        from forgetscale.evals.runner import check_suites

        check_suites(cfg.evals)
    sink = open_sink(args.log, args.out, f"forgetscale/{cfg.name}")  # an unreachable URI: before any training
    with sink.following() if sink else contextlib.nullcontext():
        store = run_sweep(cfg, args.out, progress=not args.no_progress, executor=args.executor, address=args.address)
        return finish_sweep(cfg, store, args.out, progress=not args.no_progress)


def finish_sweep(cfg, store, out: Path, progress: bool) -> int:
    """Print the rows, run the configured eval suites; exit code 1 when any run of the sweep failed."""
    print_summary(store)
    note = store.get_meta("reference")
    if note:
        print(f"base reference: {note}")
    run_after_sweep(cfg, out, progress=progress)
    runs = store.runs()
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        print(f"forgetscale: {len(failed)} of {len(runs)} runs failed (reasons above); fix the cause and re-run "
              "the same command to retry them", file=sys.stderr)
        return 1
    return 0
