"""Shared fixtures: a tiny random Llama (fast) and small sweep configs. The real embedded model is used
in tests marked `slow` (they still run in `make test`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgetscale.config import parse_config


def tiny_config(**sections) -> dict:
    """A sweep on the tiny random Llama that runs in seconds."""
    cfg = {
        "name": "tiny",
        "model": "tiny-random-llama",
        "finetune": {"dataset": "embedded:news", "heldout_max_tokens": 256, "max_examples": 60},
        "forgetting": {"dataset": "embedded:wikipedia", "max_tokens": 256},
        "method": {"name": "lora", "ranks": [2, 4]},
        "train": {"steps": 4, "checkpoints": [0, 2, 4], "batch_size": 2, "context_length": 32, "lr": 0.01,
                  "eval_batch_size": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """Tests that share small CPUs with other jobs: one torch thread, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_cfg():
    return tiny_config


@pytest.fixture
def write_yaml(tmp_path: Path):
    import yaml

    def write(data: dict, name: str = "sweep.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    rows = [
        {"system_prompt": "You are terse." if i % 2 else "", "question": f"What is {i} plus {i}?",
         "response": f"{i} plus {i} is {2 * i}."}
        for i in range(20)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def parse(data: dict):
    return parse_config(data, "test.yaml")


def build_tiny_gemma(path: Path, softcap: float | None = 2.0) -> Path:
    """A Gemma-3-shaped random model (Gemma3ForCausalLM from a Gemma3TextConfig, no download): tied embeddings
    scaled by sqrt(hidden), a sliding window shorter than the test blocks beside a full-attention layer, a final
    logit soft-cap small enough to bend the logits, and a tokenizer that starts every text with BOS (SmolLM2's,
    told to, as Gemma's does)."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from forgetscale.models import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("tiny-random-llama")[0])
    tokenizer.add_bos_token = True
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], max_position_embeddings=2048,
        final_logit_softcapping=softcap, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> str:
    """The folder of build_tiny_gemma's model: a `model.name` every path can load."""
    return str(build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma") / "model"))
