"""The reference: where the base model's predictions on a block set live (`forgetting.reference`), built
once per sweep so that a checkpoint costs one forward pass of the tuned model and nothing more.

- memory: the fp32 probabilities in RAM, 4 bytes x vocabulary x tokens: 0.8 GB for SmolLM2 on 4,096 tokens,
  43 GB for Llama 2 on WikiText-103's test split. For sets that do not fit, the other kinds give `score`
  the same rows:

- disk: the fp32 probabilities in one file under RUN_DIR/references/, written once in batches and read
  back one batch at a time, keyed by the base model's identity and the exact token blocks, so every run
  of a sweep and every resume reads the same file and none recomputes it. Same numbers as memory, bit for
  bit; process memory is one batch (the file's pages sit in the OS page cache, not in the process).
- recompute: nothing stored but the entropy; each checkpoint re-runs the base with the adapter disabled
  (peft's disable_adapter) on the same batch: one extra forward pass per checkpoint, no memory.
- topk:K: the K largest base log-probabilities per token and the tail's total mass r. The exact H(p) is
  kept, so entropy and hard CE are exact; KL (and CE = H + KL) is that of the distributions coarsened to
  {top K, one tail bucket}, which by the chain rule is low by exactly r * KL(p_tail/r || q_tail/Q) >= 0
  (Q: the tuned model's tail mass). `measure` reports a per-checkpoint upper bound on that error,
  mean_t r_t * (log Q_t - log min_v q_t(v) - H(p_tail/r)_t), from quantities it holds (a rigorous but
  loose bound: the measured error is far below it; see README).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forgetscale.data.blocks import Blocks
from forgetscale.metric.head import LogitsWorkspace
from forgetscale.metric.sums import Reference, Rows, base_distribution, batches, expected_log_q, forward

EXACT = ("memory", "disk", "recompute")


def vocabulary(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "out_features", None):
        return int(head.out_features)
    return int(model.config.vocab_size)


def projected_bytes(model: torch.nn.Module, *block_sets: Blocks) -> int:
    """What the in-memory reference of these block sets would take: 4 bytes x vocabulary x tokens."""
    return 4 * vocabulary(model) * sum(b.loss_tokens for b in block_sets)


def available_ram() -> int:
    """Bytes the OS can give this process now (MemAvailable; total physical memory where that is unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose(mode: str, projected: int, available: int, disk_needed: int = 0, disk_free: int | None = None,
           can_recompute: bool = True) -> tuple[str, str]:
    """(the mode to use, one line saying why). auto: memory while it fits in half the available RAM, else disk
    while the files not yet written (`disk_needed` bytes) fit in 90% of the free disk, else recompute (adapter
    methods), else a one-line error. An explicit disk is refused up front when its files cannot fit."""
    from forgetscale.errors import ConfigError

    gb = f"projected {projected / 1e9:.2f} GB in memory, {available / 1e9:.1f} GB available"
    fits_disk = disk_free is None or disk_needed <= 0.9 * disk_free
    room = "" if disk_free is None else f"; {disk_needed / 1e9:.2f} GB to write to disk, {disk_free / 1e9:.1f} GB free"
    if mode == "disk" and not fits_disk:
        raise ConfigError(f"forgetting.reference: disk needs {disk_needed / 1e9:.1f} GB under RUN_DIR/references and "
                          f"the disk has {disk_free / 1e9:.1f} GB free; free space, or use recompute or topk:K; got 'disk'")
    if mode != "auto":
        return mode, f"{mode} ({gb})"
    if projected <= available // 2:
        return "memory", f"memory (auto: {gb}; memory while it fits in half)"
    if fits_disk:
        return "disk", f"disk (auto: {gb}{room}; memory while it fits in half the RAM, then disk)"
    if can_recompute:
        return "recompute", (f"recompute (auto: {gb}{room}; neither fits, so the base is re-run with the adapter "
                             "disabled at every checkpoint)")
    raise ConfigError(f"forgetting.reference: auto: the base predictions need {projected / 1e9:.1f} GB, more than half "
                      f"the {available / 1e9:.1f} GB of RAM and more than 90% of the {disk_free / 1e9:.1f} GB of free "
                      "disk, and a method without an adapter cannot recompute them; use topk:K or lower "
                      "forgetting.max_tokens; got 'auto'")


def disk_plan(folders: dict[str, Path], sizes: dict[str, int]) -> tuple[int, int]:
    """(bytes still to write, free bytes once leftover .tmp builds are removed) for the disk kind's folders
    under an existing RUN_DIR; a complete folder is read back, not written again."""
    to_write = sum(sizes[name] for name, folder in folders.items() if not (folder / "meta.json").is_file())
    leftover = sum(f.stat().st_size for folder in folders.values()
                   for f in folder.with_name(folder.name + ".tmp").glob("*") if f.is_file())
    root = next(iter(folders.values())).parent
    while not root.exists():
        root = root.parent
    return to_write, shutil.disk_usage(root).free + leftover


def blocks_key(blocks: Blocks) -> str:
    digest = hashlib.sha256()
    for tensor in (blocks.input_ids, blocks.attention_mask, blocks.labels):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class PerTokenEntropy:
    """`tokens` and `entropy` of every reference kind, from its per-token sum_v p log p (`neg_entropy`)."""

    neg_entropy: torch.Tensor  # [T] float64

    @property
    def tokens(self) -> int:
        return self.neg_entropy.shape[0]

    @property
    def entropy(self) -> float:
        return float(-self.neg_entropy.double().mean())



# -- memory -------------------------------------------------------------------------------------------
@dataclass
class MemoryReference(PerTokenEntropy):
    """Base-model predictions at the loss positions of a block set."""

    probs: torch.Tensor  # [T, V] float32 p_base, on CPU
    neg_entropy: torch.Tensor  # [T] float64 sum_v p log p, computed with the same arithmetic as `score`
    argmax: torch.Tensor  # [T] the base model's most likely token

    def rows(self, model: torch.nn.Module, part: Blocks, start: int, z: torch.Tensor, lse: torch.Tensor,
             device: torch.device, dtype: torch.dtype | None) -> Rows:
        """The reference at token rows [start, start + t) against the tuned model's shifted logits `z`."""
        t = z.shape[0]
        p = self.probs[start : start + t].to(z.device, non_blocking=True)
        return Rows(expected_log_q(p, z, lse), self.neg_entropy[start : start + t].to(z.device),
                    self.argmax[start : start + t].to(z.device))



def memory_reference(model: torch.nn.Module, blocks: Blocks, batch_size: int, device: torch.device,
                     dtype: torch.dtype | None = None, passes: int | None = None) -> MemoryReference:
    """The base model's distribution on `blocks` (call before attaching a method, or with adapters disabled).

    The [T, V] table is allocated once and filled batch by batch: concatenating per-batch pieces would hold it
    twice at the end (a 12.9 GB reference peaked past 24 GB and was killed). `passes`: see `sums.batches`."""
    probs, neg_entropy, argmax, start = None, [], [], 0
    for _, z, lse, _ in batches(model, blocks, batch_size, device, dtype, passes=passes):
        p, neg_h = base_distribution(z, lse)
        if probs is None:  # page-locked for a GPU: each checkpoint copies the whole table back to it
            probs = torch.empty((blocks.loss_tokens, z.shape[1]), dtype=p.dtype, pin_memory=device.type == "cuda")
        probs[start : start + z.shape[0]] = p
        start += z.shape[0]
        neg_entropy.append(neg_h.cpu())
        argmax.append(z.argmax(-1).cpu())
    if probs is None or start != probs.shape[0]:
        raise RuntimeError(f"reference: the blocks gave {start} positions, they hold {blocks.loss_tokens}")
    return MemoryReference(probs=probs, neg_entropy=torch.cat(neg_entropy), argmax=torch.cat(argmax))



# -- disk -----------------------------------------------------------------------------------------------
class ReadBuffer:
    """One host buffer the disk reference reads every batch into, page-locked when the rows go to a GPU.

    A fresh buffer per batch is page-faulted in anew (on CPU) and copied to a GPU from pageable memory: on an
    H200 with an 8B model the disk reference measured 9.3x a plain forward that way (docs/distributed.md).
    Not pickled: a process that receives the reference (a Ray worker) allocates its own."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.copied: Any = None  # the CUDA event after the last copy out of `data`

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def read(self, path: Path, offset: int, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        count = rows * vocab
        if self.data is None or self.data.numel() < count:
            self.data = torch.empty(count, dtype=torch.float32, pin_memory=device.type == "cuda")
        elif self.copied is not None:
            self.copied.synchronize()  # the previous batch has left the buffer for the GPU
        view = self.data[:count]
        with open(path, "rb") as fh:
            fh.seek(offset * 4)
            got = fh.readinto(view.numpy().view(np.uint8))
        if got != count * 4:
            raise RuntimeError(f"reference {path}: {got} bytes where {count * 4} were expected (a truncated file)")
        p = view.view(rows, vocab)
        if device.type != "cuda":
            return p
        p = p.to(device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return p


@dataclass
class DiskReference(PerTokenEntropy):
    """fp32 base probabilities in `folder`/probs.f32 ([T, V], row-major), read one batch of rows at a time."""

    folder: Path
    vocab: int
    neg_entropy: torch.Tensor  # [T] float64
    argmax: torch.Tensor  # [T]
    buffer: ReadBuffer = field(default_factory=ReadBuffer, repr=False, compare=False)

    def rows(self, model: torch.nn.Module, part: Blocks, start: int, z: torch.Tensor, lse: torch.Tensor,
             device: torch.device, dtype: torch.dtype | None) -> Rows:
        t = z.shape[0]
        p = self.buffer.read(self.folder / "probs.f32", start * self.vocab, t, self.vocab, z.device)
        return Rows(expected_log_q(p, z, lse), self.neg_entropy[start : start + t].to(z.device),
                    self.argmax[start : start + t].to(z.device))


def disk_reference(model: torch.nn.Module, blocks: Blocks, batch_size: int, device: torch.device,
                   dtype: torch.dtype | None, folder: Path) -> DiskReference:
    """The stored reference in `folder` if it is complete, else computed batch by batch into it (written to a
    temporary folder first, so an interrupted build leaves nothing that looks finished)."""
    if not (folder / "meta.json").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        neg_entropy, argmax, vocab = [], [], 0
        try:
            with open(tmp / "probs.f32", "wb") as fh:
                for _, z, lse, _ in batches(model, blocks, batch_size, device, dtype):
                    p, neg_h = base_distribution(z, lse)  # the same arithmetic as memory_reference
                    p.cpu().numpy().tofile(fh)
                    neg_entropy.append(neg_h.cpu())
                    argmax.append(z.argmax(-1).cpu())
                    vocab = z.shape[1]
            torch.save({"neg_entropy": torch.cat(neg_entropy), "argmax": torch.cat(argmax)}, tmp / "summary.pt")
            (tmp / "meta.json").write_text(json.dumps({"tokens": blocks.loss_tokens, "vocab": vocab}))
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a disk filled by a half-written cache helps nobody
            raise
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    meta = json.loads((folder / "meta.json").read_text())
    summary = torch.load(folder / "summary.pt")
    return DiskReference(folder, int(meta["vocab"]), summary["neg_entropy"], summary["argmax"])


# -- recompute ------------------------------------------------------------------------------------------
@dataclass
class RecomputeReference(PerTokenEntropy):
    """Only H(p) per token; p itself comes from re-running the tuned model with its adapter disabled."""

    neg_entropy: torch.Tensor  # [T] float64, from the base pass at build time (the stored entropy)
    # the base pass's own buffers on CPU (the tuned pass's logits stay in the caller's)
    workspace: LogitsWorkspace = field(default_factory=LogitsWorkspace, repr=False, compare=False)

    def rows(self, model: torch.nn.Module, part: Blocks, start: int, z: torch.Tensor, lse: torch.Tensor,
             device: torch.device, dtype: torch.dtype | None) -> Rows:
        if not hasattr(model, "disable_adapter"):
            raise RuntimeError("forgetting.reference recompute: the model has no adapter to disable")
        with model.disable_adapter():
            zb, lseb, _ = forward(model, part, device, dtype, self.workspace.on(z.device))
        p, neg_h = base_distribution(zb, lseb)
        # sum p log p from this same pass: KL is exactly 0 wherever the tuned model still equals the base
        return Rows(expected_log_q(p, z, lse), neg_h, zb.argmax(-1))


def recompute_reference(model: torch.nn.Module, blocks: Blocks, batch_size: int, device: torch.device,
                        dtype: torch.dtype | None) -> RecomputeReference:
    neg_entropy = [base_distribution(z, lse)[1].cpu() for _, z, lse, _ in batches(model, blocks, batch_size, device, dtype)]
    return RecomputeReference(torch.cat(neg_entropy))


# -- top-k ----------------------------------------------------------------------------------------------
@dataclass
class TopKReference(PerTokenEntropy):
    """The K largest base log-probabilities per token, their indices, the tail's log mass and the exact
    sum p log p (8 bytes x K + 24 per token). See the module docstring for the error and its bound."""

    log_p: torch.Tensor  # [T, K] float32 log p of the top K, largest first
    index: torch.Tensor  # [T, K] int32
    log_tail: torch.Tensor  # [T] float64 log of the tail mass r (-inf where the top K hold all of it)
    neg_entropy: torch.Tensor  # [T] float64
    argmax: torch.Tensor  # [T]
    approximate = True

    def rows(self, model: torch.nn.Module, part: Blocks, start: int, z: torch.Tensor, lse: torch.Tensor,
             device: torch.device, dtype: torch.dtype | None) -> Rows:
        t = z.shape[0]
        rows = slice(start, start + t)
        index, log_p = self.index[rows].to(z.device).long(), self.log_p[rows].to(z.device).double()
        log_r, neg_h = self.log_tail[rows].to(z.device), self.neg_entropy[rows].to(z.device)
        lse64 = lse.double()
        log_q = z.gather(1, index).double() - lse64[:, None]
        log_tail_q = torch.logsumexp(z.scatter(1, index, float("-inf")), dim=-1).double() - lse64
        p, r = log_p.exp(), log_r.exp()
        has_tail = r > 0
        tail = torch.where(has_tail, r * (log_r - log_tail_q), torch.zeros_like(r))
        kl = (p * (log_p - log_q)).sum(-1) + tail  # KL of the coarsened distributions
        # error = r KL(p_tail/r || q_tail/Q) <= r (log Q - log min q) + sum_tail p log p - r log r
        tail_neg_h = neg_h - (p * log_p).sum(-1)
        log_q_min = z.min(dim=-1).values.double() - lse64
        bound = torch.where(has_tail, r * (log_tail_q - log_q_min) + tail_neg_h - r * log_r, torch.zeros_like(r))
        return Rows(neg_h - kl, neg_h, self.argmax[rows].to(z.device), bound.clamp_min(0.0))


def topk_reference(model: torch.nn.Module, blocks: Blocks, batch_size: int, device: torch.device,
                   dtype: torch.dtype | None, k: int) -> TopKReference:
    parts: dict[str, list[torch.Tensor]] = {"log_p": [], "index": [], "log_tail": [], "neg_entropy": [], "argmax": []}
    for _, z, lse, _ in batches(model, blocks, batch_size, device, dtype):
        top = z.topk(min(k, z.shape[1]), dim=-1)
        parts["log_p"].append((top.values - lse[:, None]).cpu())
        parts["index"].append(top.indices.int().cpu())
        tail = torch.logsumexp(z.scatter(1, top.indices, float("-inf")), dim=-1)
        parts["log_tail"].append((tail.double() - lse.double()).cpu())
        parts["neg_entropy"].append(base_distribution(z, lse)[1].cpu())
        parts["argmax"].append(z.argmax(-1).cpu())
    return TopKReference(**{name: torch.cat(values) for name, values in parts.items()})


def build(mode: str, model: torch.nn.Module, blocks: Blocks, batch_size: int, device: torch.device,
          dtype: torch.dtype | None, folder: Path | None = None) -> Reference:
    """The base predictions on `blocks` in the given (already chosen, not auto) mode; `folder` for disk."""
    if mode == "memory":
        return memory_reference(model, blocks, batch_size, device, dtype)
    if mode == "disk":
        if folder is None:
            raise ValueError("a disk reference needs a folder")
        return disk_reference(model, blocks, batch_size, device, dtype, folder)
    if mode == "recompute":
        return recompute_reference(model, blocks, batch_size, device, dtype)
    if mode.startswith("topk:"):
        return topk_reference(model, blocks, batch_size, device, dtype, int(mode.partition(":")[2]))
    raise ValueError(f"unknown reference mode {mode!r}")


def disk_folder(root: Path, name: str, identity: dict[str, Any], blocks: Blocks, batch_size: int) -> Path:
    """RUN_DIR/references/<name>-<key>: the key covers the base model, its precision and device, the token
    blocks and the batch size, so a folder is only ever read back for the same predictions."""
    data = {"model": identity, "blocks": blocks_key(blocks), "batch_size": batch_size}
    key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    return root / "references" / f"{name}-{key}"
