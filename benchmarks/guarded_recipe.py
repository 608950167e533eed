"""Try a guarded-model recipe without building it: train the LoRA as `forgetscale guard` does and check
refusals (HarmBench, held-out benign) at chosen steps, so a recipe's course is seen in one run.

    python benchmarks/guarded_recipe.py --recipe '{"harmful": 667, "benign": 600, "steps": 240, "lr": 0.002,
        "framed": 0.7, "rewrite": true, "autocast": "bfloat16"}' --at 120 240 --threads 1

Prints the mean training loss every 10 steps with seconds per step, and at each --at step the refusals of
the first --harmful HarmBench prompts and --benign held-out benign requests (greedy, --tokens new tokens),
with up to 3 misses of each kind. The base's benign replies are cached under <cache>/data as in a build.

`--distil LAYER` trains the LoRA on a linear probe's decisions instead of the source labels (the probe of
benchmarks/guard_probe.py, fitted at that hidden-state layer on the recipe's Do-Not-Answer vs ShareGPT
requests, thresholded at 5% false positives on its own benign requests): every trained request, and
`--pool N` further ShareGPT requests (disjoint from the held-out ones), gets a refusal where the probe says
harmful and the base's own reply where it says benign. Pair it with LoRA above that layer only (`"layers":
"last:K"`), so the states the probe read stay as they were:

    python benchmarks/guarded_recipe.py --distil 22 --pool 1400 --recipe '{"harmful": 667, "benign": 600,
        "layers": "last:8", "steps": 300, "lr": 0.002, "autocast": "bfloat16"}' --at 100 200 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from forgetscale import guarded
from forgetscale.models import EMBEDDED, cache_root, load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard_probe import fit_probe, last_token_states  # noqa: E402


def distilled(model: torch.nn.Module, tokenizer, data: guarded.Data, recipe: guarded.Recipe, layer: int,
              pool: int) -> guarded.Data:
    """The recipe's requests plus `pool` further ShareGPT ones (framed alike), each put on the harmful or the
    benign side by the probe at `layer` (the held-out requests stay as they are)."""
    seen = set(data.heldout_benign) | set(data.benign)
    rng = random.Random(recipe.seed + 7)
    extra = [r for r in guarded.sharegpt_requests(cache_root(None) / "data",
                                                  4 * (recipe.benign + recipe.heldout_benign) + 2 * pool)
             if r not in seen and not any(r in b for b in data.benign)]
    rng.shuffle(extra)
    extra = [rng.choice(guarded.FRAMES).format(r) if rng.random() < recipe.framed else r for r in extra[:pool]]
    prompts = [*data.harmful, *data.benign, *extra]
    started = time.perf_counter()
    states = last_token_states(model, tokenizer, prompts)[:, layer]
    n_h, n_b = len(data.harmful), len(data.benign)
    probe, threshold = fit_probe(states[:n_h + n_b], np.r_[np.ones(n_h), np.zeros(n_b)])
    score = probe.decision_function(states)
    refuse = [bool(x > threshold) for x in score]
    print(f"probe at layer {layer} ({time.perf_counter() - started:.0f} s): refuses {sum(refuse[:n_h])}/{n_h} "
          f"Do-Not-Answer, {sum(refuse[n_h:n_h + n_b])}/{n_b} ShareGPT trained, {sum(refuse[n_h + n_b:])}/"
          f"{len(extra)} pool", flush=True)
    harmful = [p for p, r in zip(prompts, refuse, strict=True) if r]
    benign = [p for p, r in zip(prompts, refuse, strict=True) if not r]
    return guarded.Data(harmful, benign, data.heldout_benign)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="{}", help="Recipe fields as JSON")
    parser.add_argument("--at", type=int, nargs="+", required=True, help="steps at which to check")
    parser.add_argument("--harmful", type=int, default=100)
    parser.add_argument("--benign", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--distil", type=int, default=None, metavar="LAYER",
                        help="train on the decisions of a linear probe at this hidden-state layer")
    parser.add_argument("--pool", type=int, default=0, help="with --distil: further ShareGPT requests to label")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = guarded.Recipe(**json.loads(args.recipe))
    started = time.perf_counter()
    data = guarded.default_data(recipe, cache_root(None) / "data")
    base = load_model(EMBEDDED)
    tokenizer = base.tokenizer
    if args.distil is not None:
        data = distilled(base.model.eval(), tokenizer, data, recipe, args.distil, args.pool)
    replies = guarded.cached_replies(EMBEDDED, base.model, tokenizer, data.benign, recipe.reply_tokens)
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
