"""Attention kernels on this CPU: a SmolLM2 LoRA training step (forward + backward) and a measuring pass with
transformers' SDPA attention against its eager attention, side by side in one run (alternating), at several
sequence lengths (the same 512 tokens per step), in bf16 (weights + autocast) and in fp32. Prints seconds
per step and the ratio sdpa / eager: where eager wins is what `model.attention: auto` picks
(forgetscale.models.attention_implementation).

    python benchmarks/bench_attention.py                       # lengths 128 256 512 1024, bf16 and fp32
    python benchmarks/bench_attention.py --lengths 128 --precisions bf16 --rounds 3
"""

from __future__ import annotations

import argparse
import time

import torch

from forgetscale.config import parse_config
from forgetscale.data import build_finetune_data, build_forgetting_blocks
from forgetscale.methods.attach import attach, upcast_trainable
from forgetscale.metric import head, sums
from forgetscale.models import cache_root, load_configured_model

KERNELS = ("sdpa", "eager")


def train_step(model, b, optimizer, device, dtype) -> None:
    model.train()
    with sums.autocast(device, dtype):
        loss = head.next_token_loss(model, b.input_ids, b.attention_mask, b.labels)
    loss.backward()
    optimizer.zero_grad(set_to_none=True)  # no update: every kernel times the same weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--precisions", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per training step (batch = tokens / length)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per kernel per round")
    parser.add_argument("--rounds", type=int, default=2, help="the kernels alternate this many times")
    parser.add_argument("--forget-tokens", type=int, default=2048, help="measuring pass (at the first length only)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(f"{args.model}: LoRA r4, {args.tokens} tokens per step, {args.threads} threads; seconds per step "
          f"(mean of {args.rounds} rounds x {args.steps} steps, kernels alternating)")
    print(f"{'precision':<10}{'length':>7}{'batch':>6}{'sdpa s':>9}{'eager s':>9}{'sdpa/eager':>12}")
    for precision in args.precisions:
        half = precision == "bf16"
        cfg = parse_config({
            "model": {"name": args.model, "dtype": "bfloat16" if half else "float32", "attention": "sdpa"},
            "forgetting": {"max_tokens": args.forget_tokens},
            "method": {"name": "lora", "ranks": [4], "scaling": "rslora"},
            "train": {"context_length": max(args.lengths), "threads": args.threads,
                      **({"dtype": "bfloat16"} if half else {})},
        })
        dtype = torch.bfloat16 if half else None
        loaded = load_configured_model(cfg, device)
        torch.manual_seed(0)
        model = attach(loaded.model, cfg.method[0], 4)
        upcast_trainable(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        for length in args.lengths:
            batch = max(1, args.tokens // length)
            data = build_finetune_data(cfg.finetune, loaded.tokenizer, length, cache_root() / "data")
            b = data.train.select(slice(0, batch))
            step_args = (model, b, optimizer, device, dtype)
            seconds = {k: 0.0 for k in KERNELS}
            for kernel in KERNELS:  # warm-up, untimed
                loaded.model.set_attn_implementation(kernel)
                train_step(*step_args)
            for _ in range(args.rounds):
                for kernel in KERNELS:
                    loaded.model.set_attn_implementation(kernel)
                    started = time.perf_counter()
                    for _ in range(args.steps):
                        train_step(*step_args)
                    seconds[kernel] += (time.perf_counter() - started) / (args.rounds * args.steps)
            s, e = seconds["sdpa"], seconds["eager"]
            print(f"{precision:<10}{length:>7}{batch:>6}{s:>9.3f}{e:>9.3f}{s / e:>11.2f}x")
        length = args.lengths[0]
        forget = build_forgetting_blocks(cfg.forgetting, loaded.tokenizer, length, cache_root() / "data")
        passes = {k: 0.0 for k in KERNELS}
        model.eval()
        for _ in range(args.rounds):
            for kernel in KERNELS:
                loaded.model.set_attn_implementation(kernel)
                started = time.perf_counter()
                sums.score(model, forget, cfg.train.eval_batch_size, device, dtype)
                passes[kernel] += (time.perf_counter() - started) / args.rounds
        s, e = passes["sdpa"], passes["eager"]
        print(f"{precision:<10}{length:>7}{'':>6}{s:>9.3f}{e:>9.3f}{s / e:>11.2f}x   measuring pass, "
              f"{forget.loss_tokens} tokens, eval batch {cfg.train.eval_batch_size}")


if __name__ == "__main__":
    main()
