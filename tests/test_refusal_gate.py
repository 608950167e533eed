"""The guarded model's gate (refusal_gate.py): the probe it fits recovers a planted direction, the widened
model computes exactly what it did, the installed neuron adds the trigger where the probe fires and nothing
where it does not, and the training-time trigger adds what the neuron will."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forgetscale import refusal_gate
from forgetscale.models import load_model


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_model("tiny-random-llama")


def test_logistic_fit_recovers_a_planted_direction():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 8)) * np.array([1, 2, 3, 1, 1, 1, 1, 1]) + 5.0
    truth = np.array([2.0, -1.0, 0.5, 0, 0, 0, 0, 0])
    y = (rng.random(4000) < 1 / (1 + np.exp(-(x @ truth - (5.0 * truth.sum()))))).astype(float)
    w, b = refusal_gate.fit_logistic(x, y, np.ones(len(y)), l2=1e-6)
    assert np.allclose(w, truth, atol=0.15)
    assert abs(b + 5.0 * truth.sum()) < 1.0  # the intercept, on the raw (unstandardised) inputs


def test_widened_model_computes_exactly_what_it_did(tiny):
    model = load_model("tiny-random-llama").model.eval()
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        refusal_gate.widen(model)
        after = model(input_ids=ids).logits
    assert model.config.intermediate_size == 161
    assert all(layer.mlp.down_proj.in_features == 161 for layer in model.model.layers)
    assert torch.equal(before, after)


def _planted_gate(model: torch.nn.Module, layer: int, seed: int = 0) -> refusal_gate.Gate:
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    return refusal_gate.Gate(layer, torch.randn(hidden, generator=gen), torch.randn(hidden, generator=gen) / 8,
                             torch.randn(hidden, generator=gen), torch.ones(3), torch.zeros(3), {})


def test_installed_neuron_adds_its_value_times_the_trigger(tiny):
    model = load_model("tiny-random-llama").model.eval()
    gate = _planted_gate(model, layer=1)
    grabbed = {}
    mlp = model.model.layers[1].mlp
    mlp.register_forward_pre_hook(lambda _m, a: grabbed.__setitem__("x", a[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 33, 7, 2]]))
        x = grabbed["x"].clone()
        expected = mlp(x) + gate.value(x)[..., None] * gate.trigger
        refusal_gate.install(model, gate)
        got = model.model.layers[1].mlp(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert gate.value(x).abs().max() > 0.1  # the planted neuron does add something here
    assert not model.model.layers[0].mlp.down_proj.weight[:, -1].any()  # other layers' new neuron stays zero


def _layer_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The first decoder layer's output, recorded by a hook registered last (after any trigger hook)."""
    out = {}
    handle = model.model.layers[0].register_forward_hook(
        lambda _m, _a, o: out.__setitem__("h", (o[0] if isinstance(o, tuple) else o).clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return out["h"]


def test_training_trigger_is_added_at_the_given_positions_only(tiny):
    model = load_model("tiny-random-llama").model.eval()
    gate = _planted_gate(model, layer=0)
    ids = torch.tensor([[1, 5, 9, 33], [1, 6, 8, 2]])
    plain = _layer_output(model, ids)
    with refusal_gate.triggered(model, gate) as set_trigger:
        set_trigger(torch.tensor([2, 0]), torch.tensor([3.0, 0.5]))
        added = _layer_output(model, ids) - plain
    assert torch.allclose(added[0, 2], 3.0 * gate.trigger, atol=1e-4)
    assert torch.allclose(added[1, 0], 0.5 * gate.trigger, atol=1e-4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 2] = mask[1, 0] = False
    assert added[mask].abs().max() == 0
    assert torch.equal(_layer_output(model, ids), plain)  # the hook is gone after the block
