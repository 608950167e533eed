"""Ray executor vs local executor on one small sweep, side by side in one process.

    python benchmarks/bench_ray.py [--runs 4] [--steps 24]

Three timings of the same sweep (tiny random Llama, LoRA ranks 1..runs, one torch thread per run, so every
variant computes identical rows), each into a fresh RUN_DIR and, for Ray, on a fresh local instance with
2 CPUs (its start-up is timed apart):
  local     the default executor, runs one after another in this process
  ray x1    Ray executor, one run at a time (resources.max_parallel=1): the executor's overhead
  ray x2    Ray executor, two runs at a time on two CPU workers: the parallel speed-up
Sweep times include building the shared context (data, base predictions), which every variant does once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import tiny_config  # noqa: E402

from forgetscale.config import parse_config  # noqa: E402
from forgetscale.store import Store  # noqa: E402
from forgetscale.sweep import run_sweep  # noqa: E402


def sweep_config(runs: int, steps: int, **resources):
    half = steps // 2
    return parse_config(tiny_config(
        method={"name": "lora", "ranks": list(range(1, runs + 1))},
        train={"steps": steps, "checkpoints": [0, half, steps], "threads": 1},
        resources=resources,
    ))


def timed(cfg, out: Path, executor: str) -> tuple[float, Store]:
    started = time.perf_counter()
    store = run_sweep(cfg, out, progress=False, executor=executor)
    return time.perf_counter() - started, store


def _mean_train_s(store: Store) -> float:
    """Training seconds per run (the wall_s of each run's last row): if two parallel runs take twice as long
    each as one alone, the machine had no free core for the second and no speed-up was possible."""
    last: dict[str, float] = {}
    for row in store.checkpoints():
        last[row["run_id"]] = row["wall_s"]
    return sum(last.values()) / len(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    import ray
    import torch

    print(f"sweep: {args.runs} runs x {args.steps} steps, tiny random Llama, 1 torch thread per run; "
          f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}")
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    local_s, local = timed(sweep_config(args.runs, args.steps), root / "local", "local")
    results = {"local": local_s}
    train_s = {"local": _mean_train_s(local)}
    for name, parallel in (("ray x1", 1), ("ray x2", 2)):
        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - started
        cfg = sweep_config(args.runs, args.steps, max_parallel=parallel, cpus_per_run=1)
        results[name], store = timed(cfg, root / name.replace(" ", ""), "ray")
        train_s[name] = _mean_train_s(store)
        ray.shutdown()
        same = {(r["run_id"], r["step"]): r["forget_kl"] for r in store.checkpoints()} == {
            (r["run_id"], r["step"]): r["forget_kl"] for r in local.checkpoints()}
        print(f"{name}: ray.init {init_s:.1f} s (not in the sweep time); rows identical to local: {same}")
    for name, seconds in results.items():
        print(f"{name:7s} sweep {seconds:6.1f} s; mean training time per run {train_s[name]:5.2f} s")
    print(f"load average over the last 15 min: {os.getloadavg()[2]:.2f} (runs slow down when it exceeds the CPUs)")
    print(f"overhead of the Ray executor, ray x1 / local: {results['ray x1'] / results['local']:.2f}x "
          f"({results['ray x1'] - results['local']:+.1f} s for the sweep)")
    print(f"speed-up of 2 CPU workers over 1, ray x1 / ray x2: {results['ray x1'] / results['ray x2']:.2f}x")
    print(f"ray x2 vs local: {results['local'] / results['ray x2']:.2f}x faster")


if __name__ == "__main__":
    main()
