"""What every method shares: the spec base class and the one registration that ties a spec to its attach
function (METHODS for config, ATTACH for training), so neither half can exist without the other.

Torch-free: config validates `method:` entries with these specs without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ConfigDict, Field

from forgetscale.errors import ConfigError
from forgetscale.registry import Registry
from forgetscale.schema import Strict

if TYPE_CHECKING:
    import torch

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class MethodSpec(Strict):
    """Settings common to every method."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str
    lr: float | None = Field(None, gt=0.0, description="learning rate for this method (default: train.lr)")

    # True: the base model's predictions are the same weights with the adapter disabled (peft's
    # disable_adapter); False: the method changes the base weights in place (top_layers, full)
    uses_adapter: ClassVar[bool] = True
    # True: at step 0 the attached model computes bit for bit what the base computes (LoRA: B = 0 adds an exact
    # zero), so every such run of a sweep has the same step-0 row and it is measured once. DoRA is the base only
    # in exact arithmetic (W * m / ||W||); IA3 and the in-place methods change dtypes or layouts; all measure.
    starts_as_base: ClassVar[bool] = False

    def run_ranks(self) -> list[int | None]:
        """The ranks this spec expands to (None for methods without a rank)."""
        return [None]

    def identity(self) -> dict[str, Any]:
        """The settings that define one run of this method (the rank list is not one: each rank is a run)."""
        return self.model_dump(mode="json", exclude={"ranks"})

    def label(self, rank: int | None) -> str:
        return self.name if rank is None else f"{self.name}-r{rank}"


# (model, spec, rank) -> the model with exactly the method's parameters trainable; imports torch/peft itself
AttachFn = Callable[["torch.nn.Module", Any, "int | None"], "torch.nn.Module"]

METHODS: Registry[type[MethodSpec]] = Registry("method")
ATTACH: Registry[AttachFn] = Registry("method")


def register_method(spec: type[MethodSpec], attach: AttachFn) -> type[MethodSpec]:
    """Register a method: its spec (what config validates) and its attach function (what training calls),
    under the spec's `name` default, in one call."""
    name = spec.model_fields["name"].default
    METHODS.add(name, spec)
    ATTACH.add(name, attach)
    return spec


def adapter_methods() -> list[str]:
    """Methods whose base predictions come from disabling the adapter (what the kl arm needs)."""
    return [n for n in METHODS.names() if METHODS.get(n).uses_adapter]


def check_modules(model: torch.nn.Module, names: list[str], key: str) -> None:
    """Fail with the config key when a listed module name is not in the model."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in names if m not in present]
    if missing:
        raise ConfigError(f"method.{key}: module '{missing[0]}' not found in this model")
