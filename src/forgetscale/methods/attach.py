"""The torch half of the methods: `attach` makes exactly a method's parameters trainable.

One attach function per method in ATTACH, keyed by the names of the specs in forgetscale/config/methods.py;
tests/test_contracts.py checks both registries name the same methods. The sweep records P as the
count of the parameters `attach` left trainable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from forgetscale.config.methods import IA3Spec, LoraSpec, MethodSpec, TopLayersSpec
from forgetscale.errors import ConfigError
from forgetscale.registry import Registry

AttachFn = Callable[[torch.nn.Module, Any, "int | None"], torch.nn.Module]


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


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
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
    layers = decoder_layers(model)
    if spec.k > len(layers):
        raise ConfigError(f"method.k: must be <= the model's {len(layers)} layers; got {spec.k}")
    model.requires_grad_(False)
    for layer in layers[len(layers) - spec.k:]:
        layer.requires_grad_(True)
    return model


def _attach_full(model: torch.nn.Module, spec: MethodSpec, rank: int | None) -> torch.nn.Module:
    model.requires_grad_(True)
    return model


ATTACH: Registry[AttachFn] = Registry("method")
ATTACH.add("lora", _attach_lora)
ATTACH.add("dora", lambda m, s, r: _attach_lora(m, s, r, dora=True))
ATTACH.add("ia3", _attach_ia3)
ATTACH.add("top_layers", _attach_top_layers)
ATTACH.add("full", _attach_full)


def attach(model: torch.nn.Module, spec: MethodSpec, rank: int | None) -> torch.nn.Module:
    """Make exactly the method's parameters trainable (after freezing everything)."""
    model.requires_grad_(False)
    return ATTACH.get(spec.name)(model, spec, rank)


def trainable_parameters(model: torch.nn.Module) -> int:
    """P: the exact count of trainable parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def upcast_trainable(model: torch.nn.Module) -> None:
    """Keep every trainable parameter in fp32 (the optimizer's updates would round away in bf16); the frozen
    base may stay in half precision, and autocast (forgetscale.models.compute_dtype) lets the two meet."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def skip_lora_input_casts(model: torch.nn.Module) -> int:
    """Under autocast, stop peft casting each LoRA layer's input to the adapter's fp32 weight dtype: autocast
    casts it straight back to the compute dtype at the adapter's matmul, so the two [tokens x width] copies
    per layer per pass (and their backward) change nothing but the time (the output is bit-identical). Only
    plain LoRA layers (DoRA's variant does its own arithmetic on the input); returns how many were changed.
    Call only when every forward pass runs under autocast (forgetscale.models.compute_dtype is not None)."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        linear = isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), torch.nn.Linear)
        if linear and not getattr(module, "lora_variant", None):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed
