"""The three things an executor asks of the sweep's arms: the once-per-sweep inputs, a run's step hooks,
and derived runs (measured, never trained). Each arm's spec and torch half are registered together in its
own module (mitigations/<arm>.py), so every spec name has its `Arm` in ARMS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from forgetscale.data import Blocks
from forgetscale.mitigations import ARMS, MitigationSpec
from forgetscale.mitigations.inputs import ArmInputs
from forgetscale.runs import RunPlan
from forgetscale.train import HookSetup, RowSink, RunContext


def hook_setup(plan: RunPlan, ctx: RunContext) -> HookSetup:
    """What train_run calls on the attached model to get the plan's arm hooks."""
    arm = ARMS.get(plan.mitigation.name)
    return lambda model: arm.hooks(plan.mitigation, ctx, model, plan)


def derive_run(plan: RunPlan, ctx: RunContext, sink: RowSink) -> dict[str, Any]:
    """A derived run's rows (the scale arm): measured from its source run's saved weights."""
    return ARMS.get(plan.mitigation.name).derive(plan.mitigation, plan, ctx, sink)


def prepare_arms(cfg: Any, listed: list[MitigationSpec], model: torch.nn.Module, tokenizer: Any, forgetting: Blocks,
                 block_length: int, cache_dir: Path | None, out_dir: Path, device: torch.device,
                 dtype: torch.dtype | None) -> ArmInputs:
    """Build every input the sweep's arms ask for, once, while `model` (the base) is loaded."""
    inputs = ArmInputs(cfg, model, tokenizer, forgetting, block_length, cache_dir, out_dir, device, dtype)
    for spec in listed:
        ARMS.get(spec.name).prepare(spec, inputs)
    inputs.release()
    return inputs
