"""Readable run labels from the stored runs: what `eval` prints and the report's eval sections show.

Torch-free (the report imports it), unlike evals/runner.py, which runs the suites.
"""

from __future__ import annotations

from forgetscale.mitigations import stored_arm_label
from forgetscale.store import Store


def run_labels(store: Store) -> dict[str, str]:
    """run_id -> a readable label, the sweep's own ('lora-r8', 'ia3', 'lora-r8-kl', '... -s1' when seeds differ)."""
    runs = store.runs()
    seeds = {r["seed"] for r in runs}
    labels = {}
    for r in runs:
        label = r["method"] if r["rank"] is None else f"{r['method']}-r{r['rank']}"
        arm = stored_arm_label(r)
        if arm:  # the sweep's own run label: 'lora-r8-kl-s0', 'lora-r8-scale0.5-s0'
            label += f"-{arm}"
        if len(seeds) > 1:
            label += f"-s{r['seed']}"
        labels[r["run_id"]] = label
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {rid: (f"{label}[{rid[:6]}]" if counts[label] > 1 else label) for rid, label in labels.items()}
