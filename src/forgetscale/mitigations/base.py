"""The torch half of an arm: what it builds once per sweep and what it does to each run.

Its spec (settings, config rules) is in forgetscale/config/mitigations.py; runtime.py maps each spec name to one of these.
"""

from __future__ import annotations

from typing import Any

import torch

from forgetscale.config.mitigations import MitigationSpec
from forgetscale.mitigations.inputs import ArmInputs
from forgetscale.plan import RunPlan
from forgetscale.train import NoHooks, RunContext, StepHooks


class Arm:
    """These defaults do nothing: the control arm."""

    def prepare(self, spec: Any, inputs: ArmInputs) -> None:
        """Ask for the once-per-sweep inputs this arm needs (called while the base model is loaded)."""

    def hooks(self, spec: Any, ctx: RunContext, model: torch.nn.Module, plan: RunPlan) -> StepHooks:
        """Per-run setup on the freshly attached model; returns what the training loop calls."""
        return NoHooks()


__all__ = ["Arm", "MitigationSpec"]
