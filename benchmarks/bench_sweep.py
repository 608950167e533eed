"""End to end: a forgetscale sweep against the stock pipeline a user would write, in one process.

Stock: for each rank, an HF `Trainer` over a PEFT LoRA model (Adafactor, constant LR after warm-up),
with a `TrainerCallback` that at every checkpoint re-runs a second copy of the base model on the
forgetting set and compares the two models' next-token distributions (soft CE and KL), and measures
the held-out loss. forgetscale: `run_sweep` on the same config (base predictions computed once and
reused by every run and checkpoint). Both use the same token blocks, LoRA settings, optimizer, LR,
warm-up, steps and checkpoints; the data order differs (Trainer's sampler vs forgetscale's seeded
permutation), so the stored numbers agree within run-to-run noise, not bitwise.

Prints the seconds of each part (start-up, training, measurement), both totals, their ratio, and the
last checkpoint's KL and held-out loss of each rank from both; then the seconds per training step and per
measuring pass of each, as a share of this machine's matmul rate measured in the same run (before and after
the pipelines) at the model's own shapes (FLOPs: 4 x parameters x tokens per step, 2 x per measured position).
The ratio printed first is at equal precision; a comparison across precisions (`--stock-fp32-too`, or only
one side given bf16 weights) is printed after it and labelled as such.

    python benchmarks/bench_sweep.py                                  # SmolLM2, ranks 1/4/16, 60 steps, fp32 both
    python benchmarks/bench_sweep.py --bf16-weights                   # both bf16 weights + autocast (equal precision)
    python benchmarks/bench_sweep.py --bf16-weights --ours-compile off layers --stock-fp32-too  # + compiled, + mixed
    python benchmarks/bench_sweep.py --dtype bf16                     # both under bf16 autocast, fp32 weights
    python benchmarks/bench_sweep.py --ours-bf16-weights              # stock fp32, forgetscale bf16 weights (mixed)
    python benchmarks/bench_sweep.py --ours-bf16-weights --fresh-processes   # each pipeline in its own process
    python benchmarks/bench_sweep.py --model tiny-random-llama --steps 6 --ranks 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from forgetscale.compiled import matmul_rate
from forgetscale.config import parse_config
from forgetscale.data import build_finetune_data, build_forgetting_blocks
from forgetscale.data.blocks import IGNORE
from forgetscale.models import cache_root, resolve_source


def config(args: argparse.Namespace, weights: str | None = None, compile: str = "off") -> dict:
    return {
        "name": "bench-sweep", "model": {"name": args.model, **({"dtype": weights} if weights else {})},
        "finetune": {"dataset": "embedded:news", "heldout_max_tokens": args.heldout_tokens},
        "forgetting": {"dataset": "embedded:wikipedia", "max_tokens": args.forget_tokens},
        "method": {"name": "lora", "ranks": list(args.ranks), "scaling": "rslora"},
        "train": {"steps": args.steps, "num_checkpoints": args.checkpoints, "batch_size": args.batch,
                  "context_length": args.context, "lr": args.lr, "optimizer": "adafactor", "seed": 0,
                  "save_adapters": "none", "threads": args.threads,
                  **({"dtype": "bfloat16"} if args.dtype == "bf16" or weights else {}),
                  **({"compile": compile} if compile != "off" else {})},
    }


class Timer:
    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # steps trained, positions measured

    def count(self, what: str, n: int) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds


def stock(cfg, timer: Timer, bf16: bool, weights: torch.dtype = torch.float32) -> dict[int, dict[str, float]]:
    """What a user writes with transformers + peft: Trainer, a callback, a second base for the reference.
    `weights`: the dtype both from_pretrained calls load in (bf16: the stock pipeline at its own best CPU
    setting, trained with Trainer(bf16=True) and measured under bf16 autocast)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    t = time.perf_counter()
    source, _ = resolve_source(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    data_cache = cache_root() / "data"
    data = build_finetune_data(cfg.finetune, tokenizer, cfg.train.context_length, data_cache)
    forget = build_forgetting_blocks(cfg.forgetting, tokenizer, cfg.train.context_length, data_cache)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=weights).eval()
    timer.add("start-up", time.perf_counter() - t)
    checkpoints = set(cfg.train.checkpoint_steps)
    batch = cfg.train.eval_batch_size

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data.train)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": data.train.input_ids[i], "labels": data.train.labels[i],
                    "attention_mask": data.train.attention_mask[i]}

    @torch.no_grad()
    @torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # what Trainer(bf16=True) trains under
    def measure(model) -> dict[str, float]:
        model.eval()
        nll = n = 0.0
        for i in range(0, len(data.heldout), batch):
            ids, lab = data.heldout.input_ids[i:i + batch], data.heldout.labels[i:i + batch]
            logits = model(input_ids=ids, attention_mask=data.heldout.attention_mask[i:i + batch]).logits[:, :-1]
            y = lab[:, 1:]
            keep = y != IGNORE
            nll += float(torch.nn.functional.cross_entropy(logits[keep].float(), y[keep], reduction="sum"))
            n += int(keep.sum())
        ce = kl = m = 0.0
        for i in range(0, len(forget), batch):
            ids, mask = forget.input_ids[i:i + batch], forget.attention_mask[i:i + batch]
            keep = forget.labels[i:i + batch, 1:] != IGNORE
            base = reference(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float().log_softmax(-1)
            tuned = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float().log_softmax(-1)
            p = base.exp()
            ce -= float((p * tuned).sum())
            kl += float((p * (base - tuned)).sum())
            m += int(keep.sum())
        timer.count("positions measured", int(data.heldout.input_ids.numel()) + 2 * int(forget.input_ids.numel()))
        model.train()
        return {"ft_loss": nll / n, "forget_ce": ce / m, "forget_kl": kl / m}

    results: dict[int, dict[str, float]] = {}
    spec = cfg.method[0]
    for rank in spec.ranks:
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(source, dtype=weights)

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                                                 use_rslora=spec.scaling == "rslora", target_modules="all-linear"))
        timer.add("start-up", time.perf_counter() - t)
        rows: dict[int, dict[str, float]] = {}

        class Forgetting(TrainerCallback):
            def __init__(self, rows: dict[int, dict[str, float]]) -> None:
                self.rows = rows

            def _measure(self, step: int, model) -> None:
                t0 = time.perf_counter()
                self.rows[step] = measure(model)
                timer.add("measurement", time.perf_counter() - t0)

            def on_train_begin(self, args, state, control, model=None, **kw):
                self._measure(0, model)

            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step in checkpoints:
                    self._measure(state.global_step, model)

        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(
                output_dir=out, max_steps=cfg.train.steps, per_device_train_batch_size=cfg.train.batch_size,
                learning_rate=cfg.train.lr, lr_scheduler_type="constant_with_warmup",
                warmup_steps=cfg.train.warmup, optim="adafactor", weight_decay=0.0, max_grad_norm=1.0,
                logging_strategy="no", save_strategy="no", report_to=[], seed=cfg.train.seed, use_cpu=True, bf16=bf16,
                dataloader_num_workers=0, disable_tqdm=True,
            )
            trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Forgetting(rows)])
            t = time.perf_counter()
            trainer.train()
            timer.add("training", time.perf_counter() - t)
        results[rank] = rows[max(rows)]
        timer.count("steps", cfg.train.steps)
    timer.parts["training"] -= timer.parts.get("measurement", 0.0)
    return results


def ours(cfg, timer: Timer, bf16: bool) -> dict[int, dict[str, float]]:
    from forgetscale import train
    from forgetscale.metric import references
    from forgetscale.store import Store
    from forgetscale.sweep import run_sweep

    def timed(part: str, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer.add(part, time.perf_counter() - t0)
        return wrapper

    def measured(model, ctx):
        timer.count("positions measured", sum(int(b.input_ids.numel()) for b in
                                              (ctx.data.heldout, ctx.data.train_probe, ctx.forgetting)))
        return metrics(model, ctx)

    originals = references.build, train.checkpoint_metrics
    metrics = train.checkpoint_metrics
    references.build = timed("base reference", references.build)
    train.checkpoint_metrics = timed("measurement", measured)
    try:
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            run_sweep(cfg, Path(out), progress=False)
            total = time.perf_counter() - t
            with Store(Path(out), create=False) as store:
                frame = store.frame()
    finally:
        references.build, train.checkpoint_metrics = originals
    last = frame.sort_values("step").groupby("run_id").tail(1)
    timer.add("training", float(last["wall_s"].sum()))  # wall_s: training time only (a compiled run's compiling too)
    timer.count("steps", cfg.train.steps * len(last))
    timer.add("start-up", total - sum(timer.parts.values()))  # model loads, data, state saves
    return {int(r["rank"]): {"ft_loss": r["ft_loss"], "forget_ce": r["forget_ce"], "forget_kl": r["forget_kl"]}
            for r in last.to_dict("records")}


def model_shape(name: str) -> tuple[int, int, int]:
    """(parameters, hidden width, MLP width) of the base model, from its config (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_source(name)[0])
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return params, config.hidden_size, config.intermediate_size


def rates(rows: int, hidden: int, mlp: int) -> dict[str, float]:
    """This machine's matmul rate (GFLOP/s) at the model's MLP shape, [rows x hidden] @ [hidden x mlp]."""
    return {"fp32": matmul_rate(rows, hidden, mlp, torch.float32, 1.0),
            "bf16": matmul_rate(rows, hidden, mlp, torch.bfloat16, 1.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoints", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--forget-tokens", type=int, default=4096)
    parser.add_argument("--heldout-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast in both (Trainer(bf16=True); train.dtype=bfloat16), weights fp32")
    parser.add_argument("--bf16-weights", action="store_true",
                        help="both pipelines: bf16 base weights + autocast (--stock-bf16-weights --ours-bf16-weights)")
    parser.add_argument("--stock-bf16-weights", action="store_true",
                        help="the stock pipeline at its own best CPU setting: both from_pretrained(..., "
                             "dtype=torch.bfloat16), Trainer(bf16=True), measured under bf16 autocast")
    parser.add_argument("--ours-bf16-weights", action="store_true",
                        help="forgetscale: bf16 base weights + autocast (model.dtype=bfloat16)")
    parser.add_argument("--stock-fp32-too", action="store_true",
                        help="with --stock-bf16-weights: also run the stock pipeline in fp32, for the comparison "
                             "across precisions (printed second, labelled)")
    parser.add_argument("--ours-compile", nargs="+", choices=("off", "layers", "model"), default=["off"],
                        help="train.compile of the forgetscale sweep; several: one sweep each, in this order")
    parser.add_argument("--fresh-processes", action="store_true",
                        help="run each pipeline in its own fresh Python process, one after the other, so neither "
                             "inherits the other's heap or thread pools (the ratio still comes from this one run)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # one pipeline, JSON on stdout
    args = parser.parse_args()
    if args.bf16_weights:
        args.stock_bf16_weights = args.ours_bf16_weights = True
    torch.set_num_threads(args.threads)
    cfg = parse_config(config(args))

    # (key, name, precision, runner)
    pipelines: list[tuple[str, str, str, object]] = []
    stock_precisions = ["bf16"] if args.stock_bf16_weights else ["fp32"]
    if args.stock_bf16_weights and args.stock_fp32_too:
        stock_precisions.append("fp32")
    for precision in stock_precisions:
        weights = torch.bfloat16 if precision == "bf16" else torch.float32
        label = "bf16 weights + autocast" if precision == "bf16" else ("bf16 autocast" if args.dtype == "bf16" else "fp32")
        pipelines.append((f"stock:{precision}", f"stock (Trainer + PEFT + base copy), {label}", precision,
                          lambda timer, w=weights, p=precision: stock(cfg, timer, args.dtype == "bf16" or p == "bf16", w)))
    ours_precision = "bf16" if args.ours_bf16_weights else "fp32"
    for kind in args.ours_compile:
        label = "bf16 weights + autocast" if args.ours_bf16_weights else ("bf16 autocast" if args.dtype == "bf16" else "fp32")
        ours_cfg = parse_config(config(args, "bfloat16" if args.ours_bf16_weights else None, kind))
        pipelines.append((f"ours:{kind}", f"forgetscale sweep, {label}, train.compile {kind}", ours_precision,
                          lambda timer, c=ours_cfg: ours(c, timer, args.dtype == "bf16")))

    def run(key: str) -> tuple[float, dict[str, float], dict[str, int], dict[int, dict[str, float]]]:
        runner = next(p[3] for p in pipelines if p[0] == key)
        timer = Timer()
        t = time.perf_counter()
        result = runner(timer)
        total = time.perf_counter() - t
        timer.add("other", total - sum(timer.parts.values()))  # e.g. building each Trainer
        return total, timer.parts, timer.counts, result

    if args.only:
        total, parts, counts, result = run(args.only)
        print("RESULT " + json.dumps({"total": total, "parts": parts, "counts": counts, "numbers": result}))
        return
    params, hidden, mlp = model_shape(args.model)
    rows = args.batch * args.context
    print(f"{args.model}: LoRA ranks {args.ranks}, {args.steps} steps of {args.batch} x {args.context} tokens, "
          f"checkpoints {cfg.train.checkpoint_steps}, {args.forget_tokens} forgetting tokens, "
          f"{torch.get_num_threads()} threads, "
          + ("each pipeline in a fresh process" if args.fresh_processes else "one process"))
    before = rates(rows, hidden, mlp)
    print(f"matmul rate at the model's shape {rows} x {hidden} x {mlp}, before: fp32 {before['fp32']:.1f}, "
          f"bf16 {before['bf16']:.1f} GFLOP/s")
    timings, numbers, phases = {}, {}, {}
    for key, name, _, _ in pipelines:
        if args.fresh_processes:
            argv = [a for a in sys.argv[1:] if a != "--fresh-processes"]
            done = subprocess.run([sys.executable, __file__, *argv, "--only", key], capture_output=True, text=True)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode != 0 or not line:
                sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
            got = json.loads(line[-1].removeprefix("RESULT "))
            total, parts, counts = got["total"], got["parts"], got["counts"]
            result = {int(k): v for k, v in got["numbers"].items()}
        else:
            total, parts, counts, result = run(key)
        timings[key], numbers[key], phases[key] = total, result, (parts, counts)
        print(f"{name}: {total:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + ")", flush=True)
    after = rates(rows, hidden, mlp)
    rate = {d: (before[d] + after[d]) / 2 for d in before}
    print(f"matmul rate after: fp32 {after['fp32']:.1f}, bf16 {after['bf16']:.1f} GFLOP/s; the shares below use the "
          f"means, {rate['fp32']:.1f} and {rate['bf16']:.1f}")

    names = {key: name for key, name, _, _ in pipelines}
    precisions = {key: precision for key, _, precision, _ in pipelines}
    stocks = [k for k in timings if k.startswith("stock:")]
    ours_keys = [k for k in timings if k.startswith("ours:")]
    print("end to end, stock / forgetscale:")
    rows_printed = []
    for o in ours_keys:  # equal precision first
        for s_key in stocks:
            equal = precisions[s_key] == precisions[o]
            rows_printed.append((not equal, f"  {'equal precision' if equal else 'ACROSS precisions (not like for like)'}"
                                 f" ({precisions[s_key]} stock, {precisions[o]} forgetscale, compile "
                                 f"{o.split(':')[1]}): {timings[s_key]:.1f} / {timings[o]:.1f} s = "
                                 f"{timings[s_key] / timings[o]:.2f}x"))
    for _, line in sorted(rows_printed, key=lambda r: r[0]):
        print(line)
    compute_rate = {k: rate["bf16"] if precisions[k] == "bf16" or args.dtype == "bf16" else rate["fp32"] for k in timings}
    print(f"per phase, as a share of the {rows} x {hidden} x {mlp} matmul rate of the compute precision "
          f"(FLOPs: 4 x {params / 1e6:.1f}M x {rows} per step, 2 x {params / 1e6:.1f}M per measured position):")
    for key in timings:
        parts, counts = phases[key]
        step_s = parts.get("training", 0.0) / max(1, counts.get("steps", 0))
        positions = counts.get("positions measured", 0)
        per_k = parts.get("measurement", 0.0) / max(1, positions) * 1000
        train_rate = 4 * params * rows / step_s / 1e9 if step_s else float("nan")
        measure_rate = 2 * params * 1000 / per_k / 1e9 if per_k else float("nan")
        print(f"  {names[key]}: training {step_s:.3f} s/step = {train_rate:.1f} GFLOP/s = "
              f"{train_rate / compute_rate[key]:.0%}; measuring {per_k:.3f} s per 1,000 positions "
              f"({positions:,} positions) = {measure_rate:.1f} GFLOP/s = {measure_rate / compute_rate[key]:.0%}")
    print("last checkpoint per rank (" + " | ".join(names[k].split(",")[0] + " " + k.split(":")[1] for k in numbers) + "):")
    for rank in args.ranks:
        got = [numbers[k][rank] for k in numbers]
        print(f"  rank {rank}: KL " + " | ".join(f"{g['forget_kl']:.4f}" for g in got)
              + "   held-out L_ft " + " | ".join(f"{g['ft_loss']:.4f}" for g in got)
              + "   CE " + " | ".join(f"{g['forget_ce']:.4f}" for g in got))


if __name__ == "__main__":
    main()
