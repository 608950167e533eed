"""self_replay: replay (see replay.py) with text sampled from the base model itself instead of general
text, so no pre-training data is needed. Sampled once per sweep and cached under RUN_DIR/selfgen/."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from forgetscale.data import Blocks
from forgetscale.mitigations import MITIGATIONS, MitigationSpec
from forgetscale.mitigations.replay import ReplayHooks


class SelfReplaySpec(MitigationSpec):
    name: Literal["self_replay"] = "self_replay"
    p: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of each step's sequences replaced by sampled text")
    samples: int = Field(256, ge=1, description="sequences sampled from the base model (once per sweep)")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature (1: the model's own distribution)")

    def pool(self, inputs: Any) -> Blocks:
        return inputs.generated(self.samples, self.temperature)

    def prepare(self, inputs: Any) -> None:
        self.pool(inputs)

    def hooks(self, ctx: Any, model: Any, plan: Any) -> ReplayHooks:
        return ReplayHooks(self.pool(ctx.arm_inputs), self.p, plan.seed)


MITIGATIONS.add("self_replay", SelfReplaySpec)
