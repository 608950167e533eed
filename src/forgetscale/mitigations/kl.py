"""kl: add lambda * KL between the base and the tuned model to every update step's loss.

The base predictions come from the same weights with the adapter disabled (peft's disable_adapter), in
the same step, so no second model is held in memory; methods without an adapter cannot do this and are
refused. Where the KL is taken (`source`): general text or text sampled from the base (`rows` sequences
chosen per step by (seed, step), every predicted position), or the fine-tuning tokens themselves
("anchored SFT", as LLaMA-Factory ships it: the first `rows` sequences of the step's own batch, at the
positions that carry the fine-tuning loss). `direction`: forward KL(p_base || p_tuned) (the forgetting
metric's own direction, mass-covering) or reverse KL(p_tuned || p_base) (mode-seeking); both exact over the
vocabulary, no sampled estimator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

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
    """lambda * KL between base and tuned (general, self-generated or fine-tuning text) added to every update step."""

    name: Literal["kl"] = "kl"
    lam: float = Field(1.0, gt=0.0, description="lambda: weight of the KL term against the fine-tuning loss")
    rows: int = Field(1, ge=1, description="sequences per update step the KL is taken on (source finetune: the "
                                           "first rows of the step's own batch)")
    source: Literal["general", "self", "finetune"] = Field(
        "general", description="general text, text sampled from the base, or the fine-tuning tokens themselves "
                               "(anchored SFT: the positions that carry the fine-tuning loss)")
    direction: Literal["forward", "reverse"] = Field(
        "forward", description="forward: KL(p_base ‖ p_tuned), the forgetting metric's direction (mass-covering); "
                               "reverse: KL(p_tuned ‖ p_base) (mode-seeking)")
    dataset: str | None = Field(None, description="general-text source (default: forgetting.dataset minus its "
                                                  "forgetting documents)")
    split: str = Field("train", description="hub split of the general-text source")
    samples: int = Field(256, ge=1, description="source 'self': sequences sampled from the base model")

    def identity(self, value: Any = None) -> dict[str, Any]:
        """As MitigationSpec's, without `direction` at its default, so kl runs stored before the key existed
        keep their run_id (a sweep adding arms reuses them)."""
        data = super().identity(value)
        if data.get("direction") == "forward":
            del data["direction"]
        return data

    def check(self, method: MethodSpec) -> str | None:
        if not METHODS.get(method.name).uses_adapter:
            return (f"needs the base predictions from the same weights with the adapter disabled; method "
                    f"'{method.name}' has no adapter (use one of: {', '.join(adapter_methods())})")
        return None


def kl_to_base(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
               direction: str = "forward") -> torch.Tensor:
    """Mean over predicted positions (with `labels`: those that carry a label) of KL(p_base || p_tuned)
    (forward) or KL(p_tuned || p_base) (reverse); gradients flow through the tuned side only."""
    import torch

    from forgetscale.data.blocks import IGNORE

    with torch.no_grad(), model.disable_adapter():
        base = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    tuned = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    if direction == "forward":
        per_token = (base.exp() * (base - tuned)).sum(-1)
    else:
        per_token = (tuned.exp() * (tuned - base)).sum(-1)
    keep = mask[:, 1:].bool() if labels is None else (labels[:, 1:] != IGNORE) & mask[:, 1:].bool()
    if not keep.any():  # rows without a loss position (a long prompt): no term, not a NaN
        return per_token.sum() * 0.0
    return per_token[keep].mean()


class KLHooks(ArmHooks):
    """The KL on `rows` sequences of a pool (general or self-generated text), chosen per step by (seed, step)."""

    def __init__(self, pool: Blocks, lam: float, rows: int, seed: int, device: torch.device,
                 direction: str = "forward"):
        self.pool, self.lam, self.rows, self.seed, self.device = pool, lam, rows, seed + 2 * POOL_SEED, device
        self.direction = direction

    def penalty(self, model: torch.nn.Module, step: int) -> torch.Tensor:
        part = self.pool.select(pool_rows(step * self.rows, self.rows, len(self.pool), self.seed))
        return self.lam * kl_to_base(model, part.input_ids.to(self.device), part.attention_mask.to(self.device),
                                     direction=self.direction)


class AnchorHooks(ArmHooks):
    """Anchored SFT: the KL on the first `rows` sequences of the step's own batch, at its loss positions."""

    def __init__(self, lam: float, rows: int, device: torch.device, direction: str = "forward"):
        self.lam, self.rows, self.device, self.direction = lam, rows, device, direction
        self.batch: Blocks | None = None

    def mix(self, step: int, blocks: Blocks) -> Blocks:
        self.batch = blocks.select(slice(0, self.rows))  # seen, not changed: the penalty reads it
        return blocks

    def penalty(self, model: torch.nn.Module, step: int) -> torch.Tensor:
        part = self.batch
        if part is None:
            raise RuntimeError("kl (source finetune): penalty before mix; the training loop calls mix first")
        return self.lam * kl_to_base(model, part.input_ids.to(self.device), part.attention_mask.to(self.device),
                                     part.labels.to(self.device), self.direction)


class KL(Arm):
    def pool(self, spec: KLSpec, inputs: ArmInputs) -> Blocks:
        return inputs.general(spec.dataset, spec.split) if spec.source == "general" else inputs.generated(spec.samples, 1.0)

    def prepare(self, spec: KLSpec, inputs: ArmInputs) -> None:
        if spec.source != "finetune":
            self.pool(spec, inputs)

    def hooks(self, spec: KLSpec, ctx: RunContext, model: torch.nn.Module, plan: RunPlan) -> KLHooks | AnchorHooks:
        if spec.source == "finetune":
            return AnchorHooks(spec.lam, spec.rows, ctx.device, spec.direction)
        return KLHooks(self.pool(spec, ctx.arm_inputs), spec.lam, spec.rows, plan.seed, ctx.device, spec.direction)


register_arm(KLSpec, KL())
