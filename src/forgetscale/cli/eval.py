"""Run capability suites (safety, choice, samples, lm-evaluation-harness tasks) on the base model and on a sweep's saved adapters,
store per-item rows and per-model summaries in RUN_DIR/results.sqlite, and print base vs each run.

Settings come from the sweep config's `evals:` section (defaults if it has none); --set changes
them for this call. A (suite, model) already stored with the same settings is skipped, so an
interrupted evaluation resumes; --force re-evaluates."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from forgetscale.tracking import LOG_HELP

NAME = "eval"
HELP = "run capability suites (safety, choice, samples, lm-eval:TASK) on the base model and saved adapters"
EPILOG = """examples:
  forgetscale eval runs/demo --suite safety,choice,samples       # embedded sets, offline
  forgetscale eval runs/demo --suite choice --runs lora-r32 --steps 8,48
  forgetscale eval runs/demo --suite safety,choice --steps checkpoints  # every kept checkpoint (then fit: refusal law)
  forgetscale eval runs/x --suite safety --set safety.source=hf:walledai/AdvBench --set safety.limit=50
  forgetscale eval runs/x --suite choice --set choice.source=hf:allenai/ai2_arc    # ARC-Challenge test
  forgetscale eval runs/x --suite lm-eval:arc_easy,hellaswag                       # lm-evaluation-harness tasks
  forgetscale eval runs/x --suite lm-eval:my_task --set lm-eval.include_path=tasks/ --log mlflow

reading the table: each rate is k/n with its 95% Wilson interval; 'vs base' is the paired difference
on the same items with Newcombe's 95% interval; '(noise)' marks a difference whose interval contains 0."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="sweep output folder (holds results.sqlite)")
    parser.add_argument("--suite", default=None, help="comma-separated suites (default: the config's evals.suites)")
    parser.add_argument("--runs", default=None, help="comma-separated run labels or run_id prefixes (default: all)")
    parser.add_argument("--steps", default=None, help="'last', 'checkpoints' (every stored checkpoint step) or comma-separated checkpoint steps "
                        "(default: the config's evals.steps)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an evals key (e.g. safety.limit=20, batch_size=8), value parsed as YAML")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: the sweep's train.device)")
    parser.add_argument("--force", action="store_true", help="re-evaluate models already stored with these settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log", default=None, metavar="mlflow[:URI]", help=LOG_HELP)


def _steps(text: str | None):
    from forgetscale.errors import ConfigError

    if text is None or text in ("last", "checkpoints"):
        return text
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--steps: must be 'last', 'checkpoints' or comma-separated integers; got {text!r}") from None


def evals_settings(run_dir: Path, overrides: list[str]):
    """The stored sweep's evals section with --set overrides applied, validated."""
    from forgetscale.config import EvalsConfig, apply_overrides, parse_overrides, validate_section
    from forgetscale.store import Store

    with Store(run_dir, create=False) as store:
        stored = store.get_meta("sweep_config")
    data = (json.loads(stored).get("evals") if stored else None) or {}
    apply_overrides(data, parse_overrides(overrides), strip="evals.")
    return validate_section(EvalsConfig, data, "--set evals")


def run(args: argparse.Namespace) -> int:
    import contextlib

    from forgetscale.cli.tables import print_eval_summary
    from forgetscale.evals.labels import run_labels
    from forgetscale.evals.runner import run_evals
    from forgetscale.store import Store
    from forgetscale.tracking import open_sink

    settings = evals_settings(args.run_dir, args.overrides)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()] if args.suite else None
    runs = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs else None
    with Store(args.run_dir, create=False) as store:
        name = json.loads(store.get_meta("sweep_config") or "{}").get("name", args.run_dir.name)
    sink = open_sink(args.log, args.run_dir, f"forgetscale/{name}")
    with sink.following() if sink else contextlib.nullcontext():
        summaries, notes = run_evals(args.run_dir, settings, suites=suites, runs=runs, steps=_steps(args.steps),
                                     force=args.force, progress=not args.no_progress, device=args.device)
    for note in notes:
        print(f"skipped: {note}")
    with Store(args.run_dir, create=False) as store:
        labels = run_labels(store)
        path = store.path
    print_eval_summary(summaries, labels)
    print(f"results: {path} (tables eval_items, eval_summaries)")
    return 0


def run_after_sweep(cfg, run_dir: Path, progress: bool) -> None:
    """The suites a sweep config asks for (`evals.suites`), run on its saved adapters and printed."""
    if not cfg.evals.suites:
        return
    from forgetscale.cli.tables import print_eval_summary
    from forgetscale.evals.labels import run_labels
    from forgetscale.evals.runner import run_evals
    from forgetscale.store import Store

    summaries, notes = run_evals(run_dir, cfg.evals, progress=progress)
    for note in notes:
        print(f"skipped: {note}")
    with Store(run_dir, create=False) as store:
        print_eval_summary(summaries, run_labels(store))
