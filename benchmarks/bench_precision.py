"""bf16 on this CPU: is the KL a bf16 sweep stores within the seed-to-seed spread of fp32's, and what does it buy?

Runs the same small LoRA sweep (one rank, several seeds) three times in one process: fp32, bf16 autocast
(fp32 weights, `train.dtype: bfloat16`), and bf16 weights + autocast (`model.dtype: bfloat16`; the
adapter stays fp32). For each it prints the last checkpoint's KL and held-out L_ft per seed, their
seed-to-seed standard deviation, the mean paired difference from fp32 (same seed: same data order and
init), and as ratios to fp32's the seconds per training step and the rest of the sweep's seconds (measuring,
loading the model, the base predictions) per checkpoint.

    python benchmarks/bench_precision.py                     # SmolLM2, rank 8, 24 steps, seeds 0-2
    python benchmarks/bench_precision.py --model tiny-random-llama --steps 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from forgetscale.config import parse_config
from forgetscale.store import Store
from forgetscale.sweep import run_sweep

MODES = {
    "fp32": {},
    "bf16 autocast": {"train": {"dtype": "bfloat16"}},
    "bf16 weights + autocast": {"train": {"dtype": "bfloat16"}, "model": {"dtype": "bfloat16"}},
}


def config(args: argparse.Namespace, mode: dict) -> dict:
    model = {"name": args.model, **mode.get("model", {})}
    return {
        "name": "bench-precision", "model": model,
        "finetune": {"dataset": "embedded:news", "heldout_max_tokens": args.tokens},
        "forgetting": {"dataset": "embedded:wikipedia", "max_tokens": args.tokens},
        "method": {"name": "lora", "ranks": [args.rank], "scaling": "rslora", "alpha": 1},
        "train": {"steps": args.steps, "checkpoints": [0, args.steps], "batch_size": 4, "context_length": 64,
                  "lr": args.lr, "optimizer": "adafactor", "seeds": list(range(args.seeds)),
                  "save_adapters": "none", "threads": args.threads, **mode.get("train", {})},
    }


def run(cfg: dict) -> tuple[dict[int, dict[str, float]], float, float]:
    """Last-checkpoint rows per seed, seconds per training step, seconds per checkpoint (incl. model load)."""
    parsed = parse_config(cfg)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        run_sweep(parsed, Path(out), progress=False)
        total = time.perf_counter() - t
        with Store(Path(out), create=False) as store:
            frame = store.frame()
    last = frame[frame["step"] == frame["step"].max()]
    train_s = float(last["wall_s"].sum())
    steps = int(last["step"].iloc[0]) * len(last)
    checkpoints = len(frame)
    rows = {int(r["seed"]): r for r in last.to_dict("records")}
    return rows, train_s / steps, (total - train_s) / checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048, help="held-out and forgetting tokens each")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.model}: LoRA rank {args.rank} (rsLoRA, alpha 1), {args.steps} steps of 4 x 64 tokens, lr {args.lr}, "
          f"seeds 0-{args.seeds - 1}, {args.tokens} held-out and forgetting tokens, {args.threads} threads")
    results = {}
    for name, mode in MODES.items():
        results[name] = run(config(args, mode))
        print(f"  ran {name}", flush=True)
    base_rows, base_step, base_ckpt = results["fp32"]
    seeds = sorted(base_rows)
    for metric, label in (("forget_kl", "KL"), ("ft_loss", "held-out L_ft")):
        print(f"\n{label} at step {args.steps}: " + "   ".join(f"seed {s}" for s in seeds)
              + "   seed spread (sd)   mean diff vs fp32 (paired)")
        fp32 = np.array([base_rows[s][metric] for s in seeds])
        for name, (rows, _, _) in results.items():
            values = np.array([rows[s][metric] for s in seeds])
            diff = values - fp32
            print(f"  {name:<24} " + "  ".join(f"{v:.4f}" for v in values)
                  + f"   {values.std(ddof=1):.4f}" + ("" if name == "fp32" else f"   {diff.mean():+.4f} "
                                                       f"(max |{np.abs(diff).max():.4f}|)"))
    print("\nspeed (ratio to fp32, same run):")
    for name, (_, step_s, ckpt_s) in results.items():
        print(f"  {name:<24} {step_s:.3f} s/step ({base_step / step_s:.2f}x)   "
              f"{ckpt_s:.2f} s of the rest per checkpoint ({base_ckpt / ckpt_s:.2f}x)")


if __name__ == "__main__":
    main()
