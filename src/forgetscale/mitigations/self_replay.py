"""self_replay: replay (see replay.py) with text sampled from the base model itself instead of general
text, so no pre-training data is needed. Sampled once per sweep and cached under RUN_DIR/selfgen/."""

from __future__ import annotations

from typing import Any

from forgetscale.config.mitigations import SelfReplaySpec
from forgetscale.data import Blocks
from forgetscale.mitigations.base import Arm
from forgetscale.mitigations.inputs import ArmInputs
from forgetscale.mitigations.replay import ReplayHooks
from forgetscale.plan import RunPlan
from forgetscale.train import RunContext


class SelfReplay(Arm):
    def pool(self, spec: SelfReplaySpec, inputs: ArmInputs) -> Blocks:
        return inputs.generated(spec.samples, spec.temperature)

    def prepare(self, spec: SelfReplaySpec, inputs: ArmInputs) -> None:
        self.pool(spec, inputs)

    def hooks(self, spec: SelfReplaySpec, ctx: RunContext, model: Any, plan: RunPlan) -> ReplayHooks:
        return ReplayHooks(self.pool(spec, ctx.arm_inputs), spec.p, plan.seed)
