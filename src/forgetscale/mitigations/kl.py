"""kl: add lambda * KL(p_base || p_tuned) on general (or self-generated) text to every update step's loss.

The base predictions come from the same weights with the adapter disabled (peft's disable_adapter), in
the same step, so no second model is held in memory; methods without an adapter cannot do this and are
refused. The KL is averaged over the positions of `rows` sequences chosen per step by (seed, step).
"""

from __future__ import annotations

import torch

from forgetscale.config.mitigations import KLSpec
from forgetscale.data import Blocks
from forgetscale.mitigations.base import Arm
from forgetscale.mitigations.inputs import ArmInputs
from forgetscale.mitigations.replay import POOL_SEED, pool_rows
from forgetscale.plan import RunPlan
from forgetscale.train import NoHooks, RunContext


def kl_to_base(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over predicted positions of KL(p_base || p_tuned); gradients flow through the tuned side only."""
    with torch.no_grad(), model.disable_adapter():
        base = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    tuned = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    per_token = (base.exp() * (base - tuned)).sum(-1)
    keep = mask[:, 1:].bool()
    return per_token[keep].mean()


class KLHooks(NoHooks):
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
