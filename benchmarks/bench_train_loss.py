"""The chunked output head against the stock one, side by side in one run: training step time with the
stock causal-LM loss vs `head.next_token_loss`, and a measuring pass (metric.sums.score) with the
stock head over every position vs the plain head on the loss positions into a reused buffer. Prints
seconds, kernel (sys) seconds and minor page faults per step / per pass, and the ratios; and the peak RSS
of each loss's first step, above the RSS before it (Linux: the peak is reset before each step).

    python benchmarks/bench_train_loss.py                       # SmolLM2, bf16 weights + autocast, 2 threads
    python benchmarks/bench_train_loss.py --weights fp32 --autocast none
    python benchmarks/bench_train_loss.py --model gemma3-270m --weights fp32 --autocast none --threads 1
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from lora_setup import add_setup_flags, lora_setup

from forgetscale.methods.attach import attach, upcast_trainable
from forgetscale.metric import head, references, sums


class Meter:
    def __enter__(self):
        self.usage, self.started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        return self

    def __exit__(self, *exc):
        end = resource.getrusage(resource.RUSAGE_SELF)
        self.seconds = time.perf_counter() - self.started
        self.sys = end.ru_stime - self.usage.ru_stime
        self.faults = end.ru_minflt - self.usage.ru_minflt


def peak_rss_mb() -> float:
    """VmHWM: this process's peak RSS since the last reset_peak_rss (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> float:
    """Reset the peak RSS to the current RSS (Linux clear_refs 5) and return it in MB."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return peak_rss_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_flags(parser, rank=4, forget_tokens=4096, threads=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="stock and chunked alternate this many times")
    parser.add_argument("--eval-batch", type=int, default=8)
    args = parser.parse_args()
    cfg, data, forget, base = lora_setup(args)
    device = torch.device("cpu")
    dtype = torch.bfloat16 if args.autocast == "bf16" else None
    model = attach(base, cfg.method[0], args.rank)
    upcast_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = iter(range(10**9))

    def step(chunked: bool) -> None:
        i = next(batches) % max(1, len(data.train) // args.batch)
        b = data.train.select(slice(i * args.batch, (i + 1) * args.batch))
        with sums.autocast(device, dtype):
            if chunked:
                loss = head.next_token_loss(model, b.input_ids, b.attention_mask, b.labels)
            else:
                loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print(f"{args.model}: weights {args.weights}, autocast {args.autocast}, LoRA r{args.rank}, "
          f"{args.batch} x {args.context} tokens per step, {args.threads} threads")
    train = {False: [], True: []}
    for chunked in (True, False, True, False):  # warm-up, untimed; the second of each is measured
        before = reset_peak_rss()
        step(chunked)
        label = "chunked head" if chunked else "stock loss"
        print(f"  {label} step: RSS {before:,.0f} MB before, peak {peak_rss_mb():,.0f} MB (+{peak_rss_mb() - before:,.0f})")
    with model.disable_adapter():
        ref = references.memory_reference(model, forget, args.eval_batch, device, dtype)
    for _ in range(args.rounds):
        for chunked in (False, True):
            with Meter() as m:
                for _ in range(args.steps):
                    step(chunked)
            train[chunked].append(m)

    real_head = sums.plain_head
    passes = {False: [], True: []}
    model.eval()
    for _ in range(args.rounds):
        for chunked in (False, True):
            sums.plain_head = real_head if chunked else (lambda _model: None)
            try:
                with Meter() as m:
                    result = sums.score(model, forget, args.eval_batch, device, dtype, ref)
            finally:
                sums.plain_head = real_head
            passes[chunked].append((m, result["kl"]))

    def row(label: str, meters: list[Meter], per: int) -> float:
        s = sum(m.seconds for m in meters) / (len(meters) * per)
        sys_s = sum(m.sys for m in meters) / (len(meters) * per)
        faults = sum(m.faults for m in meters) / (len(meters) * per)
        print(f"  {label:<34} {s:8.3f} s   sys {sys_s:7.3f} s   minor faults {faults:10,.0f}")
        return s

    print(f"training step ({args.rounds} rounds x {args.steps} steps each, alternating)")
    stock = row("stock loss (model(labels=...).loss)", train[False], args.steps)
    ours = row("chunked head (next_token_loss)", train[True], args.steps)
    print(f"  speed-up {stock / ours:.2f}x")
    print(f"measuring pass over {forget.loss_tokens} forgetting tokens, eval batch {args.eval_batch}")
    stock = row("stock head over every position", [m for m, _ in passes[False]], 1)
    ours = row("plain head, reused buffer", [m for m, _ in passes[True]], 1)
    kl = [k for _, k in passes[False] + passes[True]]
    print(f"  speed-up {stock / ours:.2f}x; KL {min(kl):.6e} .. {max(kl):.6e}")


if __name__ == "__main__":
    main()
