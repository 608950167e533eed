"""The GPU path end to end: the embedded model in bf16 on one CUDA device, and the figures README quotes.

Prints: the device; its measured bf16 matmul throughput; seconds per training step and MFU (achieved
4 x params x tokens FLOP/s, forward + input gradients, over the measured matmul figure and, where the
device is known, over its datasheet peak); peak CUDA memory; KL at step 0 (must be exactly 0); and
resume-equality: a second sweep of the same config killed after its middle checkpoint and resumed,
compared row by row with the uninterrupted one (max |difference| per column; CUDA kernels may not be
bitwise deterministic, so the figure, not a pass/fail, is the result).

    bash benchmarks/gpu_check.sh                                     # SmolLM2, LoRA r8, 40 steps of 8 x 512
    python benchmarks/gpu_check.py --device cpu --model tiny-random-llama --steps 4 --batch 2 --context 64
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "L40S": 362e12}
VALUES = ("ft_loss", "ft_loss_train", "forget_ce", "forget_ce_hard", "forget_kl", "ft_kl")


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config(args: argparse.Namespace) -> dict:
    return {
        "name": "gpu-check", "model": {"name": args.model, "dtype": "auto"},
        "finetune": {"dataset": "embedded:news", "heldout_max_tokens": 4096},
        "forgetting": {"dataset": "embedded:wikipedia", "max_tokens": 4096},
        "method": {"name": "lora", "ranks": [args.rank]},
        "train": {"steps": args.steps, "checkpoints": [0, args.steps // 2, args.steps], "batch_size": args.batch,
                  "context_length": args.context, "lr": 1e-3, "optimizer": "adafactor", "seed": 0,
                  "device": args.device, "dtype": "auto", "save_adapters": "none"},
    }


def rows(out: Path) -> dict[int, dict]:
    from forgetscale.store import Store

    with Store(out, create=False) as store:
        return {int(r["step"]): r for r in store.checkpoints()}


def killed_and_resumed(config_path: Path, out: Path, kill_at: int) -> tuple[dict[int, dict], list[int]]:
    """Run the sweep in a child process, SIGKILL it once step `kill_at` is stored, then resume it; the rows and
    the steps stored when the kill landed."""
    from forgetscale.store import Store

    cmd = [sys.executable, "-m", "forgetscale", "sweep", str(config_path), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None:
        if (out / "results.sqlite").exists():
            with Store(out, create=False) as store:
                if kill_at in {r["step"] for r in store.checkpoints()}:
                    break
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = sorted(rows(out)) if (out / "results.sqlite").exists() else []
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return rows(out), stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
                 "pass --device cpu for a smoke run")

    from forgetscale.config import parse_config
    from forgetscale.models import compute_dtype, load_model
    from forgetscale.sweep import run_sweep

    cfg = config(args)
    parsed = parse_config(cfg)
    dtype = compute_dtype(parsed, device) or torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = matmul_flops(device, dtype, 8192 if device.type == "cuda" else 1024)
    print(f"device: {name}; compute dtype {dtype}; measured {dtype} matmul {peak / 1e12:.1f} TFLOP/s")
    params = sum(p.numel() for p in load_model(args.model, device="cpu").model.parameters())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run_sweep(parsed, tmp / "clean", progress=False)
        clean = rows(tmp / "clean")
        memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        last = clean[args.steps]
        step_s = last["wall_s"] / args.steps
        tokens = last["tokens_seen"] / args.steps
        achieved = 4 * params * tokens / step_s
        datasheet = next((v for k, v in PEAK_BF16.items() if k in name), None)
        print(f"LoRA r{args.rank}, {args.batch} x {args.context} tokens per step: {step_s * 1e3:.1f} ms/step, "
              f"{tokens / step_s:,.0f} tokens/s")
        print(f"MFU: {achieved / 1e12:.2f} TFLOP/s = {achieved / peak:.1%} of the measured matmul"
              + (f", {achieved / datasheet:.1%} of the datasheet {datasheet / 1e12:.0f} TFLOP/s" if datasheet else ""))
        if memory is not None:
            print(f"peak CUDA memory: {memory / 2**30:.2f} GiB")
        print(f"KL at step 0: {clean[0]['forget_kl']!r} (exactly 0 expected); "
              f"KL at step {args.steps}: {last['forget_kl']:.5f}")
        config_path = tmp / "gpu-check.yaml"
        config_path.write_text(yaml.safe_dump(cfg))
        resumed, stored = killed_and_resumed(config_path, tmp / "resumed", args.steps // 2)
        if sorted(resumed) != sorted(clean):
            print(f"resume: FAILED, steps {sorted(resumed)} vs {sorted(clean)}")
            sys.exit(1)
        worst = {c: max(abs(resumed[s][c] - clean[s][c]) for s in clean) for c in VALUES}
        same = all(v == 0 for v in worst.values())
        print("resume after a kill with steps {} stored: {}".format(
            stored, "bit-identical rows" if same else
            "max |difference| " + ", ".join(f"{c} {v:.2e}" for c, v in worst.items())))


if __name__ == "__main__":
    main()
