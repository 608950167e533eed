"""Training and checkpoint-evaluation speed on the embedded model, as ratios measured in one run.

Prints: this machine's fp32 matmul throughput; LoRA training throughput (tokens/s) and achieved
FLOP/s (4 x params x tokens per step: forward + input gradients, frozen weights need no weight
gradient) as a fraction of the matmul figure; the cost of one forgetting checkpoint relative to one
training step; and how many times the base predictions were computed during a 3-checkpoint run.

    python benchmarks/bench_train.py [--rank 8] [--batch 4] [--context 64] [--steps 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from forgetscale import sweep
from forgetscale.config import parse_config
from forgetscale.data import batch_indices
from forgetscale.methods.attach import attach
from forgetscale.metric import references, sums
from forgetscale.models import EMBEDDED, load_model
from forgetscale.store import RunRecord


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    cfg = parse_config({
        "finetune": {"heldout_max_tokens": 1024}, "forgetting": {"max_tokens": 2048},
        "method": {"name": "lora", "ranks": [args.rank]},
        "train": {"steps": args.steps, "checkpoints": [0, args.steps // 2, args.steps], "batch_size": args.batch,
                  "context_length": args.context},
    })
    peak = matmul_flops()
    print(f"threads: {torch.get_num_threads()}")
    print(f"fp32 matmul (2048^3): {peak / 1e9:.1f} GFLOP/s")

    # a full run through the real code path, counting base-prediction passes
    calls = {"n": 0}
    real_reference = references.memory_reference

    def counting_reference(*a, **k):
        calls["n"] += 1
        return real_reference(*a, **k)

    references.memory_reference = counting_reference  # what references.build calls for memory
    with tempfile.TemporaryDirectory() as out:
        ctx = sweep.build_context(cfg, Path(out))
        store = sweep.Store(out)
        sweep.check_same_sweep(store, cfg)
        plan = sweep.plan_runs(cfg)[0]
        store.add_run(RunRecord(run_id=plan.run_id, model=EMBEDDED, dataset="news", method="lora",
                                method_config={}, rank=args.rank, trainable_params=None, seed=0, config={}))
        started = time.perf_counter()
        sweep.train_run(plan, ctx, store)
        run_s = time.perf_counter() - started
        rows = store.checkpoints()
    print(f"base-prediction passes for a {len(rows)}-checkpoint run: {calls['n']} (forgetting set + held-out, once per sweep)")

    # steady-state training step and checkpoint cost, side by side
    model = attach(load_model(EMBEDDED).model, cfg.methods[0], args.rank)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for step in range(args.steps):
        batch = ctx.data.train.select(batch_indices(step, args.batch, len(ctx.data.train), 0))
        started = time.perf_counter()
        model(input_ids=batch.input_ids, labels=batch.labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    tokens = args.batch * args.context
    achieved = 4 * params * tokens / step_s
    print(f"LoRA r{args.rank} step ({args.batch} x {args.context} tokens): {step_s:.2f} s, {tokens / step_s:.0f} tokens/s")
    print(f"achieved {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of matmul throughput")

    model.eval()
    started = time.perf_counter()
    sums.score(model, ctx.data.heldout, 8, ctx.device, None, ctx.heldout_ref)
    sums.score(model, ctx.data.train_probe, 8, ctx.device, None)
    sums.score(model, ctx.forgetting, 8, ctx.device, None, ctx.forgetting_ref)
    check_s = time.perf_counter() - started
    eval_tokens = ctx.data.heldout.loss_tokens + ctx.data.train_probe.loss_tokens + ctx.forgetting.loss_tokens
    print(f"one checkpoint ({eval_tokens} tokens evaluated): {check_s:.2f} s = {check_s / step_s:.1f} training steps")
    print(f"whole {args.steps}-step run with {len(rows)} checkpoints: {run_s:.1f} s")


if __name__ == "__main__":
    main()
