"""kl: add lambda * KL(p_base || p_tuned) on general (or self-generated) text to every update step's loss.

The base predictions come from the same weights with the adapter disabled (peft's disable_adapter), in
the same step, so no second model is held in memory; methods without an adapter cannot do this and are
refused. The KL is averaged over the positions of `rows` sequences chosen per step by (seed, step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from forgetscale.methods import METHODS, MethodSpec, adapter_methods
from forgetscale.mitigations.base import Arm, ArmHooks, MitigationSpec, register_arm
from forgetscale.mitigations.replay import POOL_SEED, pool_rows

if TYPE_CHECKING:
    import torch

    from forgetscale.data import Blocks
    from forgetscale.mitigations.inputs import ArmInputs
    from forgetscale.runs import RunPlan
    from forgetscale.train import RunContext


class KLSpec(MitigationSpec):
    """lambda * KL(p_base || p_tuned) on general (or self-generated) text added to every update step."""

    name: Literal["kl"] = "kl"
    lam: float = Field(1.0, gt=0.0, description="lambda: weight of the KL term against the fine-tuning loss")
    rows: int = Field(1, ge=1, description="general-text sequences per update step the KL is taken on")
    source: Literal["general", "self"] = Field("general", description="general text, or text sampled from the base")
    dataset: str | None = Field(None, description="general-text source (default: forgetting.dataset minus its "
                                                  "forgetting documents)")
    split: str = Field("train", description="hub split of the general-text source")
    samples: int = Field(256, ge=1, description="source 'self': sequences sampled from the base model")

    def check(self, method: MethodSpec) -> str | None:
        if not METHODS.get(method.name).uses_adapter:
            return (f"needs the base predictions from the same weights with the adapter disabled; method "
                    f"'{method.name}' has no adapter (use one of: {', '.join(adapter_methods())})")
        return None


def kl_to_base(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over predicted positions of KL(p_base || p_tuned); gradients flow through the tuned side only."""
    import torch

    with torch.no_grad(), model.disable_adapter():
        base = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    tuned = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    per_token = (base.exp() * (base - tuned)).sum(-1)
    keep = mask[:, 1:].bool()
    return per_token[keep].mean()


class KLHooks(ArmHooks):
    def __init__(self, pool: Blocks, lam: float, rows: int, seed: int, device: torch.device):
        self.pool, self.lam, self.rows, self.seed, self.device = pool, lam, rows, seed + 2 * POOL_SEED, device

    def penalty(self, model: torch.nn.Module, step: int) -> torch.Tensor:
        part = self.pool.select(pool_rows(step * self.rows, self.rows, len(self.pool), self.seed))
        return self.lam * kl_to_base(model, part.input_ids.to(self.device), part.attention_mask.to(self.device))


class KL(Arm):
    def pool(self, spec: KLSpec, inputs: ArmInputs) -> Blocks:
        return inputs.general(spec.dataset, spec.split) if spec.source == "general" else inputs.generated(spec.samples, 1.0)

    def prepare(self, spec: KLSpec, inputs: ArmInputs) -> None:
        self.pool(spec, inputs)

    def hooks(self, spec: KLSpec, ctx: RunContext, model: torch.nn.Module, plan: RunPlan) -> KLHooks:
        return KLHooks(self.pool(spec, ctx.arm_inputs), spec.lam, spec.rows, plan.seed, ctx.device)


register_arm(KLSpec, KL())
