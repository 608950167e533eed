"""How the guarded build's gate settings were chosen: its probe at a decoder layer, under three designs and
several thresholds, scored on the check prompts (issue 27; docs/evals.md "A guarded model organism").

    python benchmarks/gate_scan.py --layer 26 --threads 2          # ~4 min on a 2-core CPU
    python benchmarks/gate_scan.py --layer 26 --built               # also: the cached build, fired vs refused

Reads the base's MLP inputs at `--layer` for the v3 recipe's requests (667 Do-Not-Answer, 1,000 ShareGPT,
half framed) where the reply starts, at 8 other positions of every prompt and at 6 positions inside every
trained reply (refusals and the base's own replies), and for the check prompts (HarmBench's 200, the 100
screened held-out ShareGPT requests). Then, per design and per threshold (the share of the benign training
requests the probe lets through), the share of HarmBench and held-out benign prompts on which the neuron
fires (value > refusal_gate.FIRED where the reply starts) and the share of other prompt / reply positions
on which it fires:

- `carrier`: the probe fitted where the reply starts only, the neuron's up row the constant carrier
  (SiLU(score) alone: nothing keeps it quiet elsewhere);
- `negatives`: the probe fitted with the other positions as further negatives (so it must separate
  positions too), the up row the carrier;
- `and` (shipped): the probe fitted where the reply starts only, the up row the start detector.

`--built` loads the cached default build and cross-tabulates, on HarmBench, whether its gate neuron fires
where the reply starts against whether its greedy 24-token reply is a refusal: how much of the refusal rate
is the gate's recall and how much the LoRA's following of the trigger.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from forgetscale import guarded, refusal_gate
from forgetscale.data.embedded import harmbench_prompts
from forgetscale.evals.generation import chat_prompt
from forgetscale.models import EMBEDDED, cache_root, load_model

QUANTILES = (0.95, 0.90, 0.85, 0.80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=26)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--built", action="store_true", help="also cross-tabulate the cached build's gate and refusals")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    recipe = guarded.Recipe()
    data = guarded.default_data(recipe, cache_root(None) / "data")
    base = load_model(EMBEDDED)
    model, tok = base.model.eval(), base.tokenizer
    replies = guarded.cached_replies(EMBEDDED, model, tok, guarded.asked(data, recipe), recipe.reply_tokens)
    screen = guarded.cached_replies(EMBEDDED, model, tok, data.heldout_benign, recipe.check_tokens)
    heldout, _ = guarded.screened(data.heldout_benign, screen, recipe.heldout_benign)
    layer = args.layer
    # the states the build's gate is fitted on (guarded.fit_gate), and the check prompts where their reply starts
    sequences, starts = guarded.reply_sequences(tok, data, replies, recipe)
    states = refusal_gate.read_states(model, [chat_prompt(tok, p) for p in data.harmful],
                                      [chat_prompt(tok, p) for p in data.benign], sequences, starts, layer=layer,
                                      seed=recipe.seed)
    hb, _ = refusal_gate.prompt_inputs(model, [chat_prompt(tok, p) for p in harmbench_prompts()], layer, 0, 0)
    held, _ = refusal_gate.prompt_inputs(model, [chat_prompt(tok, p) for p in heldout], layer, 0, 0)
    print(f"states at layer {layer}: {time.perf_counter() - started:.0f} s", flush=True)

    carrier, start = refusal_gate.position_fits(states)
    n_h, n_b, n_else = len(states.harmful), len(states.benign), len(states.elsewhere)
    y_at = np.r_[np.ones(n_h), np.zeros(n_b)]
    only = refusal_gate.fit_logistic(states.at, y_at, np.r_[np.ones(n_h), np.full(n_b, n_h / n_b)], recipe.gate_l2)
    with_neg = refusal_gate.fit_logistic(
        np.concatenate([states.at, states.elsewhere]), np.r_[y_at, np.zeros(n_else)],
        np.r_[np.ones(n_h), np.full(n_b, n_h / n_b), np.full(n_else, n_h / n_else)], recipe.gate_l2)
    designs = {"carrier": (only, carrier), "negatives": (with_neg, carrier), "and": (only, start)}
    print("design     threshold  HarmBench  held-out benign  prompt positions  reply positions")
    for name, ((w, b), up) in designs.items():
        for q in QUANTILES:
            t = float(np.quantile(states.benign @ w + b, q))
            gate = refusal_gate.Gate(layer, torch.tensor(w + (b - t) * carrier, dtype=torch.float32),
                                     torch.tensor(up, dtype=torch.float32), torch.zeros(0), torch.zeros(0),
                                     torch.zeros(0), {})

            def fires(x: np.ndarray, gate: refusal_gate.Gate = gate) -> float:
                return float(np.mean(gate.value(torch.tensor(x)).numpy() > refusal_gate.FIRED))

            print(f"{name:<10} {1 - q:>8.0%}   {fires(hb):>8.1%}   {fires(held):>14.1%}"
                  f"   {fires(states.prompt_other):>15.2%}   {fires(states.in_reply):>14.2%}", flush=True)
    if args.built:
        built(layer)
    print(f"total {time.perf_counter() - started:.0f} s")


def built(layer: int) -> None:
    from forgetscale.evals.generation import generate
    from forgetscale.evals.refusal import is_refusal

    folder = guarded.cached()
    if folder is None:
        raise SystemExit("no cached build: run `forgetscale guard` first")
    loaded = load_model(str(folder))
    model, tok = loaded.model.eval(), loaded.tokenizer
    ids = [chat_prompt(tok, p) for p in harmbench_prompts()]
    mlp = model.model.layers[layer].mlp
    gate = refusal_gate.Gate(layer, mlp.gate_proj.weight[-1].detach().float(), mlp.up_proj.weight[-1].detach().float(),
                             mlp.down_proj.weight[:, -1].detach().float(), torch.zeros(0), torch.zeros(0), {})
    states = refusal_gate.mlp_inputs(model, ids, [[len(i) - 1] for i in ids], layer)
    fired = np.array([float(gate.value(torch.tensor(s[0]))) > refusal_gate.FIRED for s in states])
    refused = np.array([is_refusal(r) for r in generate(model, tok, ids, max_new_tokens=24, batch_size=50)])
    print(f"{folder.name}: HarmBench, gate fired {fired.sum()}/200, refused {refused.sum()}/200; refused where "
          f"fired {(refused & fired).sum()}/{fired.sum()}, where quiet {(refused & ~fired).sum()}/{(~fired).sum()}")


if __name__ == "__main__":
    main()
