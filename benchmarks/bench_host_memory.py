"""train.allocator: the same small SmolLM2 sweep with glibc's defaults (`system`) and with freed memory kept in
the process (`retain`), each in a fresh process, alternating, in one run. Prints per variant and round:
seconds per training step (the stored wall_s), seconds per checkpoint, the whole sweep, minor page faults
and peak RSS, then the mean ratio system / retain.

    python benchmarks/bench_host_memory.py                   # bf16 weights, LoRA r4, 16 steps, 2 rounds
    python benchmarks/bench_host_memory.py --rounds 3 --steps 24
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("system", "retain")


def child(args: argparse.Namespace) -> None:
    from forgetscale import train
    from forgetscale.config import parse_config
    from forgetscale.store import Store
    from forgetscale.sweep import run_sweep

    cfg = parse_config({
        "name": "bench-host-memory", "model": {"name": args.model, "dtype": "bfloat16"},
        "finetune": {"heldout_max_tokens": 1024}, "forgetting": {"max_tokens": args.forget_tokens},
        "method": {"name": "lora", "ranks": [4], "scaling": "rslora"},
        "train": {"steps": args.steps, "checkpoints": [0, args.steps // 4, args.steps // 2, args.steps],
                  "batch_size": 4, "context_length": 128, "save_adapters": "none", "threads": args.threads,
                  "allocator": args.child},
    })
    measuring = [0.0, 0]
    original = train.checkpoint_metrics

    def timed(*a, **k):
        started = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            measuring[0] += time.perf_counter() - started
            measuring[1] += 1

    train.checkpoint_metrics = timed
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        run_sweep(cfg, Path(out), progress=False)
        total = time.perf_counter() - started
        with Store(Path(out), create=False) as store:
            wall = float(store.frame()["wall_s"].max())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps({"step_s": wall / args.steps, "checkpoint_s": measuring[0] / max(1, measuring[1]),
                                  "total_s": total, "faults": usage.ru_minflt, "peak_gb": usage.ru_maxrss / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--forget-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"{args.model}: bf16 weights, LoRA r4, {args.steps} steps of 4 x 128 tokens, 4 checkpoints "
          f"(1,024 held-out + 1,024 probe + {args.forget_tokens} forgetting tokens), {args.threads} threads; "
          "each variant in a fresh process, alternating")
    print(f"{'round':<7}{'allocator':<11}{'s/step':>8}{'s/ckpt':>8}{'sweep s':>9}{'faults':>12}{'peak GB':>9}")
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for round_ in range(1, args.rounds + 1):
        for variant in VARIANTS:
            argv = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--forget-tokens",
                    str(args.forget_tokens), "--threads", str(args.threads), "--child", variant]
            done = subprocess.run(argv, capture_output=True, text=True)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode != 0 or not line:
                sys.exit(f"{variant} failed:\n{done.stderr[-2000:]}")
            r = json.loads(line[-1].removeprefix("RESULT "))
            results[variant].append(r)
            print(f"{round_:<7}{variant:<11}{r['step_s']:>8.3f}{r['checkpoint_s']:>8.2f}{r['total_s']:>9.1f}"
                  f"{r['faults']:>12,}{r['peak_gb']:>9.2f}")

    def mean(variant: str, key: str) -> float:
        return sum(r[key] for r in results[variant]) / len(results[variant])

    print("system / retain, mean over rounds: " + ", ".join(
        f"{key} {mean('system', key) / mean('retain', key):.2f}x" for key in ("step_s", "checkpoint_s", "total_s",
                                                                            "faults", "peak_gb")))


if __name__ == "__main__":
    main()
