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
