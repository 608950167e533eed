"""full: every weight of the model, changed in place (no adapter)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from forgetscale.methods.base import MethodSpec, register_method

if TYPE_CHECKING:
    import torch


class FullSpec(MethodSpec):
    name: Literal["full"] = "full"
    uses_adapter: ClassVar[bool] = False


def _attach_full(model: torch.nn.Module, spec: FullSpec, rank: int | None) -> torch.nn.Module:
    model.requires_grad_(True)
    return model


register_method(FullSpec, attach=_attach_full)
