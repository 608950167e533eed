"""The forgetting blocks split across the processes of a distributed job (torch.distributed: accelerate,
torchrun, a Trainer's own process group), and the per-block sums put back together.

Why: under data parallelism every process holds the whole model (DDP) or a shard of it (FSDP, ZeRO-3).
Measuring the whole forgetting set on every rank repeats the work world-size times, and a rank alone cannot
run a sharded model. Here each rank measures a contiguous share of the blocks against its own share of the
base reference (memory / world size); the per-block sums (tokens, NLL, KL, CE, hard CE, sum p log p) are
all-gathered in rank order, so every rank holds the one-process table of per-block sums and derives the same
means and intervals from it, bit for bit on every rank.

Every rank makes the same number of forward passes (`Shard.passes`; a rank with one block fewer repeats its
last batch and drops the result), so FSDP's per-layer all-gathers pair up, and the all-gather happens after
the forward passes: no rank waits on another's forward.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from forgetscale.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """Blocks [start, stop) of `total` are this rank's; `passes` forward passes per measurement on every rank."""

    rank: int
    world: int
    start: int
    stop: int
    total: int
    passes: int
    group: Any = None

    @property
    def blocks(self) -> slice:
        return slice(self.start, self.stop)


def split(total: int, world: int, rank: int, batch_size: int, group: Any = None) -> Shard:
    """Contiguous shares, the first `total % world` ranks one block more: every block on exactly one rank, in
    order (rank 0's blocks first), so the gathered per-block table is the one-process table."""
    if world > total:
        raise ConfigError(f"forgetting: {world} processes but {total} forgetting blocks; every process needs at least "
                          "one block: raise forgetting.max_tokens or lower the block length")
    small, extra = divmod(total, world)
    start = rank * small + min(rank, extra)
    stop = start + small + (1 if rank < extra else 0)
    largest = small + (1 if extra else 0)
    return Shard(rank, world, start, stop, total, -(-largest // batch_size), group)


def process_group(distributed: bool | str = "auto") -> tuple[int, int, Any]:
    """(rank, world size, group) of the default process group when one is initialised with more than one
    process (and `distributed` is not False); (0, 1, None) otherwise."""
    if distributed is False or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0, 1, None
    world = torch.distributed.get_world_size()
    return (torch.distributed.get_rank(), world, torch.distributed.group.WORLD) if world > 1 else (0, 1, None)


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:  # in the order the caller gave: settings first
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.') or 'value'} {a!r} vs {b!r}"


def agree(what: dict[str, Any], group: Any, world: int, label: str = "forgetting") -> None:
    """One collective: every rank's `what` (its settings, its blocks' hash and count) gathered; where two ranks
    differ, every rank raises the same one-line ConfigError naming the first key that differs (no rank is
    left waiting in a later collective)."""
    mine = json.loads(json.dumps(what, default=str))
    every: list[Any] = [None] * world
    torch.distributed.all_gather_object(every, mine, group=group)
    for rank, theirs in enumerate(every):
        if theirs != every[0]:
            raise ConfigError(f"{label}: the processes hold different settings (rank 0 and rank {rank}: "
                              f"{_first_difference(every[0], theirs)}); give every process the same settings")


def digest(tensors: list[torch.Tensor]) -> str:
    """A short hash of token blocks: ranks that tokenized different text disagree in `agree`."""
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def gather_rows(rows: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Every rank's per-block rows [b_rank, k] (float64) stacked in rank order: [total, k] on every rank.
    One all-gather of small CPU tensors (k numbers per block) through all_gather_object, which any backend
    (gloo, nccl) carries."""
    every: list[Any] = [None] * shard.world
    torch.distributed.all_gather_object(every, rows.detach().cpu().double(), group=shard.group)
    table = torch.cat(every)
    if table.shape[0] != shard.total:
        raise RuntimeError(f"gathered {table.shape[0]} blocks from {shard.world} processes, expected {shard.total}")
    return table


def join_launched() -> tuple[int, int, Any]:
    """(rank, world size, group) of a process started by torchrun (WORLD_SIZE > 1 in its environment): the
    default process group initialised here if the caller has not (nccl when there is a GPU per process, its
    GPU chosen by LOCAL_RANK; gloo otherwise); (0, 1, None) for a process started alone."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return 0, 1, None
    if not torch.distributed.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        gpu = torch.cuda.is_available() and torch.cuda.device_count() > local
        if gpu:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if gpu else "gloo")
    return process_group()


def broadcast(value: Any, group: Any) -> Any:
    """Rank 0's `value` on every rank (a plan, or an error message every rank then raises)."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, group=group)
    return box[0]
