"""The torch halves of the arms, by spec name, and the three things an executor asks of them: the
once-per-sweep inputs, a run's step hooks, and derived runs (measured, never trained).

Adding an arm: its spec in config/mitigations.py, one module with an `Arm` subclass, one line in ARMS below, a test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from forgetscale.config.mitigations import MITIGATIONS, MitigationSpec
from forgetscale.data import Blocks
from forgetscale.mitigations.base import Arm
from forgetscale.mitigations.freeze import Freeze
from forgetscale.mitigations.inputs import ArmInputs
from forgetscale.mitigations.kl import KL
from forgetscale.mitigations.l2sp import Penalty
from forgetscale.mitigations.replay import Replay
from forgetscale.mitigations.scale import Scale
from forgetscale.mitigations.self_replay import SelfReplay
from forgetscale.plan import RunPlan
from forgetscale.registry import Registry
from forgetscale.train import HookSetup, RowSink, RunContext

ARMS: Registry[Arm] = Registry("mitigation")
for _name, _arm in (("none", Arm()), ("replay", Replay()), ("self_replay", SelfReplay()), ("kl", KL()),
                    ("l2sp", Penalty()), ("ewc", Penalty()), ("freeze", Freeze()), ("scale", Scale())):
    ARMS.add(_name, _arm)
assert set(ARMS.names()) == set(MITIGATIONS.names()), "every arm spec needs its torch half"


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
