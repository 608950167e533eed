"""What training asks of any method: `attach` (the method's own attach function, by its spec's name), the
count P of what it left trainable, and the precision rules for the trainable parameters.

Each method's attach function is registered with its spec in the method's own module (methods/lora.py,
...); tests/test_contracts.py runs every registered method. Torch is imported only where it is used, so
the methods package imports without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from forgetscale.errors import ConfigError
from forgetscale.methods.base import ATTACH, MethodSpec

if TYPE_CHECKING:
    import torch

__all__ = ["ATTACH", "attach", "decoder_layers", "skip_lora_input_casts", "trainable_parameters", "upcast_trainable"]


def attach(model: torch.nn.Module, spec: MethodSpec, rank: int | None) -> torch.nn.Module:
    """Make exactly the method's parameters trainable (after freezing everything)."""
    model.requires_grad_(False)
    return ATTACH.get(spec.name)(model, spec, rank)


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
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def skip_lora_input_casts(model: torch.nn.Module) -> int:
    """Under autocast, stop peft casting each LoRA layer's input to the adapter's fp32 weight dtype: autocast
    casts it straight back to the compute dtype at the adapter's matmul, so the two [tokens x width] copies
    per layer per pass (and their backward) change nothing but the time (the output is bit-identical). Only
    plain LoRA layers (DoRA's variant does its own arithmetic on the input); returns how many were changed.
    Call only when every forward pass runs under autocast (forgetscale.models.compute_dtype is not None)."""
    import torch
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        linear = isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), torch.nn.Linear)
        if linear and not getattr(module, "lora_variant", None):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed
