"""Every mitigation arm of a sweep at ONE matched held-out L_ft, so arms can be compared with each other.

`forgetscale fit` matches each arm with the control at the deepest L_ft both reach, which differs from arm
to arm when an arm slows fine-tuning (anchored SFT does): its table compares each arm with the control, not
arms with each other. This reads the same trajectories (laws/studies/mitigation.py: frontier points, linear
interpolation in L_ft, seeds paired) at one L* every arm and the control reach (default: the shallowest of
their deepest points) and prints KL per arm, its reduction against the control and against a chosen arm,
with t intervals over the paired seeds.

    python benchmarks/arms_at_loss.py runs/anchored [--ft 3.95] [--against kl]
"""

from __future__ import annotations

import argparse

import numpy as np

from forgetscale.laws.studies.mitigation import CONTROL, arm_configs, at_loss, t_interval, trajectories
from forgetscale.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--ft", type=float, default=None, help="the matched held-out L_ft (default: deepest common)")
    parser.add_argument("--against", default="kl", help="arm tag the others are also compared with")
    args = parser.parse_args()
    with Store(args.run_dir, create=False) as store:
        frame = store.frame()
        runs = store.runs()
    frame = frame[frame["status"] == "finished"]
    paths = trajectories(frame.assign(ft=frame["ft_loss"], kl=frame["forget_kl"], f=frame["forget_ce"]),
                         arm_configs(runs))
    target = args.ft if args.ft is not None else max(p["ft"].iloc[-1] for arm in paths.values() for _, p in arm)
    base = float(np.mean([p["ft"].iloc[0] for _, p in paths[CONTROL]]))
    kl = {arm: {s: at_loss(p, target, "kl") for s, p in arm_paths} for arm, arm_paths in paths.items()}
    print(f"matched held-out L_ft {target:.4f} (base {base:.4f}); KL(base || tuned) on the forgetting set, "
          f"95% t intervals over paired seeds")
    print(f"| arm | seeds | KL at L* (mean [95%]) | reduction vs control | reduction vs {args.against} |")
    print("|---|---|---|---|---|")
    for arm in [CONTROL, *sorted(a for a in kl if a != CONTROL)]:
        seeds = sorted(kl[arm])
        values = np.array([kl[arm][s] for s in seeds])
        mean, lo, hi = t_interval(values)
        cells = []
        for ref in (CONTROL, args.against):
            if arm == ref or ref not in kl:
                cells.append("-")
                continue
            pairs = [s for s in seeds if s in kl[ref]]
            red, rlo, rhi = t_interval(np.array([1 - kl[arm][s] / kl[ref][s] for s in pairs]))
            cells.append(f"{red:+.0%} [{rlo:+.0%}, {rhi:+.0%}]")
        print(f"| {arm} | {','.join(map(str, seeds))} | {mean:.4f} [{lo:.4f}, {hi:.4f}] | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
