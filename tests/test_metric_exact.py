"""The stored metric is exact: soft CE, hard CE, entropy, KL and NLL computed in fp32 (and under bf16
autocast, output head in fp32) agree with an fp64 computation on the same logits to 1e-6 nats."""

from __future__ import annotations

import copy

import pytest
import torch

from forgetscale.data.blocks import Blocks
from forgetscale.metric.references import memory_reference
from forgetscale.metric.sums import autocast, fp32_output_head, score
from forgetscale.models import load_model

TOL = 1e-6


def _blocks(vocab: int, n: int = 4, length: int = 64, seed: int = 0) -> Blocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return Blocks(ids, ids.clone(), torch.ones_like(ids))


def _logits64(model, blocks: Blocks, dtype) -> torch.Tensor:
    """The same fp32 logits the metric sees (same autocast, fp32 head), as fp64, at the predicted positions."""
    device = torch.device("cpu")
    with torch.no_grad(), autocast(device, dtype), fp32_output_head(model, device, dtype):
        logits = model(input_ids=blocks.input_ids, attention_mask=blocks.attention_mask).logits
    return logits[:, :-1].float().double().reshape(-1, logits.shape[-1])


def _truth(base, tuned, blocks: Blocks, dtype) -> dict[str, float]:
    logp = torch.log_softmax(_logits64(base, blocks, dtype), -1)
    logq = torch.log_softmax(_logits64(tuned, blocks, dtype), -1)
    p = logp.exp()
    labels = blocks.labels[:, 1:].reshape(-1)
    entropy = -(p * logp).sum(-1)
    ce = -(p * logq).sum(-1)
    return {"entropy": float(entropy.mean()), "ce": float(ce.mean()), "kl": float((ce - entropy).mean()),
            "ce_hard": float(-logq.gather(1, logp.argmax(-1, keepdim=True)).mean()),
            "nll": float(-logq.gather(1, labels[:, None]).mean())}


def _perturbed(model, scale: float):
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "layers" in name and name.endswith("weight") and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=g) * scale * param.abs().mean())
    return tuned


def _check(base, tuned, blocks, dtype):
    device = torch.device("cpu")
    batch = len(blocks)  # the same batch as the fp64 forward: batch shape changes fp32 logits at ~1e-6
    ref = memory_reference(base, blocks, batch, device, dtype)
    got = score(tuned, blocks, batch, device, dtype, ref)
    truth = _truth(base, tuned, blocks, dtype)
    errors = {k: abs(got[k] - truth[k]) for k in truth}
    assert max(errors.values()) <= TOL, errors
    assert truth["kl"] > 1e-3  # the tuned model really differs: the check is not on KL = 0
    assert score(base, blocks, batch, device, dtype, ref)["kl"] == 0.0  # and the base is exactly 0


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_metric_matches_fp64_on_the_tiny_model(dtype):
    torch.manual_seed(0)
    base = load_model("tiny-random-llama").model
    _check(base, _perturbed(base, 0.5), _blocks(base.config.vocab_size), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_metric_matches_fp64_on_the_embedded_model(dtype):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = load_model("smollm2-135m-instruct").model
    from forgetscale.data.embedded import wikipedia_articles

    loaded = load_model("smollm2-135m-instruct")
    text = " ".join(wikipedia_articles(None)[:3])
    ids = torch.tensor(loaded.tokenizer(text)["input_ids"][: 2 * 128]).view(2, 128)
    blocks = Blocks(ids, ids.clone(), torch.ones_like(ids))
    _check(base, _perturbed(base, 0.05), blocks, dtype)
