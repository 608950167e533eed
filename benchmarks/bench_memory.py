"""Peak host memory of LoRA training on the embedded model (SmolLM2-135M-Instruct) per precision mode, each
mode in a fresh process (peak RSS is per process): fp32; bf16 base weights (model.dtype=bfloat16, adapters
fp32, bf16 autocast); bf16 + train.gradient_checkpointing. 4-bit (model.quantization=4bit) needs CUDA and
bitsandbytes: it is reported as not runnable on a CPU-only machine.

The run is forgetscale's own path: load_base_weights, attach, upcast_trainable, compute_dtype's autocast,
enable_gradient_checkpointing; Adafactor, `--steps` update steps of `--batch` x `--length` tokens.

    python benchmarks/bench_memory.py [--batch 8] [--length 512] [--steps 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = {"fp32": {}, "bf16 weights": {"model.dtype": "bfloat16"},
         "bf16 + checkpointing": {"model.dtype": "bfloat16", "train.gradient_checkpointing": True},
         "4-bit (QLoRA)": {"model.dtype": "bfloat16", "model.quantization": "4bit"}}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(mode: str, batch: int, length: int, steps: int, threads: int) -> dict:
    import torch

    from forgetscale.config import parse_config
    from forgetscale.errors import ForgetscaleError
    from forgetscale.methods import METHODS
    from forgetscale.methods.attach import attach, upcast_trainable
    from forgetscale.metric.sums import autocast
    from forgetscale.models import compute_dtype, enable_gradient_checkpointing, load_base_weights
    from forgetscale.train import make_optimizer

    torch.set_num_threads(threads)
    settings = MODES[mode]
    model_cfg = {"name": "smollm2-135m-instruct", "dtype": settings.get("model.dtype", "auto"),
                 "quantization": settings.get("model.quantization", "none")}
    cfg = parse_config({"model": model_cfg, "train": {"device": "cpu", "threads": threads}})
    device = torch.device("cpu")
    start_rss = rss_mb()
    try:
        if cfg.model.quantization != "none":
            from forgetscale.models import check_4bit

            check_4bit(device)
        base = load_base_weights(cfg, device)
    except ForgetscaleError as err:
        return {"mode": mode, "error": str(err)}
    loaded_rss = rss_mb()
    if settings.get("train.gradient_checkpointing"):
        enable_gradient_checkpointing(base)
    torch.manual_seed(0)
    model = attach(base, METHODS.get("lora")(ranks=[8]), 8)
    upcast_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("adafactor", params, 1e-3, 0.0)
    dtype = compute_dtype(cfg, device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    model.train()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        with autocast(device, dtype):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"mode": mode, "python_torch_mb": round(start_rss), "after_load_mb": round(loaded_rss),
            "peak_rss_mb": round(rss_mb()), "weights_mb": round(weights / 2**20),
            "s_per_step": round(min(times), 2), "loss": round(float(loss), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one(args.mode, args.batch, args.length, args.steps, args.threads)))
        return
    print(f"SmolLM2-135M-Instruct, LoRA r8, batch {args.batch} x {args.length} tokens, {args.steps} steps, "
          f"{args.threads} thread(s); peak RSS per fresh process")
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--batch", str(args.batch), "--length", str(args.length),
               "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)


if __name__ == "__main__":
    main()
