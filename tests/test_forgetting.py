import torch
import torch.nn.functional as F

from forgetscale.config import parse_config
from forgetscale.data.blocks import pack_documents
from forgetscale.data.embedded import news_articles
from forgetscale.methods.attach import attach
from forgetscale.metric.references import memory_reference
from forgetscale.metric.sums import score
from forgetscale.models import load_model

CPU = torch.device("cpu")


def _setup():
    loaded = load_model("tiny-random-llama")
    blocks = pack_documents(news_articles()[:5], loaded.tokenizer, 24, max_tokens=200)
    return loaded.model, blocks


def test_base_model_has_zero_kl_and_ce_equals_entropy():
    model, blocks = _setup()
    ref = memory_reference(model, blocks, 4, CPU)
    out = score(model, blocks, 4, CPU, ref=ref)
    assert out["kl"] == 0.0
    assert abs(out["ce"] - out["entropy"]) < 1e-9
    assert out["tokens"] == ref.tokens == blocks.loss_tokens


def test_metrics_match_a_naive_computation():
    model, blocks = _setup()
    ref = memory_reference(model, blocks, 3, CPU)
    torch.manual_seed(1)
    tuned = attach(model, parse_config({"method": {"name": "lora", "ranks": [4]}}).methods[0], 4)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = score(tuned, blocks, 5, CPU, ref=ref)  # batch size differs from the reference's on purpose
    with torch.no_grad():
        q = F.log_softmax(tuned(input_ids=blocks.input_ids).logits[:, :-1].float(), -1).reshape(-1, ref.probs.shape[1])
        with tuned.disable_adapter():
            p = F.log_softmax(tuned(input_ids=blocks.input_ids).logits[:, :-1].float(), -1).reshape(-1, q.shape[1])
    labels = blocks.labels[:, 1:].reshape(-1)
    naive_ce = float(-(p.exp() * q).sum(-1).mean())
    naive_kl = float(F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean())
    naive_hard = float(-q.gather(1, p.argmax(-1, keepdim=True)).mean())
    naive_nll = float(F.nll_loss(q, labels))
    assert abs(out["ce"] - naive_ce) < 1e-4
    assert abs(out["kl"] - naive_kl) < 1e-4 and out["kl"] > 1e-3
    assert abs(out["ce_hard"] - naive_hard) < 1e-4
    assert abs(out["nll"] - naive_nll) < 1e-4
    assert abs(out["ce"] - (out["entropy"] + out["kl"])) < 1e-6


def test_bf16_autocast_keeps_the_output_head_in_fp32():
    model, blocks = _setup()
    head = model.get_output_embeddings()
    ref = memory_reference(model, blocks, 4, CPU, torch.bfloat16)
    out = score(model, blocks, 5, CPU, torch.bfloat16, ref)
    assert out["kl"] == 0.0
    assert not head._forward_hooks and not head._forward_pre_hooks  # hooks removed after use
    fp32 = score(model, blocks, 4, CPU, None, memory_reference(model, blocks, 4, CPU))
    assert abs(out["ce"] - fp32["ce"]) < 0.05  # bf16 body, fp32 logits: close to the fp32 numbers
