"""Mitigation arms: ways of fine-tuning that might move the forgetting trade-off line, not only slide along it.

The paper shows forgetting is a falling line in the fine-tuning loss; fewer steps or fewer parameters
only move a run along it. An arm is compared with the control arm ('none') on the same data, ranks and
seeds, at matched fine-tuning loss (forgetscale.laws).

One module per arm (replay.py, kl.py, ...) holds both halves, tied by one `register_arm(Spec, Arm())` call:
- its spec (torch-free; what config validates): settings, identity, and `check(method)`;
- its `Arm` (torch and forgetscale.train imported inside its methods): `prepare(spec, inputs)` asks for
  once-per-sweep inputs while the base model is loaded (general text, self-generated text, a Fisher
  diagonal; inputs.py), `hooks(spec, ctx, model, plan)` returns the StepHooks the training loop calls
  (`mix` swaps general text into a batch, `penalty` adds a loss term). `scale` and `intruders` train nothing: their runs
  are derived from the control run's saved weights (`derive`), which the executor runs instead of training.
runtime.py is what the executor calls; inputs.py builds the once-per-sweep inputs.

Adding an arm: one module here (spec, Arm subclass, `register_arm`), its import below, a test in
tests/test_mitigations.py.
"""

from forgetscale.mitigations.base import (
    ARMS,
    CONTROL,
    MITIGATIONS,
    Arm,
    ArmHooks,
    ControlSpec,
    MitigationSpec,
    arms,
    check_arms,
    register_arm,
    stored_arm_label,
)
from forgetscale.mitigations.freeze import FreezeSpec
from forgetscale.mitigations.intruders import IntrudersSpec
from forgetscale.mitigations.kl import KLSpec
from forgetscale.mitigations.l2sp import EWCSpec, L2SPSpec
from forgetscale.mitigations.replay import ReplaySpec
from forgetscale.mitigations.scale import ScaleSpec
from forgetscale.mitigations.self_replay import SelfReplaySpec

__all__ = ["ARMS", "CONTROL", "MITIGATIONS", "Arm", "ArmHooks", "ControlSpec", "EWCSpec", "FreezeSpec", "IntrudersSpec", "KLSpec",
           "L2SPSpec", "MitigationSpec", "ReplaySpec", "ScaleSpec", "SelfReplaySpec", "arms", "check_arms",
           "register_arm", "stored_arm_label"]
