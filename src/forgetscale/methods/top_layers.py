"""top_layers: every weight of the last k decoder layers, changed in place (no adapter)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from forgetscale.errors import ConfigError
from forgetscale.methods.attach import decoder_layers
from forgetscale.methods.base import MethodSpec, register_method

if TYPE_CHECKING:
    import torch


class TopLayersSpec(MethodSpec):
    name: Literal["top_layers"] = "top_layers"
    k: int = Field(3, ge=1, description="train every weight of the last k decoder layers")
    uses_adapter: ClassVar[bool] = False


def _attach_top_layers(model: torch.nn.Module, spec: TopLayersSpec, rank: int | None) -> torch.nn.Module:
    layers = decoder_layers(model)
    if spec.k > len(layers):
        raise ConfigError(f"method.k: must be <= the model's {len(layers)} layers; got {spec.k}")
    model.requires_grad_(False)
    for layer in layers[len(layers) - spec.k:]:
        layer.requires_grad_(True)
    return model


register_method(TopLayersSpec, attach=_attach_top_layers)
