"""freeze: tune only the upper layers; the first k decoder layers stay exactly as in the base model.

Applied after the method is attached and before the optimizer is built: every trainable parameter
inside the first k layers (for LoRA: their adapters, which then stay at B = 0) is frozen, so P, the
stored trainable-parameter count, drops. The paper predicts fewer parameters only slide a run along
the trade-off line; this arm tests that for the lower layers in particular.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from forgetscale.errors import ConfigError
from forgetscale.methods.attach import decoder_layers
from forgetscale.mitigations.base import Arm, ArmHooks, MitigationSpec, register_arm

if TYPE_CHECKING:
    import torch

    from forgetscale.runs import RunPlan
    from forgetscale.train import RunContext


class FreezeSpec(MitigationSpec):
    """Tune only the upper layers: the first k decoder layers stay exactly as in the base model."""

    name: Literal["freeze"] = "freeze"
    layers: int | None = Field(None, ge=1, description="how many of the lowest decoder layers stay untouched "
                                                       "(default: half of them)")


class Freeze(Arm):
    def hooks(self, spec: FreezeSpec, ctx: RunContext, model: torch.nn.Module, plan: RunPlan) -> ArmHooks:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        layers = decoder_layers(base)
        k = spec.layers if spec.layers is not None else len(layers) // 2
        if k >= len(layers):
            raise ConfigError(f"mitigation freeze.layers: must be < the model's {len(layers)} layers; got {k}")
        for layer in layers[:k]:
            layer.requires_grad_(False)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"mitigation freeze.layers: freezing {k} layers leaves method '{plan.method.name}' "
                              "nothing to train; lower it")
        return ArmHooks()


register_arm(FreezeSpec, Freeze())
