"""The notebook API: a base model's predictions on a forgetting set built once (`ForgettingMeter.build`),
then any tuned model measured against them (`meter.measure(model)`), with 95% intervals over blocks.

    from forgetscale.metric import ForgettingMeter
    meter = ForgettingMeter.build(base_model, tokenizer, forgetting="embedded:wikipedia", max_tokens=4096)
    result = meter.measure(tuned_model)       # ForgettingResult: kl, ce, ce_hard, entropy, intervals
    print(result.kl, result.kl_ci)

The numbers are `score`'s (same batches, same arithmetic, same sums), so a measured model gives exactly
what a sweep stores for the same weights; the intervals come from the per-block means (a t interval over
blocks, token-weighted when blocks carry different numbers of loss tokens). The Trainer callback and
`forgetscale measure` measure through a meter.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgetscale.data import Blocks, build_forgetting_blocks
from forgetscale.data.blocks import IGNORE
from forgetscale.errors import ConfigError
from forgetscale.metric.head import LogitsWorkspace
from forgetscale.metric.references import MemoryReference, memory_reference
from forgetscale.metric.shard import Shard, agree, digest, gather_rows, process_group, split
from forgetscale.metric.sums import score

Interval = tuple[float, float]


def block_se(values: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """(token mean, its standard error) from per-block sums: the ratio estimator over blocks (blocks may hold
    different numbers of tokens); the error is NaN with fewer than two blocks."""
    b = len(counts)
    sums, n = values.double(), counts.double()
    mean = float(sums.sum() / n.sum())
    if b < 2:
        return mean, math.nan
    resid = sums - mean * n
    return mean, math.sqrt(float((resid**2).sum()) / (b * (b - 1))) / float(n.mean())


def block_interval(values: torch.Tensor, counts: torch.Tensor, level: float = 0.95) -> Interval:
    """95% interval of a token mean from per-block sums: a t interval over blocks (see block_se); NaN with
    fewer than two blocks."""
    from scipy import stats

    b = len(counts)
    if b < 2:
        return (math.nan, math.nan)
    mean, se = block_se(values, counts)
    q = float(stats.t.ppf(0.5 + level / 2, b - 1))
    return (mean - q * se, mean + q * se)


@dataclass
class ForgettingResult:
    """One model's forgetting against a base reference (nats per token) and 95% intervals over blocks."""

    kl: float
    ce: float
    ce_hard: float
    entropy: float
    nll: float  # mean NLL of the forgetting text itself
    tokens: int
    blocks: int
    kl_ci: Interval = (math.nan, math.nan)
    ce_ci: Interval = (math.nan, math.nan)
    ce_hard_ci: Interval = (math.nan, math.nan)
    ft_loss: float | None = None  # held-out fine-tuning NLL, when the reference holds held-out data
    ft_kl: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = ("tokens", "nll", "kl", "ce", "ce_hard", "neg_entropy")  # the per-block sums a measurement adds up


def _block_sums(blocks: Blocks, per_token: dict[str, torch.Tensor], neg_entropy: torch.Tensor) -> torch.Tensor:
    """[blocks, COLUMNS] float64: each block's loss-token count and its sums of every per-token number."""
    per_block = (blocks.labels[:, 1:] != IGNORE).sum(1)
    index = torch.repeat_interleave(torch.arange(len(per_block)), per_block)
    table = torch.zeros((len(per_block), len(COLUMNS)), dtype=torch.float64)
    table[:, 0] = per_block.double()
    for column, values in enumerate((per_token["nll"], per_token["kl"], per_token["ce"], per_token["ce_hard"],
                                     neg_entropy), start=1):
        table[:, column].index_add_(0, index, values.double().cpu())
    return table


def _result(model: torch.nn.Module, blocks: Blocks, batch_size: int, device: torch.device,
            dtype: torch.dtype | None, ref: MemoryReference, workspace: LogitsWorkspace | None = None,
            shard: Shard | None = None) -> ForgettingResult:
    """`score`'s means plus per-block intervals from its per-token sums. With a shard (several processes) the
    means are the gathered per-block table's: every rank's blocks, in the one-process order."""
    out = score(model, blocks, batch_size, device, dtype, ref, workspace, per_token=True,
                passes=shard.passes if shard else None)
    table = _block_sums(blocks, out["per_token"], ref.neg_entropy)
    if shard is not None:
        table = gather_rows(table, shard)
        total = table.sum(0)
        n = float(total[0])
        out.update(tokens=int(n), nll=float(total[1]) / n, kl=float(total[2]) / n, ce=float(total[3]) / n,
                   ce_hard=float(total[4]) / n, entropy=-float(total[5]) / n)
    table = table[table[:, 0] > 0]
    counts = table[:, 0]
    return ForgettingResult(
        kl=out["kl"], ce=out["ce"], ce_hard=out["ce_hard"], entropy=out["entropy"], nll=out["nll"],
        tokens=out["tokens"], blocks=len(counts), kl_ci=block_interval(table[:, 2], counts),
        ce_ci=block_interval(table[:, 3], counts), ce_hard_ci=block_interval(table[:, 4], counts),
    )


def _heldout(model: torch.nn.Module, blocks: Blocks, batch_size: int, device: torch.device, dtype: torch.dtype | None,
             ref: MemoryReference, workspace: LogitsWorkspace, shard: Shard | None) -> tuple[float, float]:
    """(held-out NLL, held-out KL): `score`'s, or the gathered sums with a shard."""
    if shard is None:
        held = score(model, blocks, batch_size, device, dtype, ref, workspace)
        return held["nll"], held["kl"]
    held = score(model, blocks, batch_size, device, dtype, ref, workspace, per_token=True, passes=shard.passes)
    total = gather_rows(_block_sums(blocks, held["per_token"], ref.neg_entropy), shard).sum(0)
    return float(total[1] / total[0]), float(total[2] / total[0])


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode (no dropout), its previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class ForgettingMeter:
    """The base model's predictions on a forgetting set (and optionally a held-out fine-tuning set), built
    once; `measure(model)` then costs one forward pass of the tuned model over the same tokens."""

    blocks: Blocks
    ref: MemoryReference
    batch_size: int = 8
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    heldout: Blocks | None = None
    heldout_ref: MemoryReference | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    shard: Shard | None = None  # several processes: this rank's share of `blocks` (forgetscale.metric.shard)
    heldout_shard: Shard | None = None
    # measuring buffers reused model after model (CPU: no page faults per pass); pickles empty
    workspace: LogitsWorkspace = field(default_factory=LogitsWorkspace, repr=False, compare=False)

    @classmethod
    def build(cls, model: torch.nn.Module, tokenizer: Any = None, *, forgetting: Any = "embedded:wikipedia",
              max_tokens: int | None = None, block_length: int = 128, batch_size: int = 8,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None,
              heldout: Blocks | None = None, cache_dir: str | Path | None = None,
              distributed: bool | str = "auto", agreed: dict[str, Any] | None = None) -> ForgettingMeter:
        """`forgetting`: a dataset spec ('embedded:wikipedia', 'hf:wikitext', a file), a mapping of
        `forgetting.*` keys, a ForgettingConfig, or ready Blocks. A PEFT model is measured with its adapter
        disabled (peft's disable_adapter), so the reference is the base even after attaching.

        Inside an initialised torch.distributed process group of several processes (`distributed="auto"`;
        False: measure everything here), every rank must call build and then measure together: the blocks are
        split across ranks (forgetscale.metric.shard), each rank keeps only its share of the reference, and
        every rank gets the same numbers. The ranks first check that they agree on the settings, the blocks
        and `agreed` (anything else the caller needs equal on every rank); if not, every rank raises."""
        from forgetscale.config import ForgettingConfig, validate_section
        from forgetscale.models import cache_root

        if isinstance(forgetting, Blocks):
            blocks, settings = forgetting, {"blocks": len(forgetting), "block_length": forgetting.input_ids.shape[1]}
        else:
            if isinstance(forgetting, str):
                forgetting = {"dataset": forgetting}
            if isinstance(forgetting, dict):
                data = dict(forgetting)
                if max_tokens is not None:
                    data["max_tokens"] = max_tokens
                forgetting = validate_section(ForgettingConfig, data, "forgetting")
            if tokenizer is None:
                raise ConfigError("ForgettingMeter.build: pass the tokenizer to build the forgetting blocks")
            length = forgetting.block_length or block_length
            blocks = build_forgetting_blocks(forgetting, tokenizer, length,
                                             cache_root(str(cache_dir) if cache_dir else None) / "data")
            settings = {**forgetting.model_dump(mode="json"), "block_length": length}
        device = torch.device(device) if device is not None else model_device(model)
        shard = held_shard = None
        rank, world, group = process_group(distributed)
        if world > 1:
            agree({"settings": settings, "agreed": agreed, "batch_size": batch_size, "dtype": str(dtype),
                   "blocks": [len(blocks), digest([blocks.input_ids, blocks.labels, blocks.attention_mask])],
                   "heldout": None if heldout is None else
                   [len(heldout), digest([heldout.input_ids, heldout.labels, heldout.attention_mask])]}, group, world)
            shard = split(len(blocks), world, rank, batch_size, group)
            blocks = blocks.select(shard.blocks)
            if heldout is not None:
                held_shard = split(len(heldout), world, rank, batch_size, group)
                heldout = heldout.select(held_shard.blocks)
        with evaluating(model), (model.disable_adapter() if is_peft(model) else contextlib.nullcontext()):
            ref = memory_reference(model, blocks, batch_size, device, dtype, shard.passes if shard else None)
            held_ref = None if heldout is None else memory_reference(
                model, heldout, batch_size, device, dtype, held_shard.passes if held_shard else None)
        return cls(blocks, ref, batch_size, device, dtype, heldout, held_ref, settings, shard, held_shard)

    def measure(self, model: torch.nn.Module) -> ForgettingResult:
        """Forgetting of `model` (same tokenizer as the base) against this reference; with a shard, every rank
        calls it and gets the same result."""
        device = self.device or model_device(model)
        space = self.workspace.on(device)
        with evaluating(model):
            result = _result(model, self.blocks, self.batch_size, device, self.dtype, self.ref, space, self.shard)
            if self.heldout is not None and self.heldout_ref is not None:
                result.ft_loss, result.ft_kl = _heldout(model, self.heldout, self.batch_size, device, self.dtype,
                                                        self.heldout_ref, space, self.heldout_shard)
        return result
