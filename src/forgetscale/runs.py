"""The run plan: every (method, rank, seed, mitigation arm) a sweep config asks for, each with a stable
run_id (a hash of everything that defines the run, and nothing that does not). Torch-free.

Resuming keys on the run_id: the same config gives the same ids, so finished runs are skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from forgetscale.config import SweepConfig
from forgetscale.errors import ConfigError
from forgetscale.methods import MethodSpec
from forgetscale.mitigations import CONTROL, MitigationSpec, arms, check_arms

# keys that may change between invocations on the same RUN_DIR without invalidating stored runs
EXTENDABLE = ("name", "method", "mitigation")
RUN_IRRELEVANT_TRAIN_KEYS = ("seed", "seeds", "threads", "eval_batch_size", "save_adapters", "device",
                             "gradient_checkpointing", "allocator")
RUN_IRRELEVANT_SECTIONS = ("resources", "evals")  # how a run is executed, never what it computes
# keys added after sweeps were stored: left out of a run's identity at their default, so those runs keep their ids
OMITTED_AT_DEFAULT = {("model", "dtype"): "auto", ("model", "quantization"): "none"}


def run_shared_settings(cfg: SweepConfig) -> dict[str, Any]:
    """The sections every run of the sweep shares, as they enter its run_id."""
    shared = cfg.to_dict()
    for key in ("name", "method", "mitigation", *RUN_IRRELEVANT_SECTIONS):
        shared.pop(key, None)
    for key in RUN_IRRELEVANT_TRAIN_KEYS:
        shared["train"].pop(key)
    for (section, key), default in OMITTED_AT_DEFAULT.items():
        if shared[section].get(key) == default:
            shared[section].pop(key)
    if cfg.forgetting.exact_reference:  # memory, disk, recompute, auto: the same numbers
        shared["forgetting"].pop("reference")
    return shared


def check_method_settings(cfg: SweepConfig) -> None:
    """Settings that only adapter methods can run with, refused before anything is written."""
    for spec in cfg.method:
        if spec.uses_adapter:
            continue
        if cfg.forgetting.reference == "recompute":
            raise ConfigError(f"forgetting.reference: recompute needs an adapter to disable and method '{spec.name}' "
                              "has none; use memory, disk or topk:K; got 'recompute'")
        if cfg.model.quantization != "none":
            raise ConfigError(f"model.quantization: a 4-bit base cannot be trained by method '{spec.name}'; use an "
                              f"adapter method (lora, dora, ia3); got {cfg.model.quantization!r}")


@dataclass
class RunPlan:
    run_id: str
    method: MethodSpec
    rank: int | None
    seed: int
    label: str
    mitigation: MitigationSpec = field(default=CONTROL)
    arm_value: Any = None  # the arm's per-run value (scale's s), if it has a grid
    source: str | None = None  # derived runs (scale): the control run whose weights they are measured from

    def arm_config(self) -> dict[str, Any]:
        """The arm's settings as stored in the run's config."""
        return {**self.mitigation.identity(self.arm_value), **({"source_run": self.source} if self.source else {})}


def run_hash(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def plan_runs(cfg: SweepConfig) -> list[RunPlan]:
    """Every (method, rank, mitigation arm, seed) of the config, with a stable run_id.

    The control arm's run_id is the one a sweep without mitigations gives (the arm is not part of its
    identity), so adding arms to a sweep reuses its runs. Derived runs (the scale arm's, measured from the
    control run's weights) come last, after the runs they read."""
    shared = run_shared_settings(cfg)
    check_arms(cfg.mitigation, cfg.method)
    check_method_settings(cfg)
    plans, derived = [], []
    for spec in cfg.method:
        for rank in spec.run_ranks():
            for seed in cfg.train.seed_list:  # seed-major: arms alternate, so machine drift hits them alike
                for arm in arms(cfg.mitigation):
                    for value in arm.grid():
                        ident = {"shared": shared, "method": spec.identity(), "rank": rank, "seed": seed}
                        control = run_hash(ident)
                        if arm.name != "none":
                            ident["mitigation"] = arm.identity(value)
                        label = (spec.label(rank) + ("" if arm.name == "none" else f"-{arm.label(value)}")
                                 + (f"-s{seed}" if len(cfg.train.seed_list) > 1 else ""))
                        plan = RunPlan(run_id=run_hash(ident), method=spec, rank=rank, seed=seed, label=label,
                                       mitigation=arm, arm_value=value, source=control if arm.derived else None)
                        (derived if arm.derived else plans).append(plan)
    plans += derived
    ids = [p.run_id for p in plans]
    if len(set(ids)) != len(ids):
        raise ConfigError("method: two entries describe the same run; remove the duplicate")
    return plans
