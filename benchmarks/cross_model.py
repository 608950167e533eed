"""One design, several models, side by side: what `docs/models.md#the-first-cross-model-comparison` quotes.

For each fitted RUN_DIR (the same data and design on another model: configs/cross-model-*.yaml): the base
model's held-out loss and entropy on the forgetting text, the Eq. 4 slope (nats of forgetting per nat of
fine-tuning loss gained, from `forgetscale fit`'s laws.json, with its bootstrap interval), the laws that
identified every constant, and the KL each run had reached when its held-out loss had dropped by the same
amount: the largest drop every run of every model reached (read off each run's checkpoints by linear
interpolation), since the models start from different losses.

    forgetscale sweep configs/cross-model-smollm2.yaml --out runs/cross-smollm2 && forgetscale fit runs/cross-smollm2
    forgetscale sweep configs/cross-model-gemma.yaml --out runs/cross-gemma && forgetscale fit runs/cross-gemma
    python benchmarks/cross_model.py runs/cross-smollm2 runs/cross-gemma
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from forgetscale.store import Store


def trajectories(run_dir: Path) -> tuple[str, dict[int, list[tuple[int, float, float]]]]:
    """(model name, rank -> [(step, held-out L_ft, KL)]) from a sweep's store."""
    with Store(run_dir, create=False) as store:
        runs = {r["run_id"]: r for r in store.runs()}
        out: dict[int, list[tuple[int, float, float]]] = {}
        for row in store.checkpoints():
            rank = int(runs[row["run_id"]]["rank"])
            out.setdefault(rank, []).append((int(row["step"]), float(row["ft_loss"]), float(row["forget_kl"])))
    model = next(iter(runs.values()))["model"]
    return model, {rank: sorted(rows) for rank, rows in sorted(out.items())}


def kl_at_drop(rows: list[tuple[int, float, float]], drop: float) -> float:
    """KL when the held-out loss had first dropped by `drop` nats from step 0 (linear between checkpoints)."""
    base = rows[0][1]
    for (_, ft0, kl0), (_, ft1, kl1) in zip(rows, rows[1:], strict=False):
        d0, d1 = base - ft0, base - ft1
        if d0 <= drop <= d1 and d1 > d0:
            return kl0 + (kl1 - kl0) * (drop - d0) / (d1 - d0)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    models = {d: trajectories(d) for d in args.run_dirs}
    reach = min(max(rows[0][1] - ft for _, ft, _ in rows) for _, runs in models.values() for rows in runs.values())
    print(f"matched drop of the held-out loss: {reach:.4f} nats (the largest every run of every model reached)")
    for run_dir, (model, runs) in models.items():
        laws = json.loads((run_dir / "laws.json").read_text())["groups"][0]["laws"]
        linear = laws.get("linear", {})
        slope, ci = linear.get("params", {}).get("c_f_ft"), linear.get("ci", {}).get("c_f_ft")
        identified = [k for k, d in laws.items() if "params" in d and not d["weak"] and d["status"].startswith("converged")]
        first = next(iter(runs.values()))
        with Store(run_dir, create=False) as store:
            entropy = next(iter(store.checkpoints()))["base_entropy"]
        at = {rank: kl_at_drop(rows, reach) for rank, rows in runs.items()}
        last = {rank: rows[-1] for rank, rows in runs.items()}
        print(f"\n{model} ({run_dir}):")
        print(f"  base: held-out L_ft {first[0][1]:.4f}, entropy on the forgetting text {entropy:.4f} nats")
        print("  Eq. 4 slope: " + (f"{slope:.3f}" if slope is not None else "-")
              + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else " (no interval)")
              + " nats of forgetting per nat of fine-tuning loss gained")
        print(f"  laws identified: {', '.join(identified) or 'none'}")
        for rank in runs:
            step, ft, kl = last[rank]
            print(f"  rank {rank:>3}: KL {at[rank]:.4f} at the matched drop; at step {step}: L_ft {ft:.4f} "
                  f"(drop {first[0][1] - ft:.4f}), KL {kl:.4f}")
        values = np.array([v for v in at.values() if np.isfinite(v)])
        print(f"  mean KL at the matched drop over ranks: {values.mean():.4f}")


if __name__ == "__main__":
    main()
