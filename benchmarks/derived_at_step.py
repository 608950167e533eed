"""Post-hoc arms against their own control run, at the same step (issue 31): for every derived run (scale,
intruders), the change in forgetting KL and held-out L_ft from the control run it was derived from, paired by
seed, mean and 95% t interval over seeds.

    python benchmarks/derived_at_step.py runs/mitigations

The matched-L_ft comparison of `forgetscale fit` compares an arm's curve with the control's training
trajectory; an arm whose curve barely moves L_ft (intruders at peft's defaults changes nothing on the
embedded setting) has no range to match in, so this table says what the change did to the same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def table(run_dir: Path) -> list[dict]:
    from forgetscale.laws.studies.mitigation import t_interval
    from forgetscale.mitigations import stored_arm_label
    from forgetscale.store import Store

    with Store(run_dir, create=False) as store:
        runs = store.runs()
        last = {r["run_id"]: store.checkpoints(r["run_id"])[-1] for r in runs if store.checkpoints(r["run_id"])}
    groups: dict[str, list[tuple[float, float, float]]] = {}
    for r in runs:
        source = (json.loads(r["config"]).get("mitigation") or {}).get("source_run")
        if source is None or r["run_id"] not in last or source not in last:
            continue
        arm, ctl = last[r["run_id"]], last[source]
        if arm["step"] != ctl["step"]:
            continue
        rel = 1.0 - arm["forget_kl"] / ctl["forget_kl"]
        groups.setdefault(stored_arm_label(r), []).append((rel, arm["ft_loss"] - ctl["ft_loss"], arm["forget_kl"]))
    out = []
    for label, values in sorted(groups.items()):
        v = np.array(values)
        out.append({"arm": label, "seeds": len(v), "kl": float(v[:, 2].mean()),
                    "kl_reduction": t_interval(v[:, 0]), "ft_change": t_interval(v[:, 1])})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    print("| derived run | seeds | KL (mean) | KL reduction vs its control, same step [95%] | L_ft change [95%] |")
    print("|---|---:|---:|---|---|")
    for row in table(args.run_dir):
        m, lo, hi = row["kl_reduction"]
        d, dlo, dhi = row["ft_change"]
        print(f"| `{row['arm']}` | {row['seeds']} | {row['kl']:.4f} | {100 * m:.1f}% [{100 * lo:.1f}%, {100 * hi:.1f}%] "
              f"| {d:+.4f} [{dlo:+.4f}, {dhi:+.4f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
