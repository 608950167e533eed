"""The metric's sums: one loop (`score`) over a block set that adds up, in fp64, every number a checkpoint
stores (the NLL of the text, soft and hard CE against the base, the base's entropy, KL), from shifted
logits of the tuned model and the rows a reference (forgetscale.metric.references) gives for each batch.

L_f = mean_t [ -sum_v p_base(v|x<t) log p_ft(v|x<t) ] = H(p_base) + KL(p_base || p_ft)   (soft, the paper's)
hard form: -log p_ft(argmax p_base | x<t).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from forgetscale.data.blocks import IGNORE, Blocks
from forgetscale.metric.head import LogitsWorkspace, fp32_weight, hidden_states_out, logit_softcap, plain_head


@dataclass
class Rows:
    """What every kind of reference gives `score` for one batch of tokens."""

    cross: torch.Tensor  # [t] float64 sum_v p log q
    neg_entropy: torch.Tensor  # [t] float64 sum_v p log p
    argmax: torch.Tensor  # [t]
    error_bound: torch.Tensor | None = None  # [t] float64 upper bound on KL's error (approximate references)


class Reference(Protocol):
    """Where the base predictions live (forgetscale.metric.references: memory, disk, recompute, topk:K): what
    `score` asks of them."""

    @property
    def tokens(self) -> int: ...

    @property
    def entropy(self) -> float: ...

    def rows(self, model: torch.nn.Module, part: Blocks, start: int, z: torch.Tensor, lse: torch.Tensor,
             device: torch.device, dtype: torch.dtype | None) -> Rows: ...


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def fp32_output_head(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None):
    """Run the output projection outside autocast, so logits are fp32: bf16 logits alone put ~4e-4 nats of
    rounding noise into every KL (SmolLM2), which is as large as the true KL at the first checkpoints.
    A head stored in bf16/fp16 (model.dtype) is multiplied in fp32 from an upcast of its weight."""
    head = model.get_output_embeddings() if dtype is not None and hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    if getattr(head, "weight", None) is not None and head.weight.dtype != torch.float32:

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=device.type, enabled=False):
                bias = None if head.bias is None else head.bias.float()
                return torch.nn.functional.linear(x.float(), fp32_weight(head), bias)

        head.forward = forward
        try:
            yield
        finally:
            del head.forward  # the class's forward again
        return
    off = torch.autocast(device_type=device.type, enabled=False)

    def enter(_module, args):
        off.__enter__()
        return (args[0].float(), *args[1:])

    def leave(_module, _args, _output):
        off.__exit__(None, None, None)

    hooks = [head.register_forward_pre_hook(enter), head.register_forward_hook(leave)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def own_precision(model: torch.nn.Module):
    """The model's own forward while measuring: accelerate's mixed precision (the Trainer's bf16=True / fp16=True)
    replaces `model.forward` with one that enters autocast itself, which would override the measuring precision
    (a DDP run under bf16=True measured KL 0.8% off fp32 on the tiny model). accelerate keeps the original as
    `_original_forward`; it is put back for the pass only."""
    patched = vars(model).get("forward")
    original = vars(model).get("_original_forward")
    if patched is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = patched


def forward(model: torch.nn.Module, part: Blocks, device: torch.device, dtype: torch.dtype | None,
            workspace: LogitsWorkspace | None = None):
    """(logits at the loss positions [t, V] float32, shifted so each row's maximum is 0; their log-normaliser
    [t]; labels [t]) for one batch of blocks.

    The shift is exact algebra (every quantity below is a difference z_v - logsumexp(z)), and it is what
    keeps fp32 exact: unshifted, p.z and logsumexp(z) are each ~35 nats on SmolLM2 and their difference
    loses ~1e-3 nats per token to cancellation; shifted, both are a few nats.

    With a plain output head (forgetscale.metric.head) the head runs on the loss positions only, into the
    workspace's reused buffer, and nothing else [t, V] is allocated: on CPU every fresh tensor that large is
    page-faulted in anew, which was half of a measuring pass (`benchmarks/bench_train_loss.py`). The
    logits are then valid until the workspace's next batch."""
    ids, mask = part.input_ids.to(device), part.attention_mask.to(device)
    labels = part.labels[:, 1:].to(device)
    keep = labels != IGNORE
    head = plain_head(model)
    if head is None:
        with torch.no_grad(), autocast(device, dtype), fp32_output_head(model, device, dtype), own_precision(model):
            logits = model(input_ids=ids, attention_mask=mask).logits
        z = logits[:, :-1][keep].float()
        z = z - z.max(dim=-1, keepdim=True).values
        return z, torch.logsumexp(z, dim=-1), labels[keep]
    with torch.no_grad(), autocast(device, dtype), hidden_states_out(model, head), own_precision(model):
        hidden = model(input_ids=ids, attention_mask=mask).logits
    workspace = workspace or LogitsWorkspace()
    with torch.no_grad():
        z = workspace.logits(head, hidden[:, :-1][keep], logit_softcap(model))
        z.sub_(z.amax(dim=-1, keepdim=True))
        lse = workspace.shifted_logsumexp(z)
    return z, lse, labels[keep]


def batches(model: torch.nn.Module, blocks: Blocks, batch_size: int, device: torch.device, dtype: torch.dtype | None,
             workspace: LogitsWorkspace | None = None, passes: int | None = None):
    """Yield (batch, z, lse, labels) batch by batch (see `forward`); z is overwritten by the next batch.
    `passes`: make that many forward passes in all, repeating the last batch unseen (forgetscale.metric.shard:
    every rank of a sharded model must run as many forwards as the others)."""
    workspace = workspace or LogitsWorkspace()
    made = 0
    for start in range(0, len(blocks), batch_size):
        part = blocks.select(slice(start, start + batch_size))
        made += 1
        yield (part, *forward(model, part, device, dtype, workspace))
    for _ in range(made, passes or 0):
        forward(model, blocks.select(slice(max(0, len(blocks) - batch_size), len(blocks))), device, dtype, workspace)


DOT_CHUNK = 256  # vocabulary columns per partial dot product


def _dot(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Row-wise p . z in fp64, without a [t, V] temporary: fp32 partial sums over DOT_CHUNK columns, added in
    fp64. One fp32 dot over SmolLM2's 49k vocabulary is biased by ~5e-6 nats per token (4,096-column
    chunks still by 5.6e-6); 256-column chunks by 1.3e-7, at ~2% of the forward pass's time."""
    total = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)
    for start in range(0, p.shape[1], DOT_CHUNK):
        part = slice(start, start + DOT_CHUNK)
        total += torch.bmm(p[:, part].unsqueeze(1), z[:, part].unsqueeze(2)).view(-1).double()
    return total


def expected_log_q(p: torch.Tensor, z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """sum_v p(v) log q(v) per token (fp64), with log q = z - lse: the one form every CE, entropy and KL
    term here is computed in (p = the base's distribution, z, lse = shifted logits of the model q)."""
    return _dot(p, z) - lse.double()


def base_distribution(z: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p = exp(z - lse) (not softmax: its fp32 normaliser leaves sum(p) off 1 by ~8e-6 on SmolLM2) and
    its per-token sum_v p log p: what every reference kind stores or recomputes."""
    p = torch.exp(z - lse[:, None])
    return p, expected_log_q(p, z, lse)


def score(model: torch.nn.Module, blocks: Blocks, batch_size: int, device: torch.device,
          dtype: torch.dtype | None = None, ref: Reference | None = None,
          workspace: LogitsWorkspace | None = None, per_token: bool = False, passes: int | None = None) -> dict[str, Any]:
    """Mean next-token NLL on the blocks' labels; with a reference also soft/hard CE, entropy and KL.

    Uses log q(v) = z_v - logsumexp(z), so sum_v p log q = p.z - lse needs no log-softmax tensor; the
    reference's sum p log p uses the same arithmetic, so KL is exactly 0 when the model is the base.
    An approximate reference (topk:K) also gives `kl_error_bound`: KL and CE are low by at most that much.
    `workspace`: buffers to reuse (a run's context passes one for all its passes); default: this pass's own.
    `per_token`: also the per-token fp64 KL, CE, hard CE and NLL on CPU (`per_token`), for intervals over
    blocks and for the sums a distributed measurement gathers; the means are the same sums either way.
    `passes`: forward passes in all (see `batches`).
    """
    nll = ce = ce_hard = kl = bound = 0.0
    count = 0
    tokens: dict[str, list[torch.Tensor]] = {"kl": [], "ce": [], "ce_hard": [], "nll": []}
    for part, z, lse, labels in batches(model, blocks, batch_size, device, dtype, workspace, passes):
        t = z.shape[0]
        token_nll = (lse - z.gather(1, labels[:, None]).view(-1)).double()
        nll += float(token_nll.sum())
        if ref is not None:
            rows = ref.rows(model, part, count, z, lse, device, dtype)
            token_kl = (rows.neg_entropy - rows.cross).double()
            token_hard = (lse - z.gather(1, rows.argmax[:, None]).view(-1)).double()
            ce += float(-rows.cross.double().sum())
            kl += float(token_kl.sum())
            ce_hard += float(token_hard.sum())
            if rows.error_bound is not None:
                bound += float(rows.error_bound.sum())
            if per_token:
                tokens["kl"].append(token_kl.cpu())
                tokens["ce"].append((-rows.cross).double().cpu())
                tokens["ce_hard"].append(token_hard.cpu())
                tokens["nll"].append(token_nll.cpu())
        count += t
    out: dict[str, Any] = {"nll": nll / count, "tokens": count}
    if ref is not None:
        if count != ref.tokens:
            raise RuntimeError(f"reference holds {ref.tokens} positions, blocks gave {count}")
        out.update(ce=ce / count, ce_hard=ce_hard / count, kl=kl / count, entropy=ref.entropy)
        if getattr(ref, "approximate", False):
            out["kl_error_bound"] = bound / count
        if per_token:
            out["per_token"] = {name: torch.cat(values) for name, values in tokens.items()}
    return out
