"""self_replay: replay (see replay.py) with text sampled from the base model itself instead of general
text, so no pre-training data is needed. Sampled once per sweep and cached under RUN_DIR/selfgen/."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from forgetscale.mitigations.base import Arm, MitigationSpec, register_arm
from forgetscale.mitigations.replay import ReplayHooks

if TYPE_CHECKING:
    from forgetscale.data import Blocks
    from forgetscale.mitigations.inputs import ArmInputs
    from forgetscale.runs import RunPlan
    from forgetscale.train import RunContext


class SelfReplaySpec(MitigationSpec):
    """replay with text sampled from the base model itself: no pre-training data needed."""

    name: Literal["self_replay"] = "self_replay"
    p: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of each step's sequences replaced by sampled text")
    samples: int = Field(256, ge=1, description="sequences sampled from the base model (once per sweep)")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature (1: the model's own distribution)")


class SelfReplay(Arm):
    def pool(self, spec: SelfReplaySpec, inputs: ArmInputs) -> Blocks:
        return inputs.generated(spec.samples, spec.temperature)

    def prepare(self, spec: SelfReplaySpec, inputs: ArmInputs) -> None:
        self.pool(spec, inputs)

    def hooks(self, spec: SelfReplaySpec, ctx: RunContext, model: Any, plan: RunPlan) -> ReplayHooks:
        return ReplayHooks(self.pool(spec, ctx.arm_inputs), spec.p, plan.seed)


register_arm(SelfReplaySpec, SelfReplay())
