"""A sweep: config -> run plan (plan.py) -> shared context (data and base predictions, computed once) ->
an executor runs the plans -> rows in the store.

Resuming is the default: the run_id is a hash of everything that defines a run, finished runs are
skipped, and an interrupted run continues from its last saved checkpoint state.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from forgetscale.config import SweepConfig
from forgetscale.data import build_finetune_data, build_forgetting_blocks
from forgetscale.errors import StoreError
from forgetscale.executors import EXECUTORS, make_executor
from forgetscale.metric import references
from forgetscale.mitigations.runtime import prepare_arms
from forgetscale.models import (
    load_base_weights,
    load_configured_base,
    measuring_dtype,
    model_identity,
    resolve_device,
)
from forgetscale.runs import (
    EXTENDABLE,
    RUN_IRRELEVANT_SECTIONS,
    RUN_IRRELEVANT_TRAIN_KEYS,
    RunPlan,
    plan_runs,
)
from forgetscale.store import RunDirLock, RunRecord, Store
from forgetscale.train import RunContext


def keep_adapter_steps(cfg: SweepConfig) -> frozenset[int]:
    """Checkpoint steps whose weights a run saves: train.save_adapters, plus the steps evals will read."""
    tcfg = cfg.train
    keep = {"all": set(tcfg.checkpoint_steps), "last": {tcfg.steps}, "none": set()}[tcfg.save_adapters]
    return frozenset(keep | cfg.evals.adapter_steps(tcfg.checkpoint_steps, tcfg.steps))


def build_context(cfg: SweepConfig, out_dir: Path, phase: Callable[[str], None] | None = None) -> RunContext:
    """Load the base model once, build the data, and compute the base predictions once per sweep (or read
    them back from RUN_DIR/references, for forgetting.reference=disk); `phase` hears each stage as it
    starts (the progress display)."""
    phase = phase or (lambda what: None)
    phase(f"loading model {cfg.model.name}")
    setup = load_configured_base(cfg)
    base, device, dtype, length, block, data_cache = (setup.loaded, setup.device, setup.dtype, setup.context_length,
                                                      setup.block_length, setup.data_cache)
    phase("building the fine-tuning and forgetting data")
    data = build_finetune_data(cfg.finetune, base.tokenizer, length, data_cache)
    for note in data.notes:  # chat records cut at the context length, template default system prompts
        print(f"warning: {note}", file=sys.stderr)
    forgetting = build_forgetting_blocks(cfg.forgetting, base.tokenizer, block, data_cache)
    batch = cfg.train.eval_batch_size
    sets = {"forgetting": forgetting, "heldout": data.heldout}
    sizes = {name: references.projected_bytes(base.model, blocks) for name, blocks in sets.items()}
    folders: dict[str, Path] = {}
    to_write, free = 0, None
    if cfg.forgetting.reference in ("auto", "disk"):  # only these may write RUN_DIR/references
        identity = model_identity(cfg, device)
        folders = {name: references.disk_folder(out_dir, name, identity, blocks, batch) for name, blocks in sets.items()}
        to_write, free = references.disk_plan(folders, sizes)
    mode, note = references.choose(cfg.forgetting.reference, sum(sizes.values()), references.available_ram(),
                                   to_write, free, all(spec.uses_adapter for spec in cfg.methods))
    phase(f"base predictions on {forgetting.loss_tokens + data.heldout.loss_tokens:,} tokens ({mode})")
    measure_dtype = measuring_dtype(setup.weights_dtype, cfg.forgetting.dtype, device)
    refs = {name: references.build(mode, base.model, blocks, batch, device, measure_dtype, folders.get(name))
            for name, blocks in sets.items()}
    # the arms' general-text pools, self-generated text and Fisher: once per sweep, while the base is loaded
    if cfg.mitigation:
        phase("mitigation inputs")
    arm_inputs = prepare_arms(cfg, cfg.mitigation, base.model, base.tokenizer, forgetting, length, data_cache,
                              out_dir, device, dtype)
    del base, setup  # the runs load their own copies: this one must not stay in memory

    def load_base() -> torch.nn.Module:
        # on CPU, moved by the run; a 4-bit base is placed on its GPU as it loads, and random weights are drawn
        # where the reference's were (a CPU draw would be other weights, and minutes for an 8B model)
        on_device = cfg.model.quantization != "none" or cfg.model.init == "random"
        return load_base_weights(cfg, resolve_device(cfg.train.device) if on_device else "cpu")

    return RunContext(cfg, out_dir, device, dtype, None, data, forgetting, refs["forgetting"], refs["heldout"],
                      load_base, keep_adapters=keep_adapter_steps(cfg), arm_inputs=arm_inputs, reference_note=note,
                      measure_dtype=measure_dtype)


def check_same_sweep(store: Store, cfg: SweepConfig) -> None:
    """Claim RUN_DIR for this sweep (store.claim): a RUN_DIR holds one sweep, and only the method list (and
    name) may grow between invocations."""
    current = cfg.to_dict()

    def difference(old: dict[str, Any]) -> str | None:
        defaults = SweepConfig().to_dict()
        for section in current:
            if section in EXTENDABLE or section in RUN_IRRELEVANT_SECTIONS:
                continue
            new_part, old_part = current[section], old.get(section)
            if isinstance(old_part, dict) and isinstance(defaults.get(section), dict):
                old_part = {**defaults[section], **old_part}  # a key added since that sweep: its default
            if section == "forgetting" and isinstance(old_part, dict):
                exact = ("auto", "memory", "disk", "recompute")  # where the exact reference lives, not what it is
                if old_part.get("reference") in exact and new_part.get("reference") in exact:
                    old_part = {**old_part, "reference": new_part["reference"]}
            if new_part != old_part:
                keys = [k for k in new_part if not isinstance(old_part, dict) or new_part[k] != old_part.get(k)]
                if section == "train":
                    keys = [k for k in keys if k not in RUN_IRRELEVANT_TRAIN_KEYS]
                    if not keys:
                        continue
                return f"{section}.{keys[0]}" if keys else section
        return None

    store.claim("sweep", current, difference)


def run_sweep(cfg: SweepConfig, out_dir: str | Path, *, progress: bool = True, only: list[str] | None = None,
              executor: str = "local", address: str | None = None) -> Store:
    """Run (or resume) every planned run with the named executor (see forgetscale.executors); failures are
    recorded and the sweep goes on."""
    EXECUTORS.get(executor)  # an unknown name fails before anything is written
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StoreError(f"{out_dir}: exists and is not a directory")
    plans = plan_runs(cfg)  # a config the plan refuses claims nothing
    with RunDirLock(out_dir):
        store = Store(out_dir)
        check_same_sweep(store, cfg)
        _add_runs(store, cfg, plans)
        expected = set(cfg.train.checkpoint_steps)
        todo = [p for p in plans if not _complete(store, p, expected) and (only is None or p.label in only)]
        if todo:
            runner = make_executor(executor, cfg, address=address)  # before the context: a bad setting fails fast
            try:
                with _phases(progress) as phase:
                    ctx = build_context(cfg, out_dir, phase)
                store.set_meta("reference", ctx.reference_note)
                runner.execute(todo, ctx, store, progress=progress)
            finally:
                runner.close()
    return store


@contextlib.contextmanager
def _phases(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A one-line status of the once-per-sweep work before the first step (minutes on a large model), on a
    terminal only and erased when done, so a log or an error message never holds it."""
    from tqdm.auto import tqdm

    shown = enabled and sys.stderr.isatty()
    with tqdm(total=None, desc="sweep: starting", bar_format="{desc} [{elapsed}]", disable=not shown,
              leave=False, dynamic_ncols=True) as bar:
        yield lambda what: bar.set_description_str(f"sweep: {what}")


def _complete(store: Store, plan: RunPlan, expected: set[int]) -> bool:
    """A finished run with all its rows is skipped; one marked finished but missing rows (a second process
    deleted them, a hand edit) is run again."""
    if store.run(plan.run_id)["status"] != "finished":
        return False
    steps = {row["step"] for row in store.checkpoints(plan.run_id)}
    needed = expected if plan.source is None else {max(expected)}  # derived runs: the steps whose weights were kept
    if needed <= steps:
        return True
    store.update_run(plan.run_id, status="pending", error="marked finished but checkpoint rows were missing; re-run")
    return False


def _add_runs(store: Store, cfg: SweepConfig, plans: list[RunPlan]) -> None:
    for plan in plans:
        store.add_run(RunRecord(
            run_id=plan.run_id, model=cfg.model.name, dataset=cfg.finetune.dataset, method=plan.method.name,
            method_config=plan.method.identity(), rank=plan.rank, trainable_params=None, seed=plan.seed,
            mitigation=plan.mitigation.tag(),
            config={**cfg.to_dict(), "method": plan.method.identity(), "rank": plan.rank, "seed": plan.seed,
                    "mitigation": plan.arm_config()},
        ))
