"""l2sp / ewc: penalise how far the weights move from the base, lambda * sum F * (W - W0)^2.

For LoRA the change is the adapter's product, scaling * B @ A (A alone is a random projection, so
penalising it would mean nothing); for top_layers and full it is W - W0. `l2sp` weights every entry
equally (F = 1, and the LoRA sum is taken through r x r Gram matrices, never forming B @ A); `ewc`
weights each entry by a diagonal Fisher of the base weights estimated on general text (inputs.py),
normalised to mean 1 so that lambda means the same in both. Other methods (dora, ia3) change the
weights in ways this sum does not describe and are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from forgetscale.methods import MethodSpec
from forgetscale.mitigations.base import Arm, ArmHooks, MitigationSpec, register_arm

if TYPE_CHECKING:
    import torch

    from forgetscale.mitigations.inputs import ArmInputs
    from forgetscale.runs import RunPlan
    from forgetscale.train import RunContext

L2SP_METHODS = ("lora", "top_layers", "full")
PEFT_PREFIX = "base_model.model."


class L2SPSpec(MitigationSpec):
    """lambda * sum F * (W - W0)^2: penalise how far the weights move from the base (F = 1)."""

    name: Literal["l2sp"] = "l2sp"
    lam: float = Field(0.01, gt=0.0, description="lambda: weight of sum F (W - W0)^2 against the fine-tuning loss")
    fisher: bool = Field(False, description="weight each entry by a diagonal Fisher of the base on general text")
    fisher_samples: int = Field(32, ge=1, description="general-text sequences the Fisher is estimated on")
    dataset: str | None = Field(None, description="general text for the Fisher (default: forgetting.dataset minus "
                                                  "its forgetting documents)")
    split: str = Field("train", description="hub split of that source")

    def check(self, method: MethodSpec) -> str | None:
        if method.name not in L2SP_METHODS:
            return (f"penalises the weight change B @ A (lora) or W - W0 (top_layers, full); method "
                    f"'{method.name}' changes the weights another way")
        return None


class EWCSpec(L2SPSpec):
    """l2sp with each entry weighted by a diagonal Fisher of the base weights on general text."""

    name: Literal["ewc"] = "ewc"  # type: ignore[assignment]
    fisher: bool = Field(True, description="weight each entry by a diagonal Fisher of the base on general text")


def _lora_term(layer: Any, fisher: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, float(layer.scaling["default"])
    if fisher is None:
        return lambda: s * s * ((B.T @ B) * (A @ A.T)).sum()  # ||s B A||_F^2 = s^2 tr(B^T B A A^T)
    return lambda: (fisher * (s * (B @ A)) ** 2).sum()


def _full_term(param: torch.nn.Parameter, fisher: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    start = param.detach().clone()
    if fisher is None:
        return lambda: ((param - start) ** 2).sum()
    return lambda: (fisher * (param - start) ** 2).sum()


class PenaltyHooks(ArmHooks):
    def __init__(self, terms: list[Callable[[], torch.Tensor]], lam: float):
        self.terms, self.lam = terms, lam

    def penalty(self, model: torch.nn.Module, step: int) -> torch.Tensor:
        import torch

        return self.lam * torch.stack([t() for t in self.terms]).sum()


class Penalty(Arm):
    """l2sp and ewc (ewc: the spec's fisher is on)."""

    def prepare(self, spec: L2SPSpec, inputs: ArmInputs) -> None:
        if spec.fisher:
            inputs.fisher(spec.dataset, spec.split, spec.fisher_samples)

    def hooks(self, spec: L2SPSpec, ctx: RunContext, model: torch.nn.Module, plan: RunPlan) -> PenaltyHooks:
        fisher = ctx.arm_inputs.fisher(spec.dataset, spec.split, spec.fisher_samples) if spec.fisher else {}
        device = next(model.parameters()).device
        terms = []
        if hasattr(model, "peft_config"):
            for name, module in model.named_modules():
                if hasattr(module, "lora_A") and "default" in module.lora_A:
                    f = fisher.get(name.removeprefix(PEFT_PREFIX))
                    terms.append(_lora_term(module, None if f is None else f.to(device)))
        else:
            for name, param in model.named_parameters():
                if param.requires_grad:
                    f = fisher.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
                    terms.append(_full_term(param, None if f is None else f.to(device)))
        return PenaltyHooks(terms, spec.lam)


register_arm(L2SPSpec, Penalty())
register_arm(EWCSpec, Penalty())
