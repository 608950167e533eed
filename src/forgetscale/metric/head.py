"""The output head a few rows at a time: the training loss and its gradient, and the logits a measuring
pass reads, without a [tokens, vocabulary] tensor per batch.

Why: the stock causal-LM loss builds bf16 logits, an fp32 copy, log-softmax and two gradients, each
[batch x context x vocabulary] (100 MB apiece for SmolLM2 at 4 x 128 tokens). Above 32 MB glibc serves
every allocation with a fresh mmap, so each of them is page-faulted in anew at every micro-batch: on this
CPU a bf16 LoRA step spent 0.52 of its 1.91 s in the kernel (`benchmarks/bench_train_loss.py`, README). Here the
head runs on row chunks whose buffers are allocated once per micro-batch, and the gradient with respect to
the hidden states is formed in the forward pass (the frozen head needs no weight gradient), so backward
is one multiplication. Same arithmetic as the stock loss, in the same precision (autocast's dtype for
the matmul, fp32 softmax).

Only for heads that are a frozen plain Linear on architectures whose logits are the head's output and
nothing more, or that output soft-capped (Gemma 2/3's final_logit_softcapping: cap * tanh(z / cap), applied
here to the logits and to the gradient); every other model (Cohere and Granite scale the logits) keeps the
stock loss. A tied head (Gemma, SmolLM2) is the embedding's weight: frozen with it, and the embedding
scale Gemma multiplies its inputs by is the embedding's own business, not the head's.
"""

from __future__ import annotations

import contextlib

import torch

from forgetscale.data.blocks import IGNORE

# logits = lm_head(final hidden state), then at most a soft-cap (SOFTCAP_MODELS); Cohere and Granite scale them
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3", "gemma", "gemma2",
                               "gemma3_text"})
SOFTCAP_MODELS = frozenset({"gemma2", "gemma3_text"})  # cap * tanh(logits / cap) when final_logit_softcapping is set
CHUNK_BYTES = 16 * 2**20  # one fp32 chunk of logits: under glibc's 32 MB mmap ceiling, so chunks are reused
GPU_CHUNK_BYTES = 512 * 2**20  # a GPU has no page faults to avoid, only memory: fewer, larger matmuls


def chunk_rows(vocabulary: int, device: torch.device) -> int:
    """Rows per chunk of fp32 logits."""
    return max(1, (CHUNK_BYTES if device.type == "cpu" else GPU_CHUNK_BYTES) // (4 * vocabulary))


def plain_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output projection when the logits are its output on the final hidden states and nothing more."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS or not hasattr(model, "get_output_embeddings"):
        return None
    if sharded(model):  # FSDP holds the head's weight whole only inside the model's forward
        return None
    head = model.get_output_embeddings()
    return head if type(head) is torch.nn.Linear else None  # not an adapter or a quantised layer on the head


def sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP (the wrapper, or fully_shard's modules) shards the model's parameters across processes."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules())


def logit_softcap(model: torch.nn.Module) -> float | None:
    """The soft-cap the model puts on its logits (Gemma 2/3's final_logit_softcapping), or None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SOFTCAP_MODELS:
        return None
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def softcap_(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(z / cap) in place (nothing when cap is None), as the model's own forward caps its logits."""
    if cap is not None:
        z.div_(cap).tanh_().mul_(cap)
    return z


def chunkable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The plain head when it is also frozen (its weight gradient is never formed here), else None."""
    head = plain_head(model)
    return None if head is None or any(p.requires_grad for p in head.parameters()) else head


@contextlib.contextmanager
def hidden_states_out(model: torch.nn.Module, head: torch.nn.Module):
    """Inside, the model's `.logits` are its final hidden states: the head passes its input through, and a
    soft-capping model's cap is off (it would squash the hidden states); the caller caps (`softcap_`)."""
    config = model.config
    capped = logit_softcap(model) is not None  # off here exactly when the caller applies it
    cap = config.final_logit_softcapping if capped else None
    head.forward = lambda x: x
    if capped:
        config.final_logit_softcapping = None
    try:
        yield
    finally:
        del head.forward  # the class's forward again
        if capped:
            config.final_logit_softcapping = cap


class _ChunkedNextTokenLoss(torch.autograd.Function):
    """mean_t CE(head(h_t), y_t) over rows already restricted to labelled positions."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                rows: int, cap: float | None = None) -> torch.Tensor:
        n = hidden.shape[0]
        h_all = hidden.to(weight.dtype)
        grad = torch.empty_like(h_all)
        low = torch.empty((min(rows, n), weight.shape[0]), dtype=weight.dtype, device=hidden.device)
        z = torch.empty(low.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=hidden.device)
        slope = None if cap is None else torch.empty_like(z)  # d capped / d logit = 1 - tanh^2
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, n, rows):
            h, y = h_all[start : start + rows], labels[start : start + rows]
            m = h.shape[0]
            zl, zf = low[:m], z[:m]
            torch.matmul(h, weight.t(), out=zl)
            if bias is not None:
                zl.add_(bias)
            zf.copy_(zl)
            if slope is not None:
                zf.div_(cap).tanh_()
                torch.mul(zf, zf, out=slope[:m]).neg_().add_(1.0)
                zf.mul_(cap)
            zf.sub_(zf.amax(dim=-1, keepdim=True))
            picked = zf.gather(1, y[:, None]).view(-1)
            zf.exp_()
            sums = zf.sum(dim=-1)
            total += (sums.log() - picked).double().sum()
            zf.div_(sums[:, None] * n)  # softmax / n: the gradient of the mean, before the low-precision cast
            zf[torch.arange(m, device=zf.device), y] -= 1.0 / n
            if slope is not None:
                zf.mul_(slope[:m])
            zl.copy_(zf)
            torch.matmul(zl, weight, out=grad[start : start + m])
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return (total / n).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)).to(ctx.hidden_dtype), None, None, None, None, None


def next_token_loss(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss `model(..., labels=labels).loss` gives (mean over labelled next tokens), through
    the chunked head where the model allows it."""
    head = chunkable_head(model)
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    with hidden_states_out(model, head):
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).logits
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows = hidden[:, :-1][keep]
    weight = head.weight
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the matmul in autocast's dtype, as the stock head's would be
        weight = weight.to(torch.get_autocast_dtype(device))
    bias = None if head.bias is None else head.bias.to(weight.dtype)
    chunk = chunk_rows(weight.shape[0], hidden.device)
    with torch.autocast(device_type=device, enabled=False):
        return _ChunkedNextTokenLoss.apply(rows, weight, bias, targets[keep], chunk, logit_softcap(model))


def fp32_weight(head: torch.nn.Module) -> torch.Tensor:
    """The head's weight in fp32. On CPU a half-precision weight (model.dtype) is upcast once and the copy kept
    on the head until the weight changes (its storage or in-place version): measuring passes and checkpoints
    of a run reuse it instead of converting 28M SmolLM2 values each pass. On a GPU nothing is kept (an fp32
    copy of a 128k-vocabulary head is 2 GB that training needs); the caller's workspace keeps it for a pass."""
    weight = head.weight.detach()
    if weight.dtype == torch.float32:
        return weight
    if weight.device.type != "cpu":
        return weight.float()
    key = (weight.data_ptr(), head.weight._version, weight.device)
    cached = head.__dict__.get("_forgetscale_fp32_weight")
    if cached is None or cached[0] != key:
        cached = (key, weight.float())
        head.__dict__["_forgetscale_fp32_weight"] = cached  # a plain attribute: not in state_dict, not moved by .to()
    return cached[1]


class LogitsWorkspace:
    """fp32 logits rows for measuring, and the scratch rows of their log-normaliser, in buffers reused batch
    after batch and, held by a run's context, pass after pass: on CPU each fresh [t, V] buffer (200 MB at
    8 x 128 SmolLM2 tokens, three passes per checkpoint) is page-faulted in anew. One pass at a time (a nested pass, as
    the recompute reference runs, needs its own); off CPU one pass only, over a frozen head (it keeps the head's
    fp32 weight). Pickles empty, so a shipped context carries no buffers."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.scratch: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None  # off CPU: the head's fp32 weight for this pass

    def on(self, device: torch.device) -> LogitsWorkspace:
        """The workspace a pass on `device` should use: this one on CPU (kept pass after pass, no page faults),
        a fresh one elsewhere (a GPU frees the buffers for training once the caller lets go of it)."""
        return self if device.type == "cpu" else LogitsWorkspace()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def logits(self, head: torch.nn.Linear, rows: torch.Tensor, cap: float | None = None) -> torch.Tensor:
        """head(rows) in fp32, [t, V], soft-capped when `cap` is given (`logit_softcap`), valid until the next call."""
        if rows.device.type == "cpu":
            weight = fp32_weight(head)
        else:  # a GPU workspace lives for one pass over a frozen head
            if self.weight is None:
                self.weight = fp32_weight(head)
            weight = self.weight
        t, v = rows.shape[0], weight.shape[0]
        if self.buffer is None or self.buffer.numel() < t * v or self.buffer.device != rows.device:
            self.buffer = torch.empty(t * v, dtype=torch.float32, device=rows.device)
        z = self.buffer[: t * v].view(t, v)
        with torch.autocast(device_type=rows.device.type, enabled=False):
            torch.matmul(rows.float(), weight.t(), out=z)
            if head.bias is not None:
                z.add_(head.bias.detach().float())
            softcap_(z, cap)
        return z

    def shifted_logsumexp(self, z: torch.Tensor) -> torch.Tensor:
        """logsumexp of rows whose maximum is already 0: log(sum(exp(z))), what torch.logsumexp computes
        after subtracting that 0 maximum (same values), a chunk of rows at a time through one reused scratch
        buffer instead of logsumexp's own [rows, V] temporaries."""
        t, v = z.shape
        rows = min(t, chunk_rows(v, z.device))
        if self.scratch is None or self.scratch.numel() < rows * v or self.scratch.device != z.device:
            self.scratch = torch.empty(rows * v, dtype=z.dtype, device=z.device)
        out = torch.empty(t, dtype=z.dtype, device=z.device)
        for start in range(0, t, rows):
            part = z[start : start + rows]
            scratch = self.scratch[: part.numel()].view(part.shape)
            torch.exp(part, out=scratch)
            torch.sum(scratch, dim=-1, out=out[start : start + part.shape[0]])
        return out.log_()
