"""Fine-tuning methods as config: one small frozen spec class per method, in the METHODS registry.

Torch-free, so validating a YAML file never loads torch; the torch half (making exactly the method's
parameters trainable) is methods/attach.py, keyed by the same names.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator

from forgetscale.config.sources import Strict
from forgetscale.registry import Registry

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


class LoraSpec(MethodSpec):
    name: Literal["lora"] = "lora"
    ranks: list[int] = Field([8], description="adapter ranks; one run per rank")
    starts_as_base: ClassVar[bool] = True
    target_modules: list[str] = Field(list(ALL_LINEAR), description="module names that get adapters")
    scaling: Literal["rslora", "standard"] = Field("rslora", description="rslora: alpha/sqrt(r); standard: alpha/r")
    alpha: float = Field(16.0, gt=0.0, description="LoRA alpha (the paper's 1/sqrt(r) is rslora with alpha 1)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    layers: str | list[int] | None = Field(None, description="only these decoder layers: 'first:K', 'last:K' or a list of indices")

    @field_validator("ranks")
    @classmethod
    def _ranks_positive(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("must list at least one rank")
        bad = [r for r in v if r < 1]
        if bad:
            raise ValueError("each rank must be >= 1")
        if len(set(v)) != len(v):
            raise ValueError("ranks must be distinct")
        return v

    @field_validator("target_modules")
    @classmethod
    def _modules_nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one module name")
        return v

    @field_validator("layers")
    @classmethod
    def _layers_form(cls, v: Any) -> Any:
        if isinstance(v, str):
            head, _, k = v.partition(":")
            if head not in ("first", "last") or not k.isdigit() or int(k) < 1:
                raise ValueError("must be 'first:K', 'last:K' (K >= 1) or a list of layer indices")
        return v

    def run_ranks(self) -> list[int | None]:
        return list(self.ranks)


class DoraSpec(LoraSpec):
    name: Literal["dora"] = "dora"  # type: ignore[assignment]
    starts_as_base: ClassVar[bool] = False


class IA3Spec(MethodSpec):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] = Field(["k_proj", "v_proj", "down_proj"], description="modules whose activations are rescaled")
    feedforward_modules: list[str] = Field(["down_proj"], description="subset of target_modules scaled on their input")


class TopLayersSpec(MethodSpec):
    name: Literal["top_layers"] = "top_layers"
    k: int = Field(3, ge=1, description="train every weight of the last k decoder layers")
    uses_adapter: ClassVar[bool] = False


class FullSpec(MethodSpec):
    name: Literal["full"] = "full"
    uses_adapter: ClassVar[bool] = False


METHODS: Registry[type[MethodSpec]] = Registry("method")
for _spec in (LoraSpec, DoraSpec, IA3Spec, TopLayersSpec, FullSpec):
    METHODS.add(_spec.model_fields["name"].default, _spec)


def adapter_methods() -> list[str]:
    """Methods whose base predictions come from disabling the adapter (what the kl arm needs)."""
    return [n for n in METHODS.names() if METHODS.get(n).uses_adapter]


