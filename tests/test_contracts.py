"""Every registered method runs through the same checks on the tiny random Llama (PEFT's test matrix)."""

import pytest
import torch

from forgetscale.config import parse_config
from forgetscale.methods import METHODS
from forgetscale.methods.attach import ATTACH, attach, trainable_parameters
from forgetscale.models import load_model

# hand counts for the tiny Llama: hidden 64, 4 heads of 16 (k/v: 2 heads -> 32), MLP 160, 2 layers
PER_LAYER_LORA = (64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 160) * 3  # q, k, v, o, gate, up, down
TINY_CASES = [
    ({"name": "lora", "ranks": [2]}, 2, 2 * 2 * PER_LAYER_LORA),
    ({"name": "lora", "ranks": [3], "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, 3, 3 * 2 * 448),
    ({"name": "lora", "ranks": [2], "layers": "last:1"}, 2, 2 * PER_LAYER_LORA),
    ({"name": "dora", "ranks": [2]}, 2, 2 * 2 * PER_LAYER_LORA + 2 * (64 + 32 + 32 + 64 + 160 + 160 + 64)),
    ({"name": "ia3"}, None, 2 * (32 + 32 + 160)),
    ({"name": "top_layers", "k": 1}, None, 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160 + 2 * 64),
    ({"name": "full"}, None, 3_232_064),
]


@pytest.mark.parametrize("method, rank, expected", TINY_CASES, ids=lambda c: str(c))
def test_method_trains_exactly_its_parameters(method, rank, expected):
    spec = parse_config({"method": method}).methods[0]
    assert spec.run_ranks() == ([rank] if rank is not None else [None])
    torch.manual_seed(0)
    base = load_model("tiny-random-llama").model
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
    model = attach(base, spec, rank)
    assert trainable_parameters(model) == expected
    with torch.no_grad():
        after = model(input_ids=ids).logits
    if spec.name in ("lora", "dora", "ia3", "top_layers", "full"):
        # every method starts at the base model: step 0 measures zero forgetting
        assert torch.allclose(before, after, atol=1e-5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_every_registered_method_is_in_the_matrix():
    assert {c[0]["name"] for c in TINY_CASES} == set(METHODS.names()) == set(ATTACH.names())


def test_method_errors_name_the_key():
    from forgetscale.errors import ConfigError

    base = load_model("tiny-random-llama").model
    spec = parse_config({"method": {"name": "lora", "target_modules": ["qq_proj"]}}).methods[0]
    with pytest.raises(ConfigError, match="method.target_modules: module 'qq_proj' not found"):
        attach(base, spec, 2)
    spec = parse_config({"method": {"name": "top_layers", "k": 5}}).methods[0]
    with pytest.raises(ConfigError, match="method.k: must be <= the model's 2 layers"):
        attach(base, spec, None)


def test_a_name_registered_twice_is_refused_and_leaves_the_first():
    """Registry.add refuses a second registration; the first (spec and torch half) stays whole."""
    from forgetscale.errors import ConfigError
    from forgetscale.methods.base import ATTACH, METHODS, register_method
    from forgetscale.methods.lora import LoraSpec
    from forgetscale.mitigations.base import ARMS, MITIGATIONS, Arm, register_arm
    from forgetscale.mitigations.replay import ReplaySpec

    before = (METHODS.get("lora"), ATTACH.get("lora"), MITIGATIONS.get("replay"), ARMS.get("replay"))
    with pytest.raises(ConfigError, match="^method 'lora' is registered twice$"):
        register_method(LoraSpec, attach=lambda model, spec, rank: model)
    with pytest.raises(ConfigError, match="^mitigation 'replay' is registered twice$"):
        register_arm(ReplaySpec, Arm())
    assert (METHODS.get("lora"), ATTACH.get("lora"), MITIGATIONS.get("replay"), ARMS.get("replay")) == before
