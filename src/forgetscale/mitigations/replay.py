"""replay: a fraction p of every update step's sequences is general text instead of fine-tuning data.

The batch keeps its size (the step costs the same), so the run sees fewer fine-tuning tokens per
step; the comparison at matched fine-tuning loss accounts for that. Which rows are replaced and which
general blocks replace them are pure functions of (seed, step), so a resumed run replays the same text.
The general text is disjoint from the forgetting set (see inputs.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from forgetscale.mitigations.base import Arm, ArmHooks, MitigationSpec, register_arm

if TYPE_CHECKING:
    import torch

    from forgetscale.data import Blocks
    from forgetscale.mitigations.inputs import ArmInputs
    from forgetscale.runs import RunPlan
    from forgetscale.train import RunContext

POOL_SEED = 7_919  # added to the run's seed: the pool order is not the fine-tuning data order


class ReplaySpec(MitigationSpec):
    """A fraction p of every update step's sequences is general text instead of fine-tuning data."""

    name: Literal["replay"] = "replay"
    p: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of each step's sequences replaced by general text")
    dataset: str | None = Field(None, description="general-text source (default: forgetting.dataset, with the "
                                                  "forgetting set's documents removed)")
    split: str = Field("train", description="hub split of the general-text source")


def replay_count(step: int, rows: int, p: float) -> int:
    """General rows in step `step`'s batch of `rows`: round(p * rows * (step + 1)) - round(p * rows * step),
    so the running total is always the nearest integer to p * rows * steps."""
    return round(p * rows * (step + 1)) - round(p * rows * step)


def pool_rows(first: int, count: int, pool_size: int, seed: int) -> torch.Tensor:
    """Positions first .. first+count-1 of an endless stream of seeded epoch permutations of the pool."""
    import torch

    from forgetscale.data import batch_indices

    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([batch_indices(i, 1, pool_size, seed) for i in range(first, first + count)])


class ReplayHooks(ArmHooks):
    def __init__(self, pool: Blocks, p: float, seed: int):
        self.pool, self.p, self.seed = pool, p, seed + POOL_SEED

    def mix(self, step: int, batch: Blocks) -> Blocks:
        import torch

        from forgetscale.data import Blocks

        rows = len(batch)
        k = replay_count(step, rows, self.p)
        if k == 0:
            return batch
        general = self.pool.select(pool_rows(round(self.p * rows * step), k, len(self.pool), self.seed))
        keep = batch.select(slice(0, rows - k))
        return Blocks(*(torch.cat([a, b]) for a, b in ((keep.input_ids, general.input_ids),
                                                        (keep.labels, general.labels),
                                                        (keep.attention_mask, general.attention_mask))))


class Replay(Arm):
    def pool(self, spec: ReplaySpec, inputs: ArmInputs) -> Blocks:
        return inputs.general(spec.dataset, spec.split)

    def prepare(self, spec: ReplaySpec, inputs: ArmInputs) -> None:
        self.pool(spec, inputs)

    def hooks(self, spec: ReplaySpec, ctx: RunContext, model: torch.nn.Module, plan: RunPlan) -> ReplayHooks:
        return ReplayHooks(self.pool(spec, ctx.arm_inputs), spec.p, plan.seed)


register_arm(ReplaySpec, Replay())
