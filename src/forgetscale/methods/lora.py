"""lora and dora: low-rank adapters on the listed linear modules (peft), one run per rank.

dora is lora with peft's weight decomposition (a magnitude vector per output); it shares every setting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from forgetscale.errors import ConfigError
from forgetscale.methods.base import ALL_LINEAR, MethodSpec, check_modules, register_method

if TYPE_CHECKING:
    import torch


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


def _layer_indices(spec: LoraSpec, model: torch.nn.Module) -> list[int] | None:
    n = int(model.config.num_hidden_layers)
    if spec.layers is None:
        return None
    if isinstance(spec.layers, list):
        bad = [i for i in spec.layers if not 0 <= i < n]
        if bad:
            raise ConfigError(f"method.layers: indices must be in [0, {n - 1}] for this model; got {bad[0]}")
        return sorted(set(spec.layers))
    head, _, k = spec.layers.partition(":")
    k = int(k)
    if k > n:
        raise ConfigError(f"method.layers: {spec.layers} asks for more than the model's {n} layers")
    return list(range(k)) if head == "first" else list(range(n - k, n))


def _attach_lora(model: torch.nn.Module, spec: LoraSpec, rank: int | None, *, dora: bool = False) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    check_modules(model, spec.target_modules, "target_modules")
    config = LoraConfig(
        r=int(rank),
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        use_rslora=spec.scaling == "rslora",
        use_dora=dora,
        layers_to_transform=_layer_indices(spec, model),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _attach_dora(model: torch.nn.Module, spec: DoraSpec, rank: int | None) -> torch.nn.Module:
    return _attach_lora(model, spec, rank, dora=True)


register_method(LoraSpec, attach=_attach_lora)
register_method(DoraSpec, attach=_attach_dora)
