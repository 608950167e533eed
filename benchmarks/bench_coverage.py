"""Coverage of the laws' intervals on sweeps simulated from the paper's constants (docs/laws.md).

For each design (the paper's: ranks 8-256, one seed per rank; and the same with 3 seeds), and each
forecast (in range: rank 64 at step 200 fitted on everything; extrapolated: rank 256 at step 260
fitted on small ranks up to step 100), prints how often the mean-curve interval held the true curve
and how often the new-run interval held a fresh run's measured value, at nominal 95%.

    python benchmarks/bench_coverage.py                      # 50 replicates per design (minutes)
    python benchmarks/bench_coverage.py --replicates 10 --designs "3 seeds, in range"
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from forgetscale.laws.studies import coverage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=50)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--designs", nargs="+", default=list(coverage.DESIGNS), choices=list(coverage.DESIGNS))
    parser.add_argument("--laws", default="linear,power_ft,power_f,mult_ft,mult_f",
                        help="laws fitted (power_joint is slow; add it explicitly)")
    args = parser.parse_args()
    laws = tuple(x for x in args.laws.split(",") if x)
    designs = [dataclasses.replace(coverage.DESIGNS[d], laws=laws) for d in args.designs]
    print(f"{args.replicates} replicates per design, {args.bootstrap} bootstrap resamples, nominal 95%; "
          f"noise {designs[0].noise:g} per checkpoint and {designs[0].run_noise:g} per run (log scale)", flush=True)
    for design in designs:  # one table per design as it completes
        start = time.perf_counter()
        table = coverage.coverage([design], args.replicates, args.bootstrap)
        print(f"\n{design.name}: fitted on ranks {list(design.pilot_ranks)} x seeds {list(design.seeds)}, "
              f"steps <= {design.pilot_max_step}; forecast rank {design.target[0]} at step {design.target[1]} "
              f"({time.perf_counter() - start:.0f} s)")
        print(table.drop(columns="design").to_string(index=False, float_format=lambda x: f"{x:.3f}"), flush=True)


if __name__ == "__main__":
    main()
