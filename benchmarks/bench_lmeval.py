"""Benchmark: the seconds an lm-evaluation-harness task adds per adapter on the embedded model.

The local task tests/data/lmeval/forgetscale_mini (8 four-option questions, multiple_choice, scored by
log-likelihood: 32 requests) on SmolLM2-135M-Instruct, through forgetscale's own path: a saved LoRA
adapter applied to the one loaded base (forgetscale.weights.applied), lm-eval's HFLM around it,
simple_evaluate with log_samples, rows built, adapter unloaded; beside it, the same questions through the
built-in choice suite's loglik protocol. The one-off costs per `forgetscale eval`
(lm-eval's index of include_path's tasks, the first load of the task's documents) are printed apart.

    OMP_NUM_THREADS=1 python benchmarks/bench_lmeval.py --threads 1 --repeats 3 [--full-index]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from forgetscale.evals.lmeval import LmEvalSettings, task_manager, task_suite
from forgetscale.evals.suites import Target
from forgetscale.models import EMBEDDED, load_model
from forgetscale.weights import applied, saved_source

TASKS = Path(__file__).resolve().parents[1] / "tests" / "data" / "lmeval"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--full-index", action="store_true",
                        help="also time lm-eval's index of its own tasks (what a task outside include_path costs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    base = load_model(EMBEDDED)
    load_s = time.perf_counter() - started
    settings = LmEvalSettings(include_path=str(TASKS))
    started = time.perf_counter()
    task_manager(settings.include_path, "forgetscale_mini")
    index_s = time.perf_counter() - started
    full_s = None
    if args.full_index:
        from forgetscale.evals.lmeval import _index

        started = time.perf_counter()
        full = _index(settings.include_path, True)
        full_s = time.perf_counter() - started
        print(f"lm-eval's own task index: {full_s:.1f} s ({len(full.all_tasks)} names)")
    suite = task_suite("forgetscale_mini")
    started = time.perf_counter()
    items = suite.load(settings, None)
    docs_s = time.perf_counter() - started

    from peft import LoraConfig, get_peft_model

    with tempfile.TemporaryDirectory() as tmp:
        tuned = get_peft_model(base.model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        tuned.save_pretrained(tmp)
        tuned.unload()
        from forgetscale.evals import choice
        from forgetscale.evals.choice import ChoiceSettings
        from forgetscale.evals.items import choice_items

        same = choice_items(str(TASKS / "mini_choice.jsonl"))  # the same 8 questions, forgetscale's choice suite
        loglik = ChoiceSettings(protocols=["loglik"])
        times, builtin = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            with applied(base.model, saved_source(Path(tmp), 0)) as (model, _):
                choice.evaluate(Target("x", model, base.tokenizer, torch.device("cpu"), None, args.batch_size, 0),
                                same, loglik)
            builtin.append(time.perf_counter() - started)
            started = time.perf_counter()
            with applied(base.model, saved_source(Path(tmp), 0)) as (model, _):
                rows = suite.evaluate(Target("x", model, base.tokenizer, torch.device("cpu"), None, args.batch_size, 0),
                                      items, settings)
            times.append(time.perf_counter() - started)
    print(f"model load {load_s:.1f} s; lm-eval task index of include_path (once per process) {index_s:.1f} s; "
          f"task documents (once) {docs_s:.1f} s")
    print(f"per adapter: {statistics.median(times):.2f} s median of {args.repeats} "
          f"({', '.join(f'{t:.2f}' for t in times)}); {len(items)} items, {len(rows)} rows, "
          f"{args.threads} thread(s), batch {args.batch_size}")
    print(f"the same questions, built-in choice suite (loglik): {statistics.median(builtin):.2f} s median "
          f"({', '.join(f'{t:.2f}' for t in builtin)})")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
