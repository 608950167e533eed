"""Benchmark: fit every law with 1,000 run-bootstrap resamples on 500 simulated checkpoints.

The target (issue 3) is under 30 s on the project's 2-core machine, so that `forgetscale fit` feels
interactive. Rows are simulated from the paper's OpenOrca constants: 6 ranks x 3 seeds x 28 steps
between 50 and 260 (504 checkpoints, all at or above the minimum step).

    OMP_NUM_THREADS=1 python benchmarks/bench_fit.py
    OMP_NUM_THREADS=1 python benchmarks/bench_fit.py --bootstrap 200 --dataset news

Prints seconds per law and in total, and the machine's load (the figure is only comparable on an
otherwise idle machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from forgetscale.laws.pipeline.fitall import FitOptions, fit_group
from forgetscale.laws.studies import paper, synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--checkpoints", type=int, default=500, help="approximate number of checkpoints")
    parser.add_argument("--dataset", choices=sorted(paper.CONSTANTS), default="openorca")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed")
    args = parser.parse_args()

    ranks, seeds = paper.RANKS, (0, 1, 2)
    n_steps = int(np.ceil(args.checkpoints / (len(ranks) * len(seeds))))
    steps = np.unique(np.linspace(50, 260, n_steps).round().astype(int))
    frame = synthetic.simulate_frame(paper.in_gauge(args.dataset, 0.002), dataset=args.dataset, ranks=ranks,
                                     seeds=seeds, steps=steps, seed=args.seed)
    n_rows = int((frame["step"] >= 50).sum())
    print(f"{n_rows} checkpoints ({len(ranks)} ranks x {len(seeds)} seeds x {len(steps)} steps), "
          f"{args.bootstrap} bootstrap resamples, dataset constants: {args.dataset}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average before: {os.getloadavg()[0]:.2f}")

    marks: list[tuple[str, float]] = []

    def progress(label: str, law: str, i: int, n: int) -> None:
        marks.append((law, time.perf_counter()))

    start = time.perf_counter()
    laws, failed = fit_group(frame, FitOptions(n_bootstrap=args.bootstrap), progress)
    total = time.perf_counter() - start
    ends = [t for _, t in marks[1:]] + [start + total]
    for (law, t0), t1 in zip(marks, ends, strict=True):
        status = laws[law].status_ if law in laws else f"not fitted: {failed.get(law)}"
        print(f"  {law:12s} {t1 - t0:6.2f} s   {status}")
    print(f"total: {total:.2f} s for all laws (target < 30 s); load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
