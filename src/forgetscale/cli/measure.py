"""Measure the forgetting of models you trained elsewhere: PEFT adapter folders, full fine-tuned checkpoints,
or an HF Trainer / TRL output folder (one row per checkpoint-*/), against the base model's own predictions.

Rows go into RUN_DIR/results.sqlite exactly as a sweep writes them (step 0 is the base), so `forgetscale
fit`, `report`, `export` and `eval` read measured runs unchanged. The forgetting set takes the sweep keys
(`--set forgetting.max_tokens=8192`, or `--config sweep.yaml`: only model, forgetting, finetune and
train.context_length / eval_batch_size / device / dtype / threads are used). Re-running skips every model
already stored (identity: base + forgetting settings + path + weight-file hash).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from forgetscale.formatting import ci_suffix, measured
from forgetscale.tracking import LOG_HELP

NAME = "measure"
HELP = "measure forgetting of PEFT adapters, full checkpoints or Trainer outputs trained elsewhere"
EPILOG = """examples:
  forgetscale measure --base smollm2-135m-instruct --adapter my-lora --out runs/mine
  forgetscale measure --base HuggingFaceTB/SmolLM2-135M --trainer-output out/ --out runs/mine \\
      --set forgetting.dataset=hf:wikitext --set forgetting.max_tokens=16384
  forgetscale measure --base ./base --model ./tuned-a ./tuned-b --data heldout.jsonl --out runs/full
  forgetscale measure --base HuggingFaceTB/SmolLM2-135M --trainer-output out/ --out runs/mine --budget 0.1
see docs/integrations.md (also: the Trainer / TRL callback, the notebook API)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="MODEL",
                        help="the base model (model.name: embedded name, hub id, local dir or .gguf)")
    parser.add_argument("--adapter", type=Path, nargs="+", default=[], metavar="DIR",
                        help="PEFT adapter folders (anything PeftModel.from_pretrained loads)")
    parser.add_argument("--model", type=Path, nargs="+", default=[], metavar="DIR",
                        help="full fine-tuned checkpoints (same architecture and tokenizer as the base)")
    parser.add_argument("--trainer-output", type=Path, action="append", default=[], metavar="DIR",
                        help="HF Trainer / TRL output folder with checkpoint-*/ subfolders; repeatable")
    parser.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run directory (results.sqlite)")
    parser.add_argument("--config", type=Path, default=None, help="a YAML config (e.g. the sweep's) for the keys")
    parser.add_argument("--data", default=None, metavar="DATASET",
                        help="finetune.dataset: held-out data for the fine-tuning loss (finetune.* keys via --set)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted), value parsed as YAML; repeatable")
    parser.add_argument("--budget", type=float, default=None, metavar="KL",
                        help="name the checkpoint with the lowest eval (or --data held-out) loss whose forgetting "
                             "KL is at most KL nats; exit 1 when none is")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="measure on N processes (started here with torchrun; each holds 1/N of the base "
                             "reference); under torchrun/accelerate already, the launcher's processes are used")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log", default=None, metavar="mlflow[:URI]", help=LOG_HELP)


def config_from_args(args: argparse.Namespace):
    from forgetscale.config import apply_overrides, load_config, parse_config, parse_overrides

    overrides = {**parse_overrides(args.overrides), "model.name": args.base, "finetune.dataset": args.data}
    if args.config is not None:
        return load_config(args.config, overrides)
    return parse_config(apply_overrides({}, overrides, shorthands={"model": "name"}), "--set")


def _launch(args: argparse.Namespace) -> int:
    """`--processes N`: this verb again on N processes under torchrun (the same arguments, less --processes)."""
    import sys

    argv = ["--base", args.base, "--out", str(args.out)]
    for flag, values in (("--adapter", args.adapter), ("--model", args.model)):
        argv += [flag, *map(str, values)] if values else []
    for path in args.trainer_output:
        argv += ["--trainer-output", str(path)]
    for flag, value in (("--config", args.config), ("--data", args.data), ("--log", args.log),
                        ("--budget", args.budget)):
        argv += [flag, str(value)] if value is not None else []
    for override in args.overrides:
        argv += ["--set", override]
    argv += ["--no-progress"] if args.no_progress else []
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torchrun --standalone, in this process: each rank prints its own one-line error; the agent's own
    # failure report (a page per run) stays out of the way
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    agent_log = logging.getLogger("torch.distributed.elastic")
    level, agent_log.level = agent_log.level, logging.CRITICAL
    try:
        elastic_launch(config, sys.executable)("-m", "forgetscale", "measure", *argv)
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        return 2 if 2 in codes else max(1, codes[-1])
    finally:
        agent_log.setLevel(level)
    return 0


def run(args: argparse.Namespace) -> int:
    import os

    from forgetscale.errors import ConfigError
    from forgetscale.measure import check_budget, check_out_folder

    check_budget(args.budget)
    if args.processes < 1:
        raise ConfigError(f"--processes: must be >= 1; got {args.processes}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if args.processes > 1 and launched == 1:
        # a bad key or a folder holding other settings is one line here, before any process starts
        check_out_folder(config_from_args(args), args.out, with_data=args.data is not None)
        return _launch(args)
    try:
        return _measure(args, int(os.environ.get("RANK", "0")) == 0)
    finally:  # under torchrun: a process group left to interpreter teardown can abort it (exit code lost)
        import torch

        if launched > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _measure(args: argparse.Namespace, main: bool) -> int:
    import contextlib

    from forgetscale.measure import measure_sources
    from forgetscale.tracking import open_sink

    cfg = config_from_args(args)
    sink = open_sink(args.log, args.out, f"forgetscale/{cfg.name}") if main else None
    with sink.following() if sink else contextlib.nullcontext():
        rows = measure_sources(cfg, args.out, adapters=args.adapter, models=args.model,
                               trainer_outputs=args.trainer_output, with_data=args.data is not None,
                               progress=not args.no_progress)
    if not main:  # the main process prints and stores
        return 0
    if rows:
        blocks = rows[0].get("blocks")
        print(f"base entropy H(p_base) = {rows[0]['base_entropy']:.4f} nats/token on {cfg.forgetting.dataset} "
              f"({blocks} blocks; intervals: 95% over blocks)")
    shown_base = False
    for row in rows:
        if row["step"] == 0:
            if shown_base:
                continue
            shown_base = True
        params = "-" if row["trainable_params"] is None or row["step"] == 0 else f"{row['trainable_params']:,}"
        name = "base" if row["step"] == 0 else row["label"]
        print(f"{name:<28} step {row['step']:>6}  P {params:>12}  KL {row['forget_kl']:.5f}{ci_suffix(*row['kl_ci'])}  "
              f"CE {row['forget_ce']:.4f}{ci_suffix(*row['ce_ci'])}  CE hard {row['forget_ce_hard']:.4f}"
              f"{ci_suffix(*row['ce_hard_ci'])}  L_ft {measured(row['ft_loss'])}")
    print(f"results: {Path(args.out) / 'results.sqlite'}")
    return 0 if args.budget is None else _budget(rows, args.budget)


def _budget(rows: list[dict], budget: float) -> int:
    import sys

    from forgetscale.measure import within_budget

    pick = within_budget(rows, budget)
    if pick is None:
        lowest = min((r for r in rows if r["step"] > 0), key=lambda r: r["forget_kl"], default=None)
        where = f"; the lowest is {lowest['forget_kl']:.5f} ({lowest['label']} step {lowest['step']})" if lowest else ""
        print(f"forgetscale: no measured checkpoint has forgetting KL <= {budget:g}{where}", file=sys.stderr)
        return 1
    over = " (its 95% upper bound is over the budget)" if pick["kl_ci"][1] > budget else ""
    loss = ("lowest L_ft " + measured(pick["ft_loss"]) if pick["ft_loss"] is not None
            else "no eval loss stored: the latest step")
    print(f"within KL {budget:g}: {pick['path'] or pick['label']} (step {pick['step']}): KL {pick['forget_kl']:.5f}"
          f"{ci_suffix(*pick['kl_ci'])}{over}, {loss}")
    return 0
