"""What bench_train_loss.py and bench_compile.py both start from: a LoRA config from their shared flags
(--model --weights --autocast --rank --batch --context --forget-tokens --threads), the base as sweeps load it,
and the fine-tuning and forgetting blocks cut with that model's own tokenizer."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from forgetscale.config import parse_config
from forgetscale.data import build_finetune_data, build_forgetting_blocks
from forgetscale.models import cache_root, load_configured_model


def add_setup_flags(parser: argparse.ArgumentParser, *, rank: int, forget_tokens: int, threads: int) -> None:
    """The flags lora_setup reads, with each benchmark's own defaults where they differ."""
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--weights", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--autocast", choices=("bf16", "none"), default="bf16")
    parser.add_argument("--rank", type=int, default=rank)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--forget-tokens", type=int, default=forget_tokens)
    parser.add_argument("--threads", type=int, default=threads)


def lora_setup(args: argparse.Namespace) -> tuple[Any, Any, Any, torch.nn.Module]:
    """(config, fine-tuning data, forgetting blocks, base model on CPU); torch's thread count set and its seed
    0 before the model loads (the data draw from their own generators, so a LoRA attached next starts alike)."""
    torch.set_num_threads(args.threads)
    cfg = parse_config({
        "model": {"name": args.model, "dtype": "bfloat16" if args.weights == "bf16" else "float32"},
        "forgetting": {"max_tokens": args.forget_tokens},
        "method": {"name": "lora", "ranks": [args.rank], "scaling": "rslora"},
        "train": {"batch_size": args.batch, "context_length": args.context, "threads": args.threads,
                  **({"dtype": "bfloat16"} if args.autocast == "bf16" else {})},
    })
    torch.manual_seed(0)
    loaded = load_configured_model(cfg, torch.device("cpu"))
    data = build_finetune_data(cfg.finetune, loaded.tokenizer, args.context, cache_root() / "data")
    forget = build_forgetting_blocks(cfg.forgetting, loaded.tokenizer, args.context, cache_root() / "data")
    return cfg, data, forget, loaded.model
