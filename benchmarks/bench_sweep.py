"""End to end: a forgetscale sweep against the stock pipeline a user would write, in one process.

Stock: for each rank, an HF `Trainer` over a PEFT LoRA model (Adafactor, constant LR after warm-up),
with a `TrainerCallback` that at every checkpoint re-runs a second copy of the base model on the
forgetting set and compares the two models' next-token distributions (soft CE and KL), and measures
the held-out loss. forgetscale: `run_sweep` on the same config (base predictions computed once and
reused by every run and checkpoint). Both use the same token blocks, LoRA settings, optimizer, LR,
warm-up, steps and checkpoints; the data order differs (Trainer's sampler vs forgetscale's seeded
permutation), so the stored numbers agree within run-to-run noise, not bitwise.

Prints the seconds of each part (start-up, training, measurement), both totals, their ratio, and the
last checkpoint's KL and held-out loss of each rank from both.

    python benchmarks/bench_sweep.py                                  # SmolLM2, ranks 1/4/16, 60 steps
    python benchmarks/bench_sweep.py --dtype bf16                     # both under bf16 autocast
    python benchmarks/bench_sweep.py --ours-bf16-weights              # stock fp32, forgetscale bf16 weights
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

from forgetscale.config import parse_config
from forgetscale.data import build_finetune_data, build_forgetting_blocks
from forgetscale.data.blocks import IGNORE
from forgetscale.models import cache_root, resolve_source


def config(args: argparse.Namespace, weights: str | None = None) -> dict:
    return {
        "name": "bench-sweep", "model": {"name": args.model, **({"dtype": weights} if weights else {})},
        "finetune": {"dataset": "embedded:news", "heldout_max_tokens": args.heldout_tokens},
        "forgetting": {"dataset": "embedded:wikipedia", "max_tokens": args.forget_tokens},
        "method": {"name": "lora", "ranks": list(args.ranks), "scaling": "rslora"},
        "train": {"steps": args.steps, "num_checkpoints": args.checkpoints, "batch_size": args.batch,
                  "context_length": args.context, "lr": args.lr, "optimizer": "adafactor", "seed": 0,
                  "save_adapters": "none", "threads": args.threads,
                  **({"dtype": "bfloat16"} if args.dtype == "bf16" or weights else {})},
    }


class Timer:
    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds


def stock(cfg, timer: Timer, bf16: bool) -> dict[int, dict[str, float]]:
    """What a user writes with transformers + peft: Trainer, a callback, a second base for the reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    t = time.perf_counter()
    source, _ = resolve_source(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    data_cache = cache_root() / "data"
    data = build_finetune_data(cfg.finetune, tokenizer, cfg.train.context_length, data_cache)
    forget = build_forgetting_blocks(cfg.forgetting, tokenizer, cfg.train.context_length, data_cache)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
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
        model.train()
        return {"ft_loss": nll / n, "forget_ce": ce / m, "forget_kl": kl / m}

    results: dict[int, dict[str, float]] = {}
    spec = cfg.method[0]
    for rank in spec.ranks:
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)

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

    originals = references.build, train.checkpoint_metrics
    references.build = timed("base reference", references.build)
    train.checkpoint_metrics = timed("measurement", train.checkpoint_metrics)
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
    timer.add("training", float(last["wall_s"].sum()))  # wall_s: training time only
    timer.add("start-up", total - sum(timer.parts.values()))  # model loads, data, state saves
    return {int(r["rank"]): {"ft_loss": r["ft_loss"], "forget_ce": r["forget_ce"], "forget_kl": r["forget_kl"]}
            for r in last.to_dict("records")}


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
    parser.add_argument("--ours-bf16-weights", action="store_true",
                        help="forgetscale only: bf16 base weights + autocast (model.dtype=bfloat16), the stock "
                             "pipeline as --dtype says (README: bf16's KL is within fp32's seed spread)")
    parser.add_argument("--fresh-processes", action="store_true",
                        help="run each pipeline in its own fresh Python process, one after the other, so neither "
                             "inherits the other's heap or thread pools (the ratio still comes from this one run)")
    parser.add_argument("--only", choices=("stock", "ours"), help=argparse.SUPPRESS)  # one pipeline, JSON on stdout
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = parse_config(config(args))
    cfgs = {"stock": cfg, "ours": parse_config(config(args, "bfloat16")) if args.ours_bf16_weights else cfg}
    pipelines = {"stock": ("stock (Trainer + PEFT + base copy)", stock), "ours": ("forgetscale sweep", ours)}

    def run(key: str) -> tuple[float, dict[str, float], dict[int, dict[str, float]]]:
        timer = Timer()
        t = time.perf_counter()
        result = pipelines[key][1](cfgs[key], timer, args.dtype == "bf16")
        total = time.perf_counter() - t
        timer.add("other", total - sum(timer.parts.values()))  # e.g. building each Trainer
        return total, timer.parts, result

    if args.only:
        total, parts, result = run(args.only)
        print("RESULT " + json.dumps({"total": total, "parts": parts, "numbers": result}))
        return
    print(f"{args.model}: LoRA ranks {args.ranks}, {args.steps} steps of {args.batch} x {args.context} tokens, "
          f"checkpoints {cfg.train.checkpoint_steps}, {args.forget_tokens} forgetting tokens, "
          f"{torch.get_num_threads()} threads, {args.dtype}"
          + (" (forgetscale: bf16 weights + autocast)" if args.ours_bf16_weights else "")
          + (", each pipeline in a fresh process" if args.fresh_processes else ", one process"))
    timings = {}
    numbers = {}
    for key, (name, _) in pipelines.items():
        if args.fresh_processes:
            argv = [a for a in sys.argv[1:] if a != "--fresh-processes"]
            done = subprocess.run([sys.executable, __file__, *argv, "--only", key], capture_output=True, text=True)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode != 0 or not line:
                sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
            got = json.loads(line[-1].removeprefix("RESULT "))
            total, parts, result = got["total"], got["parts"], {int(k): v for k, v in got["numbers"].items()}
        else:
            total, parts, result = run(key)
        timings[name], numbers[name] = total, result
        print(f"{name}: {total:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + ")")
    a, b = timings.values()
    print(f"ratio stock / forgetscale: {a / b:.2f}x")
    print("last checkpoint per rank (stock | forgetscale):")
    for rank in args.ranks:
        s, o = (numbers[k][rank] for k in numbers)
        print(f"  rank {rank}: KL {s['forget_kl']:.4f} | {o['forget_kl']:.4f}   held-out L_ft "
              f"{s['ft_loss']:.4f} | {o['ft_loss']:.4f}   CE {s['forget_ce']:.4f} | {o['forget_ce']:.4f}")


if __name__ == "__main__":
    main()
