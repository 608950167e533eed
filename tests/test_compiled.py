"""train.compile: the compiled training step gives the eager step's numbers within the precision's rounding
(fp32: 1e-5 relative; bf16 autocast: bf16's own rounding), measuring stays eager (so step 0 is bit-identical
and the KL has no rounding floor), and the key keeps run ids at its default and changes them when set."""

from __future__ import annotations

import math

import pytest
import torch

from forgetscale.compiled import body, compile_model, compiled, matmul_rate
from forgetscale.config import parse_config
from forgetscale.errors import ConfigError
from forgetscale.methods.attach import attach, skip_lora_input_casts, upcast_trainable
from forgetscale.metric.head import next_token_loss
from forgetscale.metric.sums import autocast
from forgetscale.models import load_base_weights
from forgetscale.runs import plan_runs
from forgetscale.sweep import run_sweep

CPU = torch.device("cpu")


def _lora_model(cfg, rank: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = attach(load_base_weights(cfg), cfg.method[0], rank)
    upcast_trainable(model)
    with torch.no_grad():  # B = 0 at init leaves A's gradient 0: make every LoRA gradient non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model


def _loss_and_grads(model, ids, mask, labels, dtype):
    with autocast(CPU, dtype):
        loss = next_token_loss(model, ids, mask, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_layers_give_the_eager_step_within_the_precision(tiny_cfg, precision):
    bf16 = precision == "bf16"
    cfg = parse_config(tiny_cfg(model={"name": "tiny-random-llama", "dtype": "bfloat16" if bf16 else "float32"},
                                train={"threads": 1}))
    dtype = torch.bfloat16 if bf16 else None
    model = _lora_model(cfg)
    if bf16:
        skip_lora_input_casts(model)
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=gen)
    mask, labels = torch.ones_like(ids), ids.clone()
    eager_loss, eager = _loss_and_grads(model, ids, mask, labels, dtype)
    assert compile_model(model, "layers") == model.config.num_hidden_layers
    with compiled(True):
        loss, grads = _loss_and_grads(model, ids, mask, labels, dtype)
    with compiled(False):  # the same module, eager again: the eager numbers to the bit
        again, again_grads = _loss_and_grads(model, ids, mask, labels, dtype)
    assert again == eager_loss and all(torch.equal(again_grads[n], g) for n, g in eager.items())
    rel_loss, rel_grad = (2e-3, 5e-2) if bf16 else (1e-6, 1e-4)
    assert abs(loss - eager_loss) <= rel_loss * abs(eager_loss)
    for name, g in eager.items():
        scale = float(g.abs().max())
        assert scale > 0, name
        assert float((grads[name] - g).abs().max()) <= rel_grad * scale, name


def test_a_compiled_sweep_measures_eagerly_and_stays_within_rounding(tiny_cfg, tmp_path):
    plain = tiny_cfg(method={"name": "lora", "ranks": [2]}, train={"threads": 1})
    fast = tiny_cfg(method={"name": "lora", "ranks": [2]}, train={"threads": 1, "compile": "layers"})
    a = run_sweep(parse_config(plain), tmp_path / "a", progress=False).checkpoints()
    b = run_sweep(parse_config(fast), tmp_path / "b", progress=False).checkpoints()
    keys = ("forget_ce", "forget_ce_hard", "forget_kl", "base_entropy", "ft_kl", "ft_loss", "ft_loss_train")
    assert [a[0][k] for k in keys] == [b[0][k] for k in keys]  # step 0: measured eagerly, before any step
    assert b[0]["forget_kl"] == 0.0
    for x, y in zip(a[1:], b[1:], strict=True):
        for k in (*keys, "train_loss"):
            assert math.isclose(x[k], y[k], rel_tol=1e-4, abs_tol=1e-7), k


def test_compile_key_keeps_run_ids_at_its_default_and_changes_them_when_set(tiny_cfg):
    ids = [p.run_id for p in plan_runs(parse_config(tiny_cfg()))]
    assert [p.run_id for p in plan_runs(parse_config(tiny_cfg(train={"compile": "off"})))] == ids
    assert "compile" not in parse_config(tiny_cfg()).to_dict()["train"]  # stored sweep configs stay as they were
    on = [p.run_id for p in plan_runs(parse_config(tiny_cfg(train={"compile": "layers"})))]
    assert set(on).isdisjoint(ids)
    with pytest.raises(ConfigError, match="train.compile"):
        parse_config(tiny_cfg(train={"compile": "yes"}))


def test_body_and_matmul_rate(tiny_cfg):
    cfg = parse_config(tiny_cfg())
    model = attach(load_base_weights(cfg), cfg.method[0], 2)
    assert body(model) is model.get_base_model().model
    assert matmul_rate(16, 16, 16, torch.float32, seconds=0.01) > 0
    with pytest.raises(ValueError, match="compile kind"):
        compile_model(model, "everything")
