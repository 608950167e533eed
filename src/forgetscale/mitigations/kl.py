"""kl: add lambda * KL(p_base || p_tuned) on general (or self-generated) text to every update step's loss.

The base predictions come from the same weights with the adapter disabled (peft's disable_adapter), in
the same step, so no second model is held in memory; methods without an adapter cannot do this and are
refused. The KL is averaged over the positions of `rows` sequences chosen per step by (seed, step).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from forgetscale.data import Blocks
from forgetscale.methods import METHODS
from forgetscale.mitigations import MITIGATIONS, Hooks, MitigationSpec
from forgetscale.mitigations.replay import POOL_SEED, pool_rows


def kl_to_base(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over predicted positions of KL(p_base || p_tuned); gradients flow through the tuned side only."""
    with torch.no_grad(), model.disable_adapter():
        base = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    tuned = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    per_token = (base.exp() * (base - tuned)).sum(-1)
    keep = mask[:, 1:].bool()
    return per_token[keep].mean()


class KLHooks(Hooks):
    def __init__(self, pool: Blocks, lam: float, rows: int, seed: int, device: torch.device):
        self.pool, self.lam, self.rows, self.seed, self.device = pool, lam, rows, seed + 2 * POOL_SEED, device

    def penalty(self, model: torch.nn.Module, step: int) -> torch.Tensor:
        part = self.pool.select(pool_rows(step * self.rows, self.rows, len(self.pool), self.seed))
        return self.lam * kl_to_base(model, part.input_ids.to(self.device), part.attention_mask.to(self.device))


class KLSpec(MitigationSpec):
    name: Literal["kl"] = "kl"
    lam: float = Field(1.0, gt=0.0, description="lambda: weight of the KL term against the fine-tuning loss")
    rows: int = Field(1, ge=1, description="general-text sequences per update step the KL is taken on")
    source: Literal["general", "self"] = Field("general", description="general text, or text sampled from the base")
    dataset: str | None = Field(None, description="general-text source (default: forgetting.dataset minus its "
                                                  "forgetting documents)")
    split: str = Field("train", description="hub split of the general-text source")
    samples: int = Field(256, ge=1, description="source 'self': sequences sampled from the base model")

    def check(self, method: Any) -> str | None:
        if not METHODS.get(method.name).uses_adapter:
            adapters = ", ".join(n for n in METHODS.names() if METHODS.get(n).uses_adapter)
            return (f"needs the base predictions from the same weights with the adapter disabled; method "
                    f"'{method.name}' has no adapter (use one of: {adapters})")
        return None

    def pool(self, inputs: Any) -> Blocks:
        return inputs.general(self.dataset, self.split) if self.source == "general" else inputs.generated(self.samples, 1.0)

    def prepare(self, inputs: Any) -> None:
        self.pool(inputs)

    def hooks(self, ctx: Any, model: torch.nn.Module, plan: Any) -> Hooks:
        return KLHooks(self.pool(ctx.arm_inputs), self.lam, self.rows, plan.seed, ctx.device)


MITIGATIONS.add("kl", KLSpec)
