"""Mitigation arms: ways of fine-tuning that might move the forgetting trade-off line, not only slide along it.

The paper shows forgetting is a falling line in the fine-tuning loss; fewer steps or fewer parameters
only move a run along it. An arm is compared with the control arm ('none') on the same data, ranks and
seeds, at matched fine-tuning loss (forgetscale.laws).

Two halves per arm:
- its spec (forgetscale/config/mitigations.py, re-exported here, torch-free): settings, identity, and `check(method)`;
- its torch half (one module per arm, mapped by name in runtime.py): `prepare(spec, inputs)` asks for
  once-per-sweep inputs while the base model is loaded (general text, self-generated text, a Fisher
  diagonal; inputs.py), `hooks(spec, ctx, model, plan)` returns the StepHooks the training loop calls
  (`mix` swaps general text into a batch, `penalty` adds a loss term). `scale` trains nothing: its runs
  are derived from the control run's saved weights (`derive`), which the executor runs instead of training.

Adding an arm: a spec in config/mitigations.py, one module with an Arm subclass, one line in runtime.ARMS, a test.
"""

from forgetscale.config.mitigations import (
    CONTROL,
    MITIGATIONS,
    ControlSpec,
    EWCSpec,
    FreezeSpec,
    KLSpec,
    L2SPSpec,
    MitigationSpec,
    ReplaySpec,
    ScaleSpec,
    SelfReplaySpec,
    arms,
    check_arms,
    stored_arm_label,
)

__all__ = ["CONTROL", "MITIGATIONS", "ControlSpec", "EWCSpec", "FreezeSpec", "KLSpec", "L2SPSpec", "MitigationSpec",
           "ReplaySpec", "ScaleSpec", "SelfReplaySpec", "arms", "check_arms", "stored_arm_label"]
