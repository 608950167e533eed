"""A sweep: config -> run plan -> (shared data and base predictions, computed once) -> runs -> store.

Resuming is the default: the run_id is a hash of everything that defines a run, finished runs are
skipped, and an interrupted run continues from its last saved checkpoint state.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forgetscale.config import SweepConfig
from forgetscale.data import Blocks, FinetuneData, build_finetune_data, build_forgetting_blocks
from forgetscale.errors import ConfigError, StoreError
from forgetscale.executors import EXECUTORS, make_executor
from forgetscale.forgetting import Reference, reference
from forgetscale.mitigations import ArmInputs, arms, check_arms, prepare_arms
from forgetscale.models import cache_root, load_model, resolve_device, resolve_dtype
from forgetscale.store import Store
from forgetscale.train import RunPlan

# keys that may change between invocations on the same RUN_DIR without invalidating stored runs
_EXTENDABLE = ("name", "method", "mitigation")
_RUN_IRRELEVANT_TRAIN_KEYS = ("seed", "seeds", "threads", "eval_batch_size", "save_adapters", "device")
_RUN_IRRELEVANT_SECTIONS = ("resources", "evals")  # how a run is executed, never what it computes


def plan_runs(cfg: SweepConfig) -> list[RunPlan]:
    """Every (method, rank, mitigation arm, seed) of the config, with a stable run_id.

    The control arm's run_id is the one a sweep without mitigations gives (the arm is not part of its
    identity), so adding arms to a sweep reuses its runs. Derived runs (the scale arm's, measured from the
    control run's weights) come last, after the runs they read."""
    shared = cfg.to_dict()
    shared.pop("name")
    shared.pop("method")
    shared.pop("mitigation", None)
    for section in _RUN_IRRELEVANT_SECTIONS:
        shared.pop(section, None)
    for key in _RUN_IRRELEVANT_TRAIN_KEYS:
        shared["train"].pop(key)
    check_arms(cfg.mitigation, cfg.methods)
    plans, derived = [], []
    for spec in cfg.methods:
        for rank in spec.variants():
            for seed in cfg.train.seed_list:  # seed-major: arms alternate, so machine drift hits them alike
                for arm in arms(cfg.mitigation):
                    for variant in arm.variants():
                        ident = {"shared": shared, "method": spec.identity(), "rank": rank, "seed": seed}
                        control = _hash(ident)
                        if arm.name != "none":
                            ident["mitigation"] = arm.identity(variant)
                        label = (spec.label(rank) + ("" if arm.name == "none" else f"-{arm.label(variant)}")
                                 + (f"-s{seed}" if len(cfg.train.seed_list) > 1 else ""))
                        plan = RunPlan(run_id=_hash(ident), method=spec, rank=rank, seed=seed, label=label,
                                       mitigation=arm, variant=variant, source=control if arm.derived else None)
                        (derived if arm.derived else plans).append(plan)
    plans += derived
    labels = [p.run_id for p in plans]
    if len(set(labels)) != len(labels):
        raise ConfigError("method: two entries describe the same run; remove the duplicate")
    return plans


def _hash(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class SweepContext:
    """What every run of a sweep shares, built once."""

    config: SweepConfig
    out_dir: Path
    device: torch.device
    dtype: torch.dtype | None
    tokenizer: Any
    data: FinetuneData
    forgetting: Blocks
    forgetting_ref: Reference
    heldout_ref: Reference
    load_base: Callable[[], torch.nn.Module]
    arm_inputs: ArmInputs | None = None  # once-per-sweep inputs of the mitigation arms


def build_context(cfg: SweepConfig, out_dir: Path) -> SweepContext:
    """Load the base model once, build the data, and compute the base predictions once per sweep."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    mcfg = cfg.model
    kwargs = dict(gguf_file=mcfg.gguf_file, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code,
                  cache_dir=mcfg.cache_dir)
    base = load_model(mcfg.name, device=device, **kwargs)
    length = cfg.train.context_length
    block = cfg.forgetting.block_length or length
    for key, value in (("train.context_length", length), ("forgetting.block_length", block)):
        if value > base.max_positions:
            raise ConfigError(f"{key}: must be <= the model's {base.max_positions} positions; got {value}")
    data_cache = cache_root(mcfg.cache_dir) / "data"
    data = build_finetune_data(cfg.finetune, base.tokenizer, length, data_cache)
    forgetting = build_forgetting_blocks(cfg.forgetting, base.tokenizer, block, data_cache)
    batch = cfg.train.eval_batch_size
    forgetting_ref = reference(base.model, forgetting, batch, device, dtype)
    heldout_ref = reference(base.model, data.heldout, batch, device, dtype)
    # the arms' general-text pools, self-generated text and Fisher: once per sweep, while the base is loaded
    arm_inputs = prepare_arms(cfg, cfg.mitigation, base.model, base.tokenizer, forgetting, length, data_cache,
                              out_dir, device, dtype)
    del base

    def load_base() -> torch.nn.Module:
        return load_model(mcfg.name, device="cpu", **kwargs).model

    return SweepContext(cfg, out_dir, device, dtype, None, data, forgetting, forgetting_ref, heldout_ref, load_base,
                        arm_inputs=arm_inputs)


def check_same_sweep(store: Store, cfg: SweepConfig) -> None:
    """A RUN_DIR holds one sweep: only the method list (and name) may grow between invocations."""
    stored = store.get_meta("sweep_config")
    current = cfg.to_dict()
    if stored is not None:
        old = json.loads(stored)
        for section in current:
            if section in _EXTENDABLE or section in _RUN_IRRELEVANT_SECTIONS:
                continue
            new_part, old_part = current[section], old.get(section)
            if new_part != old_part:
                keys = [k for k in new_part if not isinstance(old_part, dict) or new_part[k] != old_part.get(k)]
                if section == "train":
                    keys = [k for k in keys if k not in _RUN_IRRELEVANT_TRAIN_KEYS]
                    if not keys:
                        continue
                key = f"{section}.{keys[0]}" if keys else section
                raise ConfigError(
                    f"{key}: differs from the sweep already stored in {store.path.parent}; use a new --out directory"
                )
    store.set_meta("sweep_config", json.dumps(current, sort_keys=True))


def run_sweep(cfg: SweepConfig, out_dir: str | Path, *, progress: bool = True, only: list[str] | None = None,
              executor: str = "local", address: str | None = None) -> Store:
    """Run (or resume) every planned run with the named executor (see forgetscale.executors); failures are
    recorded and the sweep goes on."""
    EXECUTORS.get(executor)  # an unknown name fails before anything is written
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StoreError(f"{out_dir}: exists and is not a directory")
    store = Store(out_dir)
    check_same_sweep(store, cfg)
    plans = plan_runs(cfg)
    for plan in plans:
        store.add_run({
            "run_id": plan.run_id, "model": cfg.model.name, "dataset": cfg.finetune.dataset, "method": plan.method.name,
            "method_config": plan.method.identity(), "rank": plan.rank, "trainable_params": None,
            "seed": plan.seed, "mitigation": plan.mitigation.tag(),
            "config": {**cfg.to_dict(), "method": plan.method.identity(), "rank": plan.rank, "seed": plan.seed,
                       "mitigation": plan.arm_config()},
        })
    todo = [p for p in plans if store.run(p.run_id)["status"] != "finished" and (only is None or p.label in only)]
    if not todo:
        return store
    runner = make_executor(executor, cfg, address=address)  # before the context: a bad setting fails fast
    try:
        ctx = build_context(cfg, out_dir)
        runner.execute(todo, ctx, store, progress=progress)
    finally:
        runner.close()
    return store
