"""Where a LoRA step and a measuring pass spend their time, against this machine's matmul rate at the model's own
shapes, and what torch.compile (inductor) buys, eager and compiled alternating on one model in one process
(`torch.compiler.set_stance("force_eager")` runs the same module eagerly).

Prints: the matmul rate (GFLOP/s) at every matmul shape of a step in fp32 and in the compute precision, and
the "roofline" time of a step and of a pass at those rates; then seconds per training step and per measuring
pass for each variant, as a share of the matmul rate (FLOPs: 4 x parameters x tokens per step, 2 x per
pass, the issue's convention, and the shape-by-shape roofline), the compile time, and the numbers of both
variants side by side (training loss and LoRA gradients on the same batch; measuring NLL, CE and KL).

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --threads 1                   # SmolLM2 bf16, compile layers
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --threads 1 --compile model  # the whole decoder body
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --threads 1 --weights fp32 --autocast none
    python benchmarks/bench_compile.py --model tiny-random-llama --steps 2 --rounds 1 --forget-tokens 256
"""

from __future__ import annotations

import argparse
import time

import torch
from lora_setup import add_setup_flags, lora_setup

from forgetscale.compiled import compile_model, compiled, matmul_rate
from forgetscale.methods.attach import attach, skip_lora_input_casts, upcast_trainable
from forgetscale.metric import head, references, sums


def linear_shapes(model: torch.nn.Module) -> dict[tuple[int, int], int]:
    """(in, out) -> how many Linear layers of the frozen base have that shape (the head included once)."""
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            key = (module.in_features, module.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_flags(parser, rank=16, forget_tokens=2048, threads=1)
    parser.add_argument("--compile", choices=("layers", "model"), default="layers",
                        help="layers: each decoder layer (one graph, reused); model: the whole decoder body")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=2, help="eager and compiled alternate this many times")
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--no-measure-compile", action="store_true", help="time the measuring pass eagerly only")
    parser.add_argument("--grads-only", action="store_true",
                        help="only the numbers: eager and compiled LoRA gradients against an fp32 step of the same weights")
    parser.add_argument("--profile", action="store_true",
                        help="also print where one eager and one compiled training step spend their time (by op)")
    args = parser.parse_args()
    cfg, data, forget, base = lora_setup(args)
    half = args.weights == "bf16" or args.autocast == "bf16"
    device = torch.device("cpu")
    dtype = torch.bfloat16 if half else None
    measure_dtype = torch.bfloat16 if args.weights == "bf16" else None  # metric.sums.measuring_dtype's rule
    params = sum(p.numel() for p in base.parameters())
    shapes = linear_shapes(base)
    tokens = args.batch * args.context

    # -- the machine's matmul rate at the model's own shapes -----------------------------------------------
    compute = torch.bfloat16 if half else torch.float32
    print(f"{args.model}: {params / 1e6:.1f}M parameters, weights {args.weights}, autocast {args.autocast}, "
          f"LoRA r{args.rank}, {args.batch} x {args.context} tokens per step, {torch.get_num_threads()} threads")
    print(f"matmul rate at the model's shapes ({tokens} rows; GFLOP/s, fp32 | {compute}):")
    rates: dict[tuple[int, int], dict[torch.dtype, float]] = {}
    for (k, n), count in sorted(shapes.items()):
        rates[(k, n)] = {d: matmul_rate(tokens, k, n, d) for d in (torch.float32, compute)}
        print(f"  {tokens} x {k} x {n} (x{count}): {rates[(k, n)][torch.float32]:.1f} | {rates[(k, n)][compute]:.1f}")
    headline = matmul_rate(512, 576, 1536, compute) if compute == torch.bfloat16 else None
    vocab_shape = max(shapes, key=lambda s: s[1])  # the output head

    def roofline(passes: int, head_dtype: torch.dtype, body_tokens: int, head_tokens: int) -> float:
        """Seconds of the base's matmuls at the measured rates: `passes` x 2 FLOPs per weight per token (the body
        over every position, the head over the positions it runs on)."""
        total = 0.0
        for (k, n), count in shapes.items():
            d, t = (head_dtype, head_tokens) if (k, n) == vocab_shape else (compute, body_tokens)
            total += passes * 2 * k * n * count * t / (rates[(k, n)][d] * 1e9)
        return total

    # training: forward + input gradients (frozen weights need none), the head in the compute dtype
    train_roof = roofline(2, compute, tokens, tokens)
    measure_tokens = int(forget.input_ids.numel())  # the body runs on every position, the head on the loss ones
    measure_roof = roofline(1, torch.float32, measure_tokens, forget.loss_tokens)  # the measuring head is fp32
    rate_line = f"{headline:.1f} GFLOP/s at 512 x 576 x 1536 bf16" if headline else "fp32"
    print(f"roofline at these rates: training step {train_roof:.3f} s, measuring pass over {measure_tokens} "
          f"positions {measure_roof:.3f} s ({rate_line})")

    # -- the model: LoRA as a run attaches it -----------------------------------------------------------------
    model = attach(base, cfg.method[0], args.rank)
    upcast_trainable(model)
    if dtype is not None:
        skip_lora_input_casts(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.0)  # the weights stay as they are: every step is the same work
    t0 = time.perf_counter()
    compile_model(model, args.compile)
    wrap_s = time.perf_counter() - t0

    def batch(i: int):
        n = max(1, len(data.train) // args.batch)
        return data.train.select(slice((i % n) * args.batch, (i % n + 1) * args.batch))

    def step(i: int) -> float:
        b = batch(i)
        with sums.autocast(device, dtype):
            loss = head.next_token_loss(model, b.input_ids, b.attention_mask, b.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def grads(eager: bool) -> tuple[float, list[torch.Tensor]]:
        with compiled(not eager):
            b = batch(0)
            with sums.autocast(device, dtype):
                loss = head.next_token_loss(model, b.input_ids, b.attention_mask, b.labels)
            loss.backward()
            out = [p.grad.detach().clone() for p in trainable]
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), out

    model.train()
    eager_loss, eager_grads = grads(eager=True)
    t0 = time.perf_counter()
    compiled_loss, compiled_grads = grads(eager=False)  # the first compiled step compiles forward and backward
    compile_train_s = time.perf_counter() - t0 + wrap_s
    with compiled(True):
        t0 = time.perf_counter()
        step(1)
        second_s = time.perf_counter() - t0
    pairs = [(a, b) for a, b in zip(compiled_grads, eager_grads, strict=True) if b.abs().max() > 0]
    overall = float(torch.cat([(a - b).flatten() for a, b in pairs]).norm() / torch.cat([b.flatten() for _, b in pairs]).norm())
    worst = max(float((a - b).norm() / b.norm()) for a, b in pairs)
    print(f"training: compile {compile_train_s:.1f} s (first compiled step; the next took {second_s:.2f} s); loss eager "
          f"{eager_loss:.6f} compiled {compiled_loss:.6f} (diff {compiled_loss - eager_loss:+.1e}); LoRA gradients "
          f"(the {len(pairs)} non-zero tensors): relative L2 difference {overall:.1e} over all, {worst:.1e} in the worst")

    if half and args.grads_only:  # how far each is from the same step in fp32 (the bf16 base weights upcast exactly, no autocast)
        model.float()
        with compiled(False):
            b = batch(0)
            loss = head.next_token_loss(model, b.input_ids, b.attention_mask, b.labels)
            loss.backward()
            exact = torch.cat([p.grad.detach().flatten() for p in trainable])
            optimizer.zero_grad(set_to_none=True)
        eager_all, compiled_all = (torch.cat([g.flatten() for g in gs]) for gs in (eager_grads, compiled_grads))
        print(f"  against the fp32 step (loss {float(loss.detach()):.6f}): LoRA gradients' relative L2 difference, eager "
              f"{float((eager_all - exact).norm() / exact.norm()):.1e}, compiled "
              f"{float((compiled_all - exact).norm() / exact.norm()):.1e}")
    if args.grads_only:
        return

    times: dict[bool, list[float]] = {False: [], True: []}
    i = 2
    for _ in range(args.rounds):
        for on in (False, True):
            with compiled(on):
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step(i)
                    times[on].append(time.perf_counter() - t0)
                    i += 1

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    flops = 4 * params * tokens
    print(f"training step ({args.rounds} rounds x {args.steps} steps, alternating; median):")
    for on in (False, True):
        s = median(times[on])
        share = f"{flops / s / 1e9 / headline:.0%} of the 512 x 576 x 1536 bf16 rate, " if headline else ""
        print(f"  {'compiled (' + args.compile + ')' if on else 'eager':<18} {s:.3f} s  {flops / s / 1e9:6.1f} GFLOP/s = "
              f"{share}{train_roof / s:.0%} of the shape-by-shape roofline")
    print(f"  speed-up {median(times[False]) / median(times[True]):.2f}x; compile pays back after "
          f"{compile_train_s / max(1e-9, median(times[False]) - median(times[True])):.0f} steps")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for on in (False, True):
            with compiled(on), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                step(i)
            i += 1
            print(f"where a{' compiled' if on else 'n eager'} training step spends its time (self CPU):")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=44))
            groups: dict[str, list[float]] = {}  # matmuls by what they multiply: [ms, GFLOP]
            for e in prof.key_averages(group_by_input_shape=True):
                if e.key != "aten::mm" or len(e.input_shapes) < 2 or len(e.input_shapes[0]) != 2:
                    continue
                (m, k), (_, n) = e.input_shapes[0], e.input_shapes[1]
                dims = {m, k, n}
                kind = ("output head" if vocab_shape[1] in dims else "LoRA (rank-wide)" if args.rank in dims
                        else "base weights of the body")
                g = groups.setdefault(kind, [0.0, 0.0])
                g[0] += e.self_cpu_time_total / 1e3
                g[1] += 2 * m * k * n * e.count / 1e9
            total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
            for kind, (ms, gflop) in groups.items():
                print(f"  matmuls, {kind}: {ms:.0f} ms of {total:.0f} ms, {gflop / ms * 1e3:.1f} GFLOP/s")

    # -- measuring ----------------------------------------------------------------------------------------------
    model.eval()
    with torch.no_grad(), compiled(False), model.disable_adapter():
        ref = references.memory_reference(model, forget, args.eval_batch, device, measure_dtype)
    if args.no_measure_compile:
        variants = (False,)
    else:
        variants = (False, True)
    space = head.LogitsWorkspace()
    results: dict[bool, dict] = {}
    passes: dict[bool, list[float]] = {False: [], True: []}
    for on in variants:  # warm-up (the compiled one compiles the no-grad graph)
        t0 = time.perf_counter()
        with compiled(on):
            results[on] = sums.score(model, forget, args.eval_batch, device, measure_dtype, ref, space)
        if on:
            print(f"measuring: compile {time.perf_counter() - t0:.1f} s (first compiled pass)")
    for _ in range(args.rounds):
        for on in variants:
            with compiled(on):
                t0 = time.perf_counter()
                sums.score(model, forget, args.eval_batch, device, measure_dtype, ref, space)
                passes[on].append(time.perf_counter() - t0)
    mflops = 2 * params * measure_tokens
    print(f"measuring pass over {forget.loss_tokens} forgetting tokens, eval batch {args.eval_batch} "
          f"({args.rounds} rounds, alternating; median; head in fp32):")
    for on in variants:
        s = median(passes[on])
        share = f"{mflops / s / 1e9 / headline:.0%} of the 512 x 576 x 1536 bf16 rate, " if headline else ""
        r = results[on]
        print(f"  {'compiled (' + args.compile + ')' if on else 'eager':<18} {s:.3f} s  {mflops / s / 1e9:6.1f} GFLOP/s = "
              f"{share}{measure_roof / s:.0%} of the roofline;  NLL {r['nll']:.7f} CE {r['ce']:.7f} KL {r['kl']:.3e}")
    if len(variants) == 2:
        print(f"  speed-up {median(passes[False]) / median(passes[True]):.2f}x")


if __name__ == "__main__":
    main()
