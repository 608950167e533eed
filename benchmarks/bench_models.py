"""One design, two models: load time, training step time and measuring time per checkpoint of SmolLM2-135M-Instruct
and Gemma 3 270M (extra [gemma]), each model in a fresh process (peak RSS is per process). The design is the demo's
(configs/cross-model-*.yaml): LoRA r4 (rsLoRA), batches of 8 x 64 news tokens, bf16 weights and autocast, the loss
through the chunked head, and a checkpoint's measuring = one pass over the held-out news (L_ft) plus one over the
2,048 forgetting tokens against the in-memory base reference (what a sweep's checkpoint does).

    python benchmarks/bench_models.py --threads 1                # both models, the cached (converted) weights
    python benchmarks/bench_models.py --models gemma3-270m --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(name: str, steps: int, threads: int, forget_tokens: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from forgetscale.config import parse_config
    from forgetscale.data import build_finetune_data, build_forgetting_blocks
    from forgetscale.methods.attach import attach, upcast_trainable
    from forgetscale.metric import head, references, sums
    from forgetscale.models import cache_root, load_configured_model

    cfg = parse_config({
        "model": {"name": name, "dtype": "bfloat16"},
        "finetune": {"dataset": "embedded:news", "heldout_max_tokens": 2048},
        "forgetting": {"max_tokens": forget_tokens},
        "method": {"name": "lora", "ranks": [4], "scaling": "rslora", "alpha": 1},
        "train": {"batch_size": 8, "context_length": 64, "threads": threads, "dtype": "bfloat16"},
    })
    device, dtype = torch.device("cpu"), torch.bfloat16
    started = time.perf_counter()
    loaded = load_configured_model(cfg, device)
    load_s = time.perf_counter() - started
    data = build_finetune_data(cfg.finetune, loaded.tokenizer, 64, cache_root() / "data")
    forget = build_forgetting_blocks(cfg.forgetting, loaded.tokenizer, 64, cache_root() / "data")
    started = time.perf_counter()
    ref = references.memory_reference(loaded.model, forget, 8, device, dtype)
    reference_s = time.perf_counter() - started
    params = sum(p.numel() for p in loaded.model.parameters())  # the base's, before the adapter
    torch.manual_seed(0)
    model = attach(loaded.model, cfg.method[0], 4)
    upcast_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-3)
    times = []
    for i in range(steps + 1):  # the first step is a warm-up
        b = data.train.select(slice(i * 8, (i + 1) * 8))
        started = time.perf_counter()
        model.train()
        with sums.autocast(device, dtype):
            loss = head.next_token_loss(model, b.input_ids, b.attention_mask, b.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    model.eval()
    workspace = head.LogitsWorkspace()
    started = time.perf_counter()
    heldout = sums.score(model, data.heldout, 8, device, dtype, workspace=workspace)
    forgetting = sums.score(model, forget, 8, device, dtype, ref, workspace=workspace)
    measure_s = time.perf_counter() - started
    return {"model": name, "vocabulary": references.vocabulary(model),
            "params": params, "load_s": round(load_s, 1),
            "reference_build_s": round(reference_s, 1), "step_s": round(sum(times[1:]) / steps, 2),
            "checkpoint_measure_s": round(measure_s, 1), "heldout_tokens": heldout["tokens"],
            "forget_tokens": forgetting["tokens"], "kl_after_steps": forgetting["kl"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--steps", type=int, default=4, help="timed training steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--forget-tokens", type=int, default=2048)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.steps, args.threads, args.forget_tokens)))
        return
    for name in args.models:
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--threads", str(args.threads),
               "--forget-tokens", str(args.forget_tokens)]
        print(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
