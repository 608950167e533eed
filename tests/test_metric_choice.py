"""benchmarks/metric_choice.py (issue 31): which forgetting number to log. The comparison on a planted store
and table (known ranks, known spreads), and the collection on a tiny-model sweep (its forget_kl and ft_kl are
the sweep's own stored numbers)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from forgetscale.config import parse_config
from forgetscale.store import Store
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("metric_choice", ROOT / "benchmarks" / "metric_choice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(model_key, run_id, step, suite, protocol, metric, value):
    return {"protocol": protocol, "model_key": model_key, "metric": metric, "run_id": run_id, "step": step,
            "n": 10, "value": value, "settings": "{}", "suite": suite}


def test_capability_losses_come_from_the_stored_summaries(bench, tmp_path):
    store = Store(tmp_path / "planted")
    store.replace_eval_summaries("choice", [
        _summary("base", None, None, "choice", "loglik", "agreement_with_base", 1.0),
        _summary("a@4", "a", 4, "choice", "loglik", "agreement_with_base", 0.75),
        _summary("a@4", "a", 4, "choice", "generate", "agreement_with_base", 0.1),  # another protocol: ignored
    ])
    store.replace_eval_summaries("safety", [
        _summary("base", None, None, "safety", "greedy", "refusal_rate", 0.8),
        _summary("a@4", "a", 4, "safety", "greedy", "refusal_rate", 0.5),
    ])
    assert bench.capability(store) == {("a", 4): {"choice_loss": 0.25, "refusal_loss": pytest.approx(0.3)}}
    store.close()
    table = pd.DataFrame([{"run_dir": str(tmp_path / "planted"), "run_id": "a", "step": 4},
                          {"run_dir": str(tmp_path / "planted"), "run_id": "b", "step": 4}])
    again = bench.refreshed(table)  # an earlier --out's checkpoints, capability read again from the store
    assert again["choice_loss"].iloc[0] == 0.25 and math.isnan(again["choice_loss"].iloc[1])


def _planted(seeds=(0, 1, 2)) -> pd.DataFrame:
    """Capability loss c per (cell, step); forget_kl = c + seed noise 1% (ranks c exactly within a seed);
    delta_ce independent of c; ft_kl = 2 c with 20% seed noise. Block SE: 5%, 50%, 10% of the value."""
    rng = np.random.default_rng(1)
    rows = []
    for cell in range(4):
        for step in (1, 2, 3):
            c = 0.1 * (cell + 1) * step
            for seed in seeds:
                kl, dce, ft = c * (1 + 0.01 * (seed - 1)), rng.normal(), 2 * c * (1 + 0.2 * (seed - 1))
                rows.append({"run_dir": "r", "cell": f"c{cell}", "step": step, "seed": seed, "choice_loss": c,
                             "refusal_loss": math.nan, "forget_kl": kl, "forget_kl_se": 0.05 * kl,
                             "delta_ce": dce, "delta_ce_se": 0.5 * abs(dce), "ft_kl": ft, "ft_kl_se": 0.1 * ft})
    return pd.DataFrame(rows)


def test_comparison_recovers_planted_noise_and_ranks(bench):
    result = bench.compare(_planted(), n_bootstrap=200)
    kl, dce, ft = result["forget_kl"], result["delta_ce"], result["ft_kl"]
    assert kl["checkpoints"] == 36 and kl["seed_groups"] == 12
    assert kl["block_rel_se"] == pytest.approx(0.05) and dce["block_rel_se"] == pytest.approx(0.5)
    assert kl["seed_cv"] == pytest.approx(0.01, rel=1e-6)  # sd of (0.99, 1, 1.01) c over its mean c
    assert ft["seed_cv"] == pytest.approx(0.2, rel=1e-6)
    assert kl["choice_loss"]["rho"] > 0.99 and kl["choice_loss"]["ci"][0] > 0.95
    assert abs(dce["choice_loss"]["rho"]) < 0.5 and dce["choice_loss"]["ci"][0] < 0 < dce["choice_loss"]["ci"][1]
    assert kl["refusal_loss"]["n"] == 0 and math.isnan(kl["refusal_loss"]["rho"])
    assert "| `forget_kl` | 36 | 0.050 | 0.010 (12) |" in bench.markdown(result)


def test_collect_on_a_tiny_sweep_gives_the_sweeps_own_numbers(bench, tmp_path):
    from forgetscale.cli import main
    from forgetscale.sweep import run_sweep

    before = torch.get_num_threads()
    cfg = parse_config(tiny_config(method={"name": "lora", "ranks": [2]},
                                   train={"seeds": [0, 1], "save_adapters": "all", "checkpoints": [0, 2, 4], "steps": 4}))
    store = run_sweep(cfg, tmp_path, progress=False)
    stored = {(c["run_id"], c["step"]): c for c in store.checkpoints()}
    store.close()
    assert main(["eval", str(tmp_path), "--suite", "choice", "--steps", "checkpoints", "--no-progress",
                 "--set", "choice.limit=3", "--set", "choice.max_new_tokens=2", "--set", "batch_size=4"]) == 0
    table = bench.collect(tmp_path)
    torch.set_num_threads(before)
    assert len(table) == 4 and set(table["step"]) == {2, 4}  # 2 seeds x 2 saved steps
    for _, row in table.iterrows():
        mine = stored[(row["run_id"], row["step"])]
        assert row["forget_kl"] == pytest.approx(mine["forget_kl"], rel=1e-6, abs=1e-9)
        assert row["ft_kl"] == pytest.approx(mine["ft_kl"], rel=1e-6, abs=1e-9)
        assert math.isfinite(row["delta_ce"]) and row["forget_kl_se"] > 0 and 0 <= row["choice_loss"] <= 1
    result = bench.compare(table, n_bootstrap=20)
    assert result["forget_kl"]["seed_groups"] == 2 and result["forget_kl"]["choice_loss"]["n"] == 4
