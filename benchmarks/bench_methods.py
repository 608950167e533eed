"""Step time and peak memory per fine-tuning method on the embedded model, as ratios to LoRA rank 8.

Each method runs in its own process (so peak RSS is its own): load SmolLM2-135M, attach the method,
take `--steps` Adafactor steps at the demo's settings (4 x 64 tokens), report the median step time
after the first and the process's peak resident memory.

    python benchmarks/bench_methods.py [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = [
    ("lora-r8", {"name": "lora", "ranks": [8]}, 8),
    ("lora-r2", {"name": "lora", "ranks": [2]}, 2),
    ("lora-r32", {"name": "lora", "ranks": [32]}, 32),
    ("lora-attn-r64", {"name": "lora", "ranks": [64], "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, 64),
    ("dora-r8", {"name": "dora", "ranks": [8]}, 8),
    ("ia3", {"name": "ia3"}, None),
    ("top_layers-3", {"name": "top_layers", "k": 3}, None),
    ("full", {"name": "full"}, None),
]


def one(method: dict, rank: int | None, steps: int) -> dict:
    import torch

    from forgetscale.config import parse_config
    from forgetscale.methods.attach import attach, trainable_parameters
    from forgetscale.models import EMBEDDED, load_model
    from forgetscale.train import make_optimizer

    spec = parse_config({"method": method}).methods[0]
    torch.manual_seed(0)
    model = attach(load_model(EMBEDDED).model, spec, rank)
    optimizer = make_optimizer("adafactor", [p for p in model.parameters() if p.requires_grad], 1e-4, 0.0)
    model.train()
    ids = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    rest = sorted(times[1:])
    return {"params": trainable_parameters(model), "step_s": rest[len(rest) // 2],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, rank = json.loads(args.child)
        print(json.dumps(one(method, rank, args.steps)))
        return
    results = {}
    for label, method, rank in METHODS:
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", json.dumps([method, rank])],
                             capture_output=True, text=True, check=True)
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["lora-r8"]
    print(f"{'method':<15} {'P':>12} {'step s':>7} {'x lora-r8':>9} {'peak RSS GB':>11} {'x lora-r8':>9}")
    for label, r in results.items():
        print(f"{label:<15} {r['params']:>12,} {r['step_s']:>7.2f} {r['step_s'] / base['step_s']:>9.2f} "
              f"{r['peak_rss_gb']:>11.2f} {r['peak_rss_gb'] / base['peak_rss_gb']:>9.2f}")


if __name__ == "__main__":
    main()
