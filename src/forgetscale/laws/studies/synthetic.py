"""Simulate a sweep from given constants plus noise: what the laws' tests fit back, and what users can
use to see how many ranks, seeds and steps a sweep needs before the constants are identifiable.

Rows follow Eq. 5 and Eq. 6 (the power laws), with log-normal noise per checkpoint and an optional
offset per run (runs of one rank really do differ by seed). Step 0 rows hold the base model:
forgetting CE = base entropy, KL = 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from forgetscale.laws.estimators import forms
from forgetscale.laws.studies import paper


def simulate_frame(
    constants: Mapping[str, float],
    *,
    dataset: str = "openorca",
    method: str = "lora",
    ranks: Iterable[int] = paper.RANKS,
    steps: Iterable[int] = range(10, 261, 10),
    seeds: Iterable[int] = (0, 1, 2),
    p_per_rank: int = paper.P_PER_RANK,
    noise: float = 0.004,
    run_noise: float = 0.002,
    base_entropy: float = 0.2,
    seed: int = 0,
) -> pd.DataFrame:
    """Checkpoint rows shaped like Store.frame(): L_ft from Eq. 5, L_f from Eq. 6, times exp(noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    steps = sorted(int(s) for s in steps)
    for rank in ranks:
        P = p_per_rank * int(rank)
        for s in seeds:
            run_id = f"{dataset}-{method}-r{rank}-s{s}"
            off_ft, off_f = rng.normal(0.0, run_noise, 2)
            N = np.array(steps, dtype=float)
            ft = forms.power_ft(P, N, constants) * np.exp(off_ft + rng.normal(0.0, noise, N.size))
            f = forms.power_f(P, N, constants) * np.exp(off_f + rng.normal(0.0, noise, N.size))
            base = {"run_id": run_id, "model": "simulated", "dataset": dataset, "method": method,
                    "method_config": json.dumps({"rank": int(rank)}), "rank": int(rank), "trainable_params": P,
                    "seed": int(s), "mitigation": "none", "status": "finished"}
            rows.append({**base, "step": 0, "ft_loss": float(ft[0]) * 1.5, "forget_ce": base_entropy,
                         "forget_kl": 0.0})
            for n, a, b in zip(steps, ft, f, strict=True):
                rows.append({**base, "step": n, "ft_loss": float(a), "forget_ce": float(b),
                             "forget_kl": float(b) - base_entropy})
    frame = pd.DataFrame(rows)
    frame["ft_loss_train"] = frame["ft_loss"] * 0.97
    frame["train_loss"] = frame["ft_loss_train"]
    frame["forget_ce_hard"] = frame["forget_ce"] * 1.3
    frame["base_entropy"] = base_entropy
    frame["ft_kl"] = np.nan
    frame["tokens_seen"] = frame["step"] * 32 * 512
    frame["wall_s"] = frame["step"] * 1.0
    return frame


def write_store(run_dir: str | Path, frame: pd.DataFrame, sweep_config: Mapping | None = None) -> Path:
    """Write simulated rows into RUN_DIR/results.sqlite through the Store (as a real sweep would)."""
    from forgetscale.store import CHECKPOINT_COLUMNS, CheckpointRow, RunRecord, Store

    run_dir = Path(run_dir)
    with Store(run_dir, create=True) as store:
        for run_id, g in frame.groupby("run_id", sort=False):
            first = g.iloc[0]
            store.add_run(RunRecord(
                run_id=run_id, model=first["model"], dataset=first["dataset"], method=first["method"],
                method_config=json.loads(first["method_config"]), rank=int(first["rank"]),
                trainable_params=int(first["trainable_params"]), seed=int(first["seed"]),
                mitigation=first["mitigation"], config={"simulated": True, "rank": int(first["rank"])},
                status=first["status"],
            ))
            for row in g.to_dict("records"):
                store.add_checkpoint(CheckpointRow(**{c: row[c] for c in CHECKPOINT_COLUMNS if c in row}))
        config = sweep_config or {"simulated": True, "datasets": sorted(frame["dataset"].unique())}
        store.set_meta("sweep_config", json.dumps(config, sort_keys=True))
    return run_dir


def simulate_sweep(run_dir: str | Path, datasets: Iterable[str] = ("openorca",), **kw) -> Path:
    """A simulated sweep from the paper's constants for each dataset, stored in RUN_DIR."""
    frames = [simulate_frame(paper.constants(d), dataset=d, **{"seed": i, **kw}) for i, d in enumerate(datasets)]
    return write_store(run_dir, pd.concat(frames, ignore_index=True))
