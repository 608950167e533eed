"""The chunked output head (forgetscale.metric.head) gives the stock causal-LM loss and gradients, and
measuring through it gives the logits the stock head gives; models it does not fit keep the stock path."""

from __future__ import annotations

import copy

import pytest
import torch

from forgetscale.config import parse_config
from forgetscale.data.blocks import IGNORE, Blocks
from forgetscale.methods.attach import attach, upcast_trainable
from forgetscale.metric import head, sums
from forgetscale.models import load_model


def _lora(name: str = "tiny-random-llama", rank: int = 4, dtype: torch.dtype | None = None, **method):
    torch.manual_seed(0)
    base = load_model(name).model
    if dtype is not None:
        base.to(dtype)
    cfg = parse_config({"method": {"name": "lora", "ranks": [rank], **method}})
    model = attach(base, cfg.method[0], rank)
    upcast_trainable(model)
    with torch.no_grad():  # LoRA's B starts at zero: move off it so every adapter weight has a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch(vocab: int, n: int = 3, length: int = 40) -> Blocks:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[0, :7] = IGNORE  # a prompt the loss skips
    mask = torch.ones_like(ids)
    mask[2, -5:] = 0  # right padding
    labels[2, -5:] = IGNORE
    return Blocks(ids, labels, mask)


def _exact_loss(model, b: Blocks) -> torch.Tensor:
    """The mean next-token CE from the model's logits in their own precision (the stock loss upcasts to fp32
    only: an fp64 model's stock loss is fp32)."""
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE)


def _loss_and_grads(model, b: Blocks, chunked: bool, autocast: bool = False, exact: bool = False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if exact:
            loss = _exact_loss(model, b)
        elif chunked:
            loss = head.next_token_loss(model, b.input_ids, b.attention_mask, b.labels)
        else:
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss / 3, params)  # a scaled loss, as gradient accumulation gives
    return float(loss.detach()), torch.cat([g.flatten().double() for g in grads])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_chunked_loss_is_the_stock_loss_in_fp64(monkeypatch):
    """Same algebra: in fp64 the loss and every adapter gradient agree to rounding, over several chunks."""
    monkeypatch.setattr(head, "CHUNK_BYTES", 4 * 1000 * 7)  # 7 rows of the 1,000-word vocabulary per chunk
    model = _lora(dtype=torch.float64)
    assert head.chunkable_head(model) is not None
    b = _batch(model.config.vocab_size)
    stock, g_stock = _loss_and_grads(model, b, chunked=False, exact=True)
    ours, g_ours = _loss_and_grads(model, b, chunked=True)
    assert abs(stock - ours) < 1e-12
    assert _rel(g_ours, g_stock) < 1e-10


def test_chunked_loss_in_fp32_is_as_close_to_fp64_as_the_stock_loss():
    model = _lora()
    b = _batch(model.config.vocab_size)
    stock, g_stock = _loss_and_grads(model, b, chunked=False)
    ours, g_ours = _loss_and_grads(model, b, chunked=True)
    exact, g_exact = _loss_and_grads(copy.deepcopy(model).double(), b, chunked=False, exact=True)
    assert abs(ours - exact) <= max(abs(stock - exact), 1e-6)
    assert _rel(g_ours, g_exact) <= max(2 * _rel(g_stock, g_exact), 1e-5)


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "target_modules": ["lm_head", "q_proj"]}],
                         ids=["full (the head trains)", "lora on the head"])
def test_heads_it_does_not_fit_keep_the_stock_loss(method):
    torch.manual_seed(0)
    base = load_model("tiny-random-llama").model
    cfg = parse_config({"method": {"ranks": [2], **method}} if method["name"] == "lora" else {"method": method})
    model = attach(base, cfg.method[0], 2 if method["name"] == "lora" else None)
    assert head.chunkable_head(model) is None
    b = _batch(model.config.vocab_size)
    assert _loss_and_grads(model, b, chunked=True)[0] == _loss_and_grads(model, b, chunked=False)[0]


def test_measuring_through_the_plain_head_gives_the_stock_logits(monkeypatch):
    model = _lora()
    b = _batch(model.config.vocab_size)
    device = torch.device("cpu")
    z, lse, labels = sums.forward(model, b, device, None)
    monkeypatch.setattr(sums, "plain_head", lambda m: None)  # the stock head over every position
    z0, lse0, labels0 = sums.forward(model, b, device, None)
    assert torch.equal(labels, labels0) and z.shape == z0.shape
    assert float((z - z0).abs().max()) < 1e-5 and float((lse - lse0).abs().max()) < 1e-5


def test_a_workspace_is_reused_batch_after_batch():
    model = _lora()
    workspace = head.LogitsWorkspace()
    device = torch.device("cpu")
    b = _batch(model.config.vocab_size)
    first = sums.forward(model, b, device, None, workspace)[0].data_ptr()
    second = sums.forward(model, b.select(slice(0, 2)), device, None, workspace)[0].data_ptr()
    assert first == second == workspace.buffer.data_ptr()


@pytest.mark.slow
def test_chunked_loss_on_the_embedded_model_under_bf16():
    """SmolLM2 with bf16 weights under autocast (the CPU's fast mode): the chunked loss and gradients are as
    far from an fp64 computation as the stock ones are (bf16 rounding, not a different loss)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = _lora("smollm2-135m-instruct", dtype=torch.bfloat16, scaling="rslora")
    from forgetscale.data.embedded import wikipedia_articles

    tokenizer = load_model("smollm2-135m-instruct").tokenizer
    ids = torch.tensor(tokenizer(" ".join(wikipedia_articles(None)[:3]))["input_ids"][: 2 * 96]).view(2, 96)
    b = Blocks(ids, ids.clone(), torch.ones_like(ids))
    stock, g_stock = _loss_and_grads(model, b, chunked=False, autocast=True)
    ours, g_ours = _loss_and_grads(model, b, chunked=True, autocast=True)
    exact, g_exact = _loss_and_grads(copy.deepcopy(model).double(), b, chunked=False, exact=True)
    assert abs(ours - exact) <= 1.5 * abs(stock - exact) + 1e-4
    assert _rel(g_ours, g_exact) <= 1.5 * _rel(g_stock, g_exact)
    assert _rel(g_ours, g_stock) < 0.1


def test_a_half_precision_head_is_upcast_once_and_again_when_it_changes():
    layer = torch.nn.Linear(8, 50, bias=False).to(torch.bfloat16)
    first = head.fp32_weight(layer)
    assert first.dtype == torch.float32 and torch.equal(first, layer.weight.float())
    assert head.fp32_weight(layer) is first  # the next pass reuses it
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer step on a trained head: in place, a new version
    second = head.fp32_weight(layer)
    assert second is not first and torch.equal(second, layer.weight.float())
    fp32 = torch.nn.Linear(8, 50, bias=False)
    assert head.fp32_weight(fp32).data_ptr() == fp32.weight.data_ptr()  # nothing to upcast
    assert "_forgetscale_fp32_weight" not in dict(layer.state_dict())


def test_shifted_logsumexp_is_torch_logsumexp_over_several_chunks(monkeypatch):
    monkeypatch.setattr(head, "CHUNK_BYTES", 4 * 1000 * 7)  # 7 rows of 1,000 columns per chunk
    z = torch.randn(30, 1000, generator=torch.Generator().manual_seed(0)) * 6
    z.sub_(z.amax(dim=-1, keepdim=True))
    workspace = head.LogitsWorkspace()
    assert torch.equal(workspace.shifted_logsumexp(z), torch.logsumexp(z, dim=-1))
    assert workspace.scratch.numel() == 7 * 1000
