"""Training-time overhead of every mitigation arm against no mitigation, on the embedded model.

Builds the sweep context of configs/mitigations.yaml (the demo's data and schedule: LoRA r8, Adafactor,
4 x 64 tokens per step), attaches one model per training arm, then takes the update steps of all arms
in turn, step by step (none, replay, ..., none, replay, ...), so any drift of the machine (another
process starting or stopping) hits every arm alike. Each update step is train_run's: the arm's batch
mixing, forward/backward on the micro-batches, the arm's penalty term, clipping, Adafactor. Prints
the median step time per arm (first step excluded) and its ratio to 'none', and the one-time costs
(self-generated text, Fisher) from RUN_DIR/mitigation_inputs.json. The scale arm trains nothing.

    python benchmarks/bench_mitigations.py [--steps 8] [--config configs/mitigations.yaml] [--out /tmp/bench-mit]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def update_step(model, hooks, ctx, optimizer, params, step: int, seed: int) -> float:
    """One update step exactly as train_run takes it (CPU, fp32: no loss scaling)."""
    from forgetscale.data import batch_indices
    from forgetscale.metric.sums import autocast
    from forgetscale.train import step_seed

    tcfg = ctx.config.train
    model.train()
    started = time.perf_counter()
    torch.manual_seed(step_seed(seed, step))
    index = batch_indices(step, tcfg.batch_size * tcfg.grad_accum, len(ctx.data.train), seed)
    blocks = hooks.mix(step, ctx.data.train.select(index))
    for start in range(0, len(blocks), tcfg.batch_size):
        batch = blocks.select(slice(start, start + tcfg.batch_size))
        with autocast(ctx.device, ctx.dtype):
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        (loss / tcfg.grad_accum).backward()
    with autocast(ctx.device, ctx.dtype):
        penalty = hooks.penalty(model, step)
    if penalty is not None:
        penalty.backward()
    if tcfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "mitigations.yaml"))
    parser.add_argument("--out", default="/tmp/bench-mitigations", help="RUN_DIR for the cached self-generated text")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    parser.add_argument("--gen-samples", type=int, default=64,
                        help="also time sampling this many sequences from the base model when an arm "
                        "trains on self-generated text (0: skip)")
    args = parser.parse_args()

    from forgetscale.config import load_config
    from forgetscale.methods.attach import attach
    from forgetscale.mitigations.runtime import hook_setup
    from forgetscale.sweep import build_context, plan_runs
    from forgetscale.train import make_optimizer

    overrides = {"train.threads": args.threads} if args.threads else None
    cfg = load_config(args.config, overrides)
    started = time.perf_counter()
    ctx = build_context(cfg, Path(args.out))
    print(f"context (data, base predictions, arm inputs) built in {time.perf_counter() - started:.0f} s")
    seed = cfg.train.seed_list[0]
    plans = [p for p in plan_runs(cfg) if p.seed == seed and p.source is None]
    plans = [p for i, p in enumerate(plans) if p.method.name == plans[0].method.name and p.rank == plans[0].rank]
    arms = []
    for plan in plans:
        torch.manual_seed(plan.seed)
        model = attach(ctx.load_base(), plan.method, plan.rank).to(ctx.device)
        hooks = hook_setup(plan, ctx)(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg.train.optimizer, params, plan.method.lr or cfg.train.lr, cfg.train.weight_decay)
        arms.append((plan.mitigation.tag(), model, hooks, optimizer, params, []))
    for step in range(args.steps):
        for _tag, model, hooks, optimizer, params, times in arms:
            times.append(update_step(model, hooks, ctx, optimizer, params, step, seed))
    median = {tag: statistics.median(times[1:]) for tag, *_, times in arms}
    print(f"{args.steps} interleaved update steps per arm, {torch.get_num_threads()} threads; median of steps 2-{args.steps}")
    print(f"{'arm':<34} {'step s':>7} {'x none':>7}")
    for tag, t in median.items():
        print(f"{tag:<34} {t:>7.3f} {t / median['none']:>7.2f}")
    inputs = Path(args.out) / "mitigation_inputs.json"
    if inputs.is_file():
        for key, info in json.loads(inputs.read_text()).items():
            seconds = info.get("generation_seconds", info.get("seconds"))
            if seconds is not None:
                print(f"one-time: {key}: {seconds:.1f} s (= {seconds / median['none']:.0f} 'none' steps)"
                      + (" [as recorded when the text was generated]" if key.startswith("generated") else ""))
    # sampling is a one-time cost of the arms that train on the base's own text; without one, nothing to time
    sampled = any(p.mitigation.name == "self_replay" or getattr(p.mitigation, "source", None) == "self"
                  for p in plans)
    if args.gen_samples and sampled:
        from forgetscale.mitigations.inputs import generate_blocks
        from forgetscale.models import load_model

        base = load_model(cfg.model.name, cache_dir=cfg.model.cache_dir)
        started = time.perf_counter()
        generate_blocks(base.model, base.tokenizer, args.gen_samples, cfg.train.context_length, 1.0, 0, ctx.device)
        seconds = time.perf_counter() - started
        print(f"one-time: sampling {args.gen_samples} sequences of {cfg.train.context_length} tokens from the base: "
              f"{seconds:.1f} s (= {seconds / median['none']:.0f} 'none' steps)")


if __name__ == "__main__":
    main()
