"""Write a sweep's stored checkpoint rows (joined with their run's columns) to CSV or Parquet."""

from __future__ import annotations

import argparse
from pathlib import Path

from forgetscale.errors import ConfigError

NAME = "export"
HELP = "export stored rows to csv or parquet"
EPILOG = """examples:
  forgetscale export runs/demo --format csv            # runs/demo/checkpoints.csv
  forgetscale export runs/demo --format parquet -o rows.parquet"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory holding results.sqlite")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument("-o", "--output", type=Path, default=None, help="output file (default RUN_DIR/checkpoints.<fmt>)")


def run(args: argparse.Namespace) -> int:
    from forgetscale.store import Store

    store = Store(args.run_dir, create=False)
    frame = store.frame()
    out = args.output or args.run_dir / f"checkpoints.{args.format}"
    if out.exists() and out.is_dir():
        raise ConfigError(f"--output: {out} is a directory; give a file name")
    managed = [store.path, *(store.path.with_name(store.path.name + s) for s in ("-wal", "-shm", "-journal"))]
    if out.resolve() in {p.resolve() for p in managed} or args.run_dir.resolve() / "runs" in out.resolve().parents:
        raise ConfigError(f"--output: {out} is one of the files forgetscale keeps in {args.run_dir}; "
                          "write the export somewhere else")
    if not out.parent.is_dir():
        raise ConfigError(f"--output: folder {out.parent} does not exist; create it first")
    tmp = out.with_name(out.name + ".tmp")
    if args.format == "csv":
        frame.to_csv(tmp, index=False)
    else:
        frame.to_parquet(tmp, index=False)
    tmp.replace(out)
    print(f"wrote {len(frame)} rows to {out}")
    return 0
