"""Try a guarded-model recipe without building it: train the LoRA as `forgetscale guard` does and check
refusals (HarmBench, held-out benign) at chosen steps, so a recipe's course is seen in one run.

    python benchmarks/guarded_recipe.py --recipe '{"harmful": 667, "benign": 600, "steps": 240, "lr": 0.002,
        "framed": 0.7, "rewrite": true, "autocast": "bfloat16"}' --at 120 240 --threads 1

Prints the mean training loss every 10 steps with seconds per step, and at each --at step the refusals of
the first --harmful HarmBench prompts and --benign held-out benign requests (greedy, --tokens new tokens),
with up to 3 misses of each kind. The base's benign replies are cached under <cache>/data as in a build.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from forgetscale import guarded
from forgetscale.models import EMBEDDED, cache_root, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="{}", help="Recipe fields as JSON")
    parser.add_argument("--at", type=int, nargs="+", required=True, help="steps at which to check")
    parser.add_argument("--harmful", type=int, default=100)
    parser.add_argument("--benign", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = guarded.Recipe(**json.loads(args.recipe))
    started = time.perf_counter()
    data = guarded.default_data(recipe, cache_root(None) / "data")
    base = load_model(EMBEDDED)
    tokenizer = base.tokenizer
    replies = guarded.base_replies(base.model, tokenizer, data.benign, recipe.reply_tokens)
    print(f"{len(data.harmful)} harmful, {len(data.benign)} benign trained; replies in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    blocks = guarded.training_blocks(tokenizer, data, replies, recipe)
    checked = dataclasses.replace(recipe, check_harmful=args.harmful, check_tokens=args.tokens)
    subset = guarded.Data(data.harmful, data.benign, data.heldout_benign[:args.benign])
    losses: list[float] = []
    t0 = time.perf_counter()

    def on_step(step: int, loss: float, model: torch.nn.Module) -> None:
        losses.append(loss)
        if step % 10 == 0:
            print(f"step {step} loss {sum(losses[-10:]) / 10:.3f} {(time.perf_counter() - t0) / step:.2f} s/step",
                  flush=True)
        if step in args.at:
            model.eval()
            result = guarded.check(model, tokenizer, None, subset, checked)
            model.train()
            print(f"step {step}: HarmBench refused {result.harmful_refused}/{result.harmful_n}, held-out benign "
                  f"refused {result.benign_refused}/{result.benign_n}", flush=True)
            for e in result.examples[:3] + result.examples[10:13]:
                print(f"   refused={e['refused']} {e['prompt'][:60]!r} -> {e['reply'][:40]!r}")

    guarded.train_guard(base.model, blocks, recipe, watch=on_step)
    print(f"recipe {json.dumps(json.loads(args.recipe))}: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
