"""Fine-tuning methods: one small config class and one `attach` per method, in a registry.

Adding a method is one spec class + one attach function + `METHODS.add(...)`, plus a row in
tests/test_contracts.py. `attach` returns the model to train with exactly the method's
parameters trainable; the sweep records P as the count of those parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from forgetscale.errors import ConfigError
from forgetscale.registry import Registry

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class MethodSpec(BaseModel):
    """Settings common to every method."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    lr: float | None = Field(None, gt=0.0, description="learning rate for this method (default: train.lr)")

    def variants(self) -> list[int | None]:
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
    target_modules: list[str] = Field(list(ALL_LINEAR), description="module names that get adapters")
    scaling: Literal["rslora", "standard"] = Field("rslora", description="rslora: alpha/sqrt(r) (the paper's); standard: alpha/r")
    alpha: float = Field(16.0, gt=0.0, description="LoRA alpha")
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

    def variants(self) -> list[int | None]:
        return list(self.ranks)


class DoraSpec(LoraSpec):
    name: Literal["dora"] = "dora"  # type: ignore[assignment]


class IA3Spec(MethodSpec):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] = Field(["k_proj", "v_proj", "down_proj"], description="modules whose activations are rescaled")
    feedforward_modules: list[str] = Field(["down_proj"], description="subset of target_modules scaled on their input")


class TopLayersSpec(MethodSpec):
    name: Literal["top_layers"] = "top_layers"
    k: int = Field(3, ge=1, description="train every weight of the last k decoder layers")


class FullSpec(MethodSpec):
    name: Literal["full"] = "full"


@dataclass(frozen=True)
class Method:
    spec: type[MethodSpec]
    attach: Callable[[torch.nn.Module, Any, int | None], torch.nn.Module]
    uses_adapter: bool  # True: base predictions available via disable_adapter(); False: weights change in place


METHODS: Registry[Method] = Registry("method")


def _num_layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def _layer_indices(spec: LoraSpec, model: torch.nn.Module) -> list[int] | None:
    n = _num_layers(model)
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


def _check_modules(model: torch.nn.Module, names: list[str], key: str) -> None:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in names if m not in present]
    if missing:
        raise ConfigError(f"method.{key}: module '{missing[0]}' not found in this model")


def _attach_lora(model: torch.nn.Module, spec: LoraSpec, rank: int | None, *, dora: bool = False) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    _check_modules(model, spec.target_modules, "target_modules")
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


def _attach_ia3(model: torch.nn.Module, spec: IA3Spec, rank: int | None) -> torch.nn.Module:
    from peft import IA3Config, get_peft_model

    _check_modules(model, spec.target_modules, "target_modules")
    if not set(spec.feedforward_modules) <= set(spec.target_modules):
        raise ConfigError("method.feedforward_modules: must be a subset of method.target_modules")
    config = IA3Config(
        target_modules=list(spec.target_modules),
        feedforward_modules=list(spec.feedforward_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ConfigError("method.name: top_layers cannot find the decoder layers of this model architecture")


def _attach_top_layers(model: torch.nn.Module, spec: TopLayersSpec, rank: int | None) -> torch.nn.Module:
    layers = _decoder_layers(model)
    if spec.k > len(layers):
        raise ConfigError(f"method.k: must be <= the model's {len(layers)} layers; got {spec.k}")
    model.requires_grad_(False)
    for layer in layers[len(layers) - spec.k:]:
        layer.requires_grad_(True)
    return model


def _attach_full(model: torch.nn.Module, spec: FullSpec, rank: int | None) -> torch.nn.Module:
    model.requires_grad_(True)
    return model


METHODS.add("lora", Method(LoraSpec, _attach_lora, uses_adapter=True))
METHODS.add("dora", Method(DoraSpec, lambda m, s, r: _attach_lora(m, s, r, dora=True), uses_adapter=True))
METHODS.add("ia3", Method(IA3Spec, _attach_ia3, uses_adapter=True))
METHODS.add("top_layers", Method(TopLayersSpec, _attach_top_layers, uses_adapter=False))
METHODS.add("full", Method(FullSpec, _attach_full, uses_adapter=False))


def attach(model: torch.nn.Module, spec: MethodSpec, rank: int | None) -> torch.nn.Module:
    """Make exactly the method's parameters trainable (after freezing everything)."""
    model.requires_grad_(False)
    return METHODS.get(spec.name).attach(model, spec, rank)


def trainable_parameters(model: torch.nn.Module) -> int:
    """P: the exact count of trainable parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
