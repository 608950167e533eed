"""ia3: learned rescaling of the listed modules' activations (peft); no rank."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from forgetscale.errors import ConfigError
from forgetscale.methods.base import MethodSpec, check_modules, register_method

if TYPE_CHECKING:
    import torch


class IA3Spec(MethodSpec):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] = Field(["k_proj", "v_proj", "down_proj"], description="modules whose activations are rescaled")
    feedforward_modules: list[str] = Field(["down_proj"], description="subset of target_modules scaled on their input")


def _attach_ia3(model: torch.nn.Module, spec: IA3Spec, rank: int | None) -> torch.nn.Module:
    from peft import IA3Config, get_peft_model

    check_modules(model, spec.target_modules, "target_modules")
    if not set(spec.feedforward_modules) <= set(spec.target_modules):
        raise ConfigError("method.feedforward_modules: must be a subset of method.target_modules")
    config = IA3Config(
        target_modules=list(spec.target_modules),
        feedforward_modules=list(spec.feedforward_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


register_method(IA3Spec, attach=_attach_ia3)
