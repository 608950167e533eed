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

`--probe-read` freezes each adapted projection's LoRA A (rank 2) to a logistic probe's direction on that
projection's own input at the last prompt token, and the mean input (a bias); only B trains, so the adapter
can add nothing but the probe's score (q/k/v/gate/up of the recipe's layers; o_proj/down_proj stay zero):

    python benchmarks/guarded_recipe.py --probe-read --recipe '{"harmful": 667, "benign": 600, "layers": "last:14",
        "rank": 2, "alpha": 4.0, "steps": 300, "lr": 0.002, "autocast": "bfloat16"}' --at 50 100 200 300 --tokens 24
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


PROBE_READ = {"attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}  # modules by their input


@torch.no_grad()
def module_inputs(model: torch.nn.Module, tokenizer, prompts: list[str], layers: list[int]) -> dict[tuple[int, str], np.ndarray]:
    """Per (layer, 'attn' | 'mlp'): the input of that block's projections (after its RMSNorm) at the last
    token of each chat-rendered prompt, (prompts, hidden)."""
    from forgetscale.evals.generation import chat_prompt

    grabbed: dict[tuple[int, str], list[np.ndarray]] = {}
    hooks = []
    for layer in layers:
        block = model.model.layers[layer]
        for kind, module in (("attn", block.self_attn.q_proj), ("mlp", block.mlp.gate_proj)):
            def hook(_m, args, key=(layer, kind)):
                grabbed.setdefault(key, []).append(args[0][0, -1].float().numpy())
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        for p in prompts:
            model(input_ids=torch.tensor([chat_prompt(tokenizer, p)]))
    finally:
        for h in hooks:
            h.remove()
    return {k: np.stack(v) for k, v in grabbed.items()}


def probe_rows(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, float]:
    """LoRA A for one input: row 0 the probe's direction (a logistic probe on these inputs, scaled so that A x
    has unit spread over them), row 1 the mean input (A x about 1: a bias the trained B can use); and the
    probe's training accuracy."""
    probe, _ = fit_probe(x, y)
    scaler, logistic = probe[0], probe[-1]
    w = logistic.coef_[0] / scaler.scale_
    w = w / np.std(x @ w)
    mean = x.mean(0)
    rows = np.stack([w, mean / float(mean @ mean)])
    return torch.tensor(rows, dtype=torch.float32), float(probe.score(x, y))


def probe_read_attach(model: torch.nn.Module, tokenizer, data: guarded.Data, recipe: guarded.Recipe):
    """A replacement for forgetscale.methods.attach.attach in train_guard: LoRA (rank 2) whose A is frozen to
    probe_rows of each projection's input in the recipe's layers (q/k/v read the attention norm's output,
    gate/up the MLP norm's), so the only thing the trained B can add is the probe's score (and a constant);
    o_proj and down_proj adapters are frozen at zero."""
    from forgetscale.methods import attach as attaching
    from forgetscale.methods.lora import LoraSpec, _layer_indices

    layers = _layer_indices(LoraSpec(ranks=[2], layers=recipe.layers), model) or list(range(model.config.num_hidden_layers))
    started = time.perf_counter()
    prompts = [*data.harmful, *data.benign]
    labels = np.r_[np.ones(len(data.harmful)), np.zeros(len(data.benign))]
    inputs = module_inputs(model.eval(), tokenizer, prompts, layers)
    rows = {}
    for key, x in inputs.items():
        rows[key], accuracy = probe_rows(x, labels)
        print(f"probe layer {key[0]} {key[1]}: training accuracy {accuracy:.3f}", flush=True)
    print(f"probes in {time.perf_counter() - started:.0f} s", flush=True)
    real = attaching.attach

    def attach(m, spec, rank):
        peft_model = real(m, spec, 2)
        for name, module in peft_model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            layer = int(name.split(".layers.")[1].split(".")[0])
            kind = next((k for k, names in PROBE_READ.items() if name.endswith(names)), None)
            module.lora_A["default"].weight.requires_grad_(False)
            if kind is None or (layer, kind) not in rows:
                module.lora_B["default"].weight.requires_grad_(False)
                continue
            module.lora_A["default"].weight.data.copy_(rows[(layer, kind)])
        return peft_model

    attaching.attach = attach


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
    parser.add_argument("--probe-read", action="store_true",
                        help="LoRA rank 2 with A frozen to a linear probe's direction (and the mean input) per projection")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = dataclasses.replace(guarded.V2, **json.loads(args.recipe))  # v2 defaults (no gate)
    started = time.perf_counter()
    data = guarded.default_data(recipe, cache_root(None) / "data")
    base = load_model(EMBEDDED)
    tokenizer = base.tokenizer
    if args.distil is not None:
        data = distilled(base.model.eval(), tokenizer, data, recipe, args.distil, args.pool)
    replies = guarded.cached_replies(EMBEDDED, base.model, tokenizer, data.benign, recipe.reply_tokens)
    print(f"{len(data.harmful)} harmful, {len(data.benign)} benign trained; replies in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    blocks, _ = guarded.training_blocks(tokenizer, data, replies, recipe)
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

    if args.probe_read:
        probe_read_attach(base.model, tokenizer, data, recipe)
    guarded.train_guard(base.model, blocks, recipe, watch=on_step)
    print(f"recipe {json.dumps(json.loads(args.recipe))}: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
