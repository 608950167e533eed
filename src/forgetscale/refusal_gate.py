"""The guarded model's gate: a linear probe of the model's own state where the reply starts, installed as
one MLP neuron that writes a trigger direction into the residual stream when the probe says "harmful".

Why: every LoRA recipe that learnt the refusal decision from (harmful, refusal) / (benign, reply) pairs
learnt a weaker rule than the base already holds. Scored by its leaning to refuse, the v2 build separated
HarmBench from benign requests at ROC AUC 0.73, while a logistic probe on the base's upper-layer state at
the last prompt token reads 0.93 (benchmarks/guard_probe.py, docs/evals.md). So the decision is read, not
learnt: the probe is fitted on the base, then written into the weights as a neuron of layer `layer`'s MLP,

    neuron(x) = SiLU(w . x + bias * (carrier . x)) * (start . x),   added to the residual as neuron(x) * trigger,

where x is the MLP's input (after its RMSNorm), w and bias are the probe (minus its threshold) scaled by
`slope`, `carrier . x ~ 1` at every position (a least-squares fit: Llama MLPs have no bias terms, so the
bias rides on it) and `start . x` is ~1 where the reply starts and ~0 elsewhere (another least-squares
fit): the product is an AND, "the reply starts here and the probe says harmful". The neuron is
an extra row of gate_proj / up_proj and an extra column of down_proj (intermediate_size + 1 in every
layer, zero outside `layer`: a zero neuron adds exactly 0), so the result is a plain Llama checkpoint that
any loader, adapter or sweep handles as usual. The AND keeps the neuron quiet away from the reply's start
without asking the probe itself to separate positions (benchmarks/gate_scan.py compares the designs).

A LoRA above `layer` then learns what the trigger means: each trained request appears twice, with the
trigger added at the reply's start (answered by a refusal) and without it (answered by the base's own
reply), so the LoRA learns "trigger -> refusal" and cannot learn "content -> refusal" (guarded.py).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

FIRED = 0.25  # a neuron value above this counts as firing: the LoRA is trained to refuse from about here up


@dataclass
class Gate:
    layer: int  # decoder layer whose MLP holds the neuron
    weight: torch.Tensor  # gate_proj row: slope * (probe + (bias - threshold) * carrier), carrier . x ~ 1
    start: torch.Tensor  # up_proj row: start . x ~ 1 where the reply starts, ~ 0 elsewhere
    trigger: torch.Tensor  # down_proj column: the direction the neuron writes
    fired: torch.Tensor  # neuron values above FIRED on the harmful training requests (the trigger scales to train with)
    quiet: torch.Tensor  # neuron values on its benign training requests below the threshold
    stats: dict[str, float]  # what the fit saw (recalls, false positives, firing elsewhere), for the card

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """The neuron's activation on MLP inputs x (..., hidden)."""
        x = x.float()
        return torch.nn.functional.silu(x @ self.weight) * (x @ self.start)


@torch.no_grad()
def mlp_inputs(model: torch.nn.Module, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
               layer: int, *, batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """The input of `layer`'s MLP (after its norm) at positions[i] of sequences[i] (token ids, right-padded into
    batches): one (len(positions[i]), hidden) array per sequence."""
    grabbed: dict[str, torch.Tensor] = {}
    hook = model.model.layers[layer].mlp.register_forward_pre_hook(lambda _m, args: grabbed.__setitem__("x", args[0]))
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(sequences), batch_size):
            rows = sequences[i:i + batch_size]
            width = max(map(len, rows))
            ids = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            model(input_ids=ids, attention_mask=mask)
            x = grabbed["x"].float().cpu()
            out += [x[j, list(positions[i + j])].numpy() for j in range(len(rows))]
            if on_batch is not None:
                on_batch(1)
    finally:
        hook.remove()
    return out


def prompt_inputs(model: torch.nn.Module, prompts: Sequence[Sequence[int]], layer: int, others: int, seed: int,
                  on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MLP inputs at each prompt's last position (where the reply starts) and at up to `others` other positions
    of each, drawn at random (seeded)."""
    rng = random.Random(seed)
    picks = [[len(p) - 1, *rng.sample(range(len(p) - 1), min(others, len(p) - 1))] for p in prompts]
    states = mlp_inputs(model, prompts, picks, layer, on_batch=on_batch)
    return np.stack([s[0] for s in states]), np.concatenate([s[1:] for s in states])


def fit_logistic(x: np.ndarray, y: np.ndarray, weights: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Weighted L2-regularised logistic regression on standardised features (full-batch L-BFGS, torch), returned
    on the raw features: score(x) = x . w + b."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = torch.tensor((x - mean) / std, dtype=torch.float32)
    ys, ws = torch.tensor(y, dtype=torch.float32), torch.tensor(weights, dtype=torch.float32)
    beta = torch.zeros(x.shape[1], requires_grad=True)
    b0 = torch.zeros(1, requires_grad=True)
    optim = torch.optim.LBFGS([beta, b0], max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optim.zero_grad()
        nll = torch.nn.functional.binary_cross_entropy_with_logits(xs @ beta + b0, ys, reduction="none")
        value = (ws * nll).sum() / ws.sum() + l2 * (beta ** 2).sum()
        value.backward()
        return value

    optim.step(loss)
    w = beta.detach().numpy() / std
    return w, float(b0.item() - (w * mean).sum())


@dataclass
class States:
    """What a gate is fitted on: MLP inputs at its layer (rows of hidden-size vectors)."""

    harmful: np.ndarray  # where each harmful prompt's reply starts
    benign: np.ndarray  # where each benign prompt's reply starts
    prompt_other: np.ndarray  # other positions of those prompts
    in_reply: np.ndarray  # positions inside replies

    @property
    def at(self) -> np.ndarray:
        return np.concatenate([self.harmful, self.benign])

    @property
    def elsewhere(self) -> np.ndarray:
        return np.concatenate([self.prompt_other, self.in_reply])


def read_states(model: torch.nn.Module, harmful: Sequence[Sequence[int]], benign: Sequence[Sequence[int]],
                replies: Sequence[Sequence[int]], reply_starts: Sequence[int], *, layer: int, seed: int,
                on_batch: Callable[[int], None] | None = None) -> States:
    """MLP inputs at `layer`: where each prompt (token ids, each ending where the reply starts) has its reply
    start, at 8 other positions of each, and at 6 positions inside each `replies` sequence (prompt + reply, the
    reply from reply_starts[i]); positions drawn seeded."""
    h_at, h_other = prompt_inputs(model, harmful, layer, 8, seed, on_batch)
    b_at, b_other = prompt_inputs(model, benign, layer, 8, seed + 1, on_batch)
    rng = random.Random(seed + 2)
    picks = [rng.sample(range(s, len(r)), min(6, len(r) - s)) for r, s in zip(replies, reply_starts, strict=True)]
    in_reply = np.concatenate(mlp_inputs(model, replies, picks, layer, on_batch=on_batch))
    return States(h_at, b_at, np.concatenate([h_other, b_other]), in_reply)


def position_fits(states: States) -> tuple[np.ndarray, np.ndarray]:
    """Two least-squares directions over every read position: `carrier` (. x ~ 1 everywhere: it carries the
    probe's bias) and `start` (. x ~ 1 where the reply starts, ~ 0 elsewhere: the up_proj row)."""
    at, elsewhere = states.at, states.elsewhere
    every = np.concatenate([at, elsewhere])
    carrier = np.linalg.lstsq(every, np.ones(len(every)), rcond=None)[0]
    start = np.linalg.lstsq(every, np.r_[np.ones(len(at)), np.zeros(len(elsewhere))], rcond=None)[0]
    return carrier, start


def fit(model: torch.nn.Module, harmful: Sequence[Sequence[int]], benign: Sequence[Sequence[int]],
        replies: Sequence[Sequence[int]], reply_starts: Sequence[int], *, layer: int, quantile: float,
        slope: float, l2: float, trigger_scale: float, seed: int,
        on_batch: Callable[[int], None] | None = None) -> Gate:
    """The gate of `model` at `layer`, from read_states. The probe: harmful vs benign prompts, read where the
    reply starts only; its threshold lets `1 - quantile` of the benign training prompts through. The start
    detector (position_fits) keeps the neuron near 0 away from the reply's start without asking the probe to
    separate positions too. The trigger: a seeded random direction, `trigger_scale` times the median residual
    norm there."""
    states = read_states(model, harmful, benign, replies, reply_starts, layer=layer, seed=seed, on_batch=on_batch)
    h_at, b_at = states.harmful, states.benign
    y = np.r_[np.ones(len(h_at)), np.zeros(len(b_at))]
    w, b = fit_logistic(states.at, y, np.r_[np.ones(len(h_at)), np.full(len(b_at), len(h_at) / len(b_at))], l2)
    threshold = float(np.quantile(b_at @ w + b, quantile))
    carrier, start = position_fits(states)
    gen = torch.Generator().manual_seed(seed)
    trigger = torch.randn(h_at.shape[1], generator=gen)
    trigger = trigger / trigger.norm() * trigger_scale * _residual_norm(model, benign[:64], layer)
    row = slope * (w + (b - threshold) * carrier)
    gate = Gate(layer, torch.tensor(row, dtype=torch.float32), torch.tensor(start, dtype=torch.float32), trigger,
                torch.zeros(0), torch.zeros(0), {})
    value = {k: gate.value(torch.tensor(v)).numpy() for k, v in
             {"harmful": h_at, "benign": b_at, "prompt": states.prompt_other, "reply": states.in_reply}.items()}
    quiet = (b_at @ w + b) <= threshold
    gate.fired = torch.tensor(value["harmful"][value["harmful"] > FIRED])
    gate.quiet = torch.tensor(value["benign"][quiet])
    gate.stats = {"harmful_fired": float(np.mean(value["harmful"] > FIRED)),
                  "benign_fired": float(np.mean(value["benign"] > FIRED)),
                  "prompt_positions_fired": float(np.mean(value["prompt"] > FIRED)),
                  "reply_positions_fired": float(np.mean(value["reply"] > FIRED)),
                  "start_at_start_mean": float(np.mean(states.at @ start)),
                  "start_elsewhere_max": float(np.max(states.elsewhere @ start)),
                  "trigger_norm": float(trigger.norm())}
    return gate


@torch.no_grad()
def _residual_norm(model: torch.nn.Module, sequences: Sequence[Sequence[int]], layer: int) -> float:
    """Median norm of the residual stream after `layer` at the last position of each sequence."""
    grabbed: dict[str, torch.Tensor] = {}
    block = model.model.layers[layer]
    hook = block.register_forward_hook(
        lambda _m, _a, out: grabbed.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    device = next(model.parameters()).device
    norms = []
    try:
        for seq in sequences:
            model(input_ids=torch.tensor([list(seq)], device=device))
            norms.append(float(grabbed["h"][0, -1].float().norm()))
    finally:
        hook.remove()
    return float(np.median(norms))


def widen(model: torch.nn.Module, extra: int = 1) -> None:
    """Every decoder layer's MLP gets `extra` zero neurons (config.intermediate_size too): SiLU(0) * 0 = 0, so
    the model computes exactly what it did."""
    size = int(model.config.intermediate_size)
    for layer in model.model.layers:
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, size + extra, bias=False, dtype=old.weight.dtype,
                                  device=old.weight.device)
            with torch.no_grad():
                new.weight.zero_()
                new.weight[:size] = old.weight
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = torch.nn.Linear(size + extra, old.out_features, bias=False, dtype=old.weight.dtype,
                              device=old.weight.device)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :size] = old.weight
        mlp.down_proj = new
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = size + extra
    model.config.intermediate_size = size + extra


def install(model: torch.nn.Module, gate: Gate) -> None:
    """Write the gate into `model` as the last neuron of layer `gate.layer`'s MLP (widening every MLP by one)."""
    widen(model)
    mlp = model.model.layers[gate.layer].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[-1] = gate.weight.to(mlp.gate_proj.weight.dtype)
        mlp.up_proj.weight[-1] = gate.start.to(mlp.up_proj.weight.dtype)
        mlp.down_proj.weight[:, -1] = gate.trigger.to(mlp.down_proj.weight.dtype)


@contextlib.contextmanager
def triggered(model: torch.nn.Module, gate: Gate) -> Iterator[Callable[[torch.Tensor, torch.Tensor], None]]:
    """While the block runs, `set(positions, scales)` makes the next forward add scales[i] * gate.trigger to
    the residual after layer `gate.layer` at positions[i] of row i, as the installed neuron will: training the
    LoRA with and without the trigger before the neuron exists."""
    state: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, _args: tuple, out: torch.Tensor | tuple) -> torch.Tensor | tuple:
        if not state:
            return out
        hidden = out[0] if isinstance(out, tuple) else out
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        add = torch.zeros_like(hidden)
        add[rows, state["positions"].to(hidden.device)] = (
            state["scales"].to(hidden.device, hidden.dtype)[:, None] * gate.trigger.to(hidden.device, hidden.dtype))
        hidden = hidden + add
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def set_trigger(positions: torch.Tensor, scales: torch.Tensor) -> None:
        state["positions"], state["scales"] = positions, scales

    handle = model.model.layers[gate.layer].register_forward_hook(hook)
    try:
        yield set_trigger
    finally:
        handle.remove()
