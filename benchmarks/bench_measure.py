"""Seconds per measured adapter (ForgettingMeter.measure: forward pass + the KL/CE sums + per-block intervals)
against one plain forward pass over the same tokens, on the embedded SmolLM2 with a LoRA r=8 adapter.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_measure.py [--max-tokens 4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--block-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    from forgetscale.metric import ForgettingMeter
    from forgetscale.models import load_model

    base = load_model(args.model)
    started = time.perf_counter()
    ref = ForgettingMeter.build(base.model, base.tokenizer, max_tokens=args.max_tokens, block_length=args.block_length)
    build_s = time.perf_counter() - started
    torch.manual_seed(0)
    tuned = get_peft_model(base.model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    tuned.eval()
    blocks = ref.blocks
    forward = []
    for _ in range(2):
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(blocks), ref.batch_size):
                part = blocks.select(slice(start, start + ref.batch_size))
                tuned(input_ids=part.input_ids, attention_mask=part.attention_mask)
        forward.append(time.perf_counter() - started)
    measured = []
    for _ in range(2):
        started = time.perf_counter()
        ref.measure(tuned)
        measured.append(time.perf_counter() - started)
    f, m = min(forward), min(measured)
    print(f"{args.model}: {ref.ref.tokens} tokens in {len(blocks)} blocks, {args.threads} thread(s); reference "
          f"built in {build_s:.2f} s")
    print(f"one forward pass: {f:.2f} s; measured adapter: {m:.2f} s ({m / f:.2f}x)")


if __name__ == "__main__":
    main()
