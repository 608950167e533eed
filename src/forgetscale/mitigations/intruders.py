"""intruders: after training, PEFT's `reduce_intruder_dimension` on the control run's LoRA adapter; a curve
from one run, like `scale`.

peft (peft.tuners.lora.intruders, after Shuttleworth et al., arXiv 2410.21228) takes the SVD of W + dW per
LoRA layer, calls a direction among its top_k singular directions an *intruder* when its largest |cosine|
with the base W's singular directions is below threshold_epsilon, keeps mitigation_lambda of each intruder
(W + dW + (lambda - 1) * intruder; lambda = 1 changes nothing, 0 removes it) and refits a rank-r adapter to
the result. `scale` shrinks the whole change; this removes only its new directions. peft's own function
does the work (no re-implementation): it writes a second adapter, whose weights are copied into the run's
adapter so the derived run is stored and evaluated like any other.

Nothing is trained: each lambda is a derived run measured from the control run's saved adapters (see
mitigations/scale.py, whose derive loop this arm reuses). LoRA only (peft's function supports LoRA; dora's
magnitude vector is not part of the delta it decomposes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from forgetscale.methods import MethodSpec
from forgetscale.mitigations.base import MitigationSpec, register_arm
from forgetscale.mitigations.scale import Scale, unit_grid

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

ADAPTER = "default"  # the adapter forgetscale attaches (peft's default name)
SCRATCH = "intruder_reduced"  # where peft writes the reduced adapter before it is copied back


class IntrudersSpec(MitigationSpec):
    """After training, PEFT's reduce_intruder_dimension on the control's LoRA adapter; runs derived, never trained."""

    name: Literal["intruders"] = "intruders"
    mitigation_lambda: list[float] = Field(
        [0.0, 0.5, 0.75], description="share of each intruder direction kept, each a derived run (peft's "
                                      "mitigation_lambda: 1 is the control run, 0 removes the intruders)")
    top_k: int = Field(10, ge=1, description="singular directions of W + dW checked for intruders, per layer "
                                             "(peft's top_k)")
    threshold_epsilon: float = Field(0.5, gt=0.0, le=1.0, description="a direction whose largest absolute cosine "
                                     "with the base's singular directions is below this is an intruder (peft's)")

    derived: ClassVar[bool] = True
    grid_key: ClassVar[str | None] = "mitigation_lambda"
    curve_ends: ClassVar[dict[float, str]] = {1.0: "control"}

    @field_validator("mitigation_lambda")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        return unit_grid(v)

    def check(self, method: MethodSpec) -> str | None:
        if method.name != "lora":
            return (f"peft's reduce_intruder_dimension works on LoRA adapters only; method '{method.name}' "
                    "(dora's magnitude vector is outside the delta it decomposes); use lora")
        return None


def reduce(model: torch.nn.Module, spec: IntrudersSpec, value: float) -> None:
    """peft's reduce_intruder_dimension on the model's adapter, written back into that adapter (the scratch
    adapter peft adds is deleted, the original one is active again)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    reduce_intruder_dimension(model, old_adapter_name=ADAPTER, new_adapter_name=SCRATCH, top_k=spec.top_k,
                              threshold_epsilon=spec.threshold_epsilon, mitigation_lambda=value, logging_sink=None)
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
            layer.lora_A[ADAPTER].weight.copy_(layer.lora_A[SCRATCH].weight)
            layer.lora_B[ADAPTER].weight.copy_(layer.lora_B[SCRATCH].weight)
    model.set_adapter(ADAPTER)
    model.delete_adapter(SCRATCH)


class Intruders(Scale):
    """scale's derive loop (control weights at each kept step, measured), with peft's reduction as the change."""

    def changer(self, spec: IntrudersSpec, model: torch.nn.Module, value: Any) -> Callable[[], None]:
        return lambda: reduce(model, spec, float(value))


register_arm(IntrudersSpec, Intruders())
