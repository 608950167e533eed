"""Seconds per forgetting measurement on 1 and 2 processes (the same tokens), and the memory of the base
reference each rank holds: SmolLM2 + a seeded LoRA, measured by ForgettingMeter under
`torchrun --standalone --nproc_per_node N` (gloo on CPU, one torch thread per process).

    python benchmarks/bench_distributed.py                        # SmolLM2, 1,024 tokens, 1 and 2 processes
    python benchmarks/bench_distributed.py --model tiny-random-llama --tokens 256

Per process count it prints: the base reference's build seconds, the median seconds of one measurement
(--repeats), the reference's bytes on each rank (the [tokens x vocabulary] fp32 table), each rank's peak
resident memory, and whether every rank's KL equals the one-process KL.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    from peft import LoraConfig, get_peft_model

    from forgetscale.metric import ForgettingMeter
    from forgetscale.models import load_model

    base = load_model(args.model)
    torch.manual_seed(0)
    model = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    start = time.perf_counter()
    meter = ForgettingMeter.build(model, base.tokenizer, max_tokens=args.tokens, block_length=args.block_length,
                                  batch_size=args.batch)
    build = time.perf_counter() - start
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = meter.measure(model)
        seconds.append(time.perf_counter() - start)
    rank = int(os.environ.get("RANK", "0"))
    report = {"rank": rank, "build_s": build, "measure_s": statistics.median(seconds), "kl": result.kl,
              "tokens": result.tokens, "reference_bytes": meter.ref.probs.numel() * meter.ref.probs.element_size(),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--block-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    for n in args.processes:
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       __file__, "--worker", "--out", out, "--model", args.model, "--tokens", str(args.tokens),
                       "--block-length", str(args.block_length), "--batch", str(args.batch),
                       "--repeats", str(args.repeats)]
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows[n] = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    one = rows[min(rows)][0]["kl"]
    print(f"{args.model}: {rows[min(rows)][0]['tokens']} forgetting tokens, one torch thread per process")
    print(f"{'processes':>9} {'build s':>8} {'measure s':>10} {'reference MB / rank':>20} {'peak RSS MB / rank':>19} "
          f"{'KL':>10} {'= 1 proc':>9}")
    for n, ranks in rows.items():
        build = max(r["build_s"] for r in ranks)
        measure = max(r["measure_s"] for r in ranks)
        ref = "/".join(f"{r['reference_bytes'] / 1e6:.1f}" for r in ranks)
        rss = "/".join(f"{r['peak_rss_bytes'] / 1e6:.0f}" for r in ranks)
        same = all(abs(r["kl"] - one) <= 1e-6 * abs(one) for r in ranks)
        print(f"{n:>9} {build:>8.2f} {measure:>10.2f} {ref:>20} {rss:>19} {ranks[0]['kl']:>10.6f} {str(same):>9}")


if __name__ == "__main__":
    main()
