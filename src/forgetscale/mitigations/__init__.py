"""Mitigation arms: ways of fine-tuning that might move the forgetting trade-off line, not only slide along it.

The paper shows forgetting is a falling line in the fine-tuning loss; fewer steps or fewer parameters
only move a run along it. An arm is compared with the control arm ('none') on the same data, ranks and
seeds, at matched fine-tuning loss (laws/mitigation.py).

Each arm is one module holding a small frozen pydantic spec registered in MITIGATIONS. A spec has:
- `prepare(inputs)`: ask for once-per-sweep inputs while the base model is loaded (general text,
  self-generated text, a Fisher diagonal; see inputs.py);
- `hooks(ctx, model, plan)`: per-run setup before the optimizer is built (freezing layers, keeping
  reference weights) returning the Hooks train_run calls: `mix` (swap general text into a batch) and
  `penalty` (an extra loss term);
- `check(method)`: why the arm cannot be used with a method (a one-line config error), or None.
`scale` trains nothing: its runs are derived from the control run's saved adapter (`derived = True`).

Adding an arm: one module with a spec + `MITIGATIONS.add(...)`, its import at the bottom, and a test.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from forgetscale.errors import ConfigError
from forgetscale.registry import Registry


class Hooks:
    """What an arm does inside the training loop; these defaults do nothing (the control arm)."""

    def mix(self, step: int, batch: Any) -> Any:
        """The update step's blocks (all micro-batches), possibly with some rows replaced."""
        return batch

    def penalty(self, model: torch.nn.Module, step: int) -> torch.Tensor | None:
        """An extra loss term added once per update step (None: nothing to add)."""
        return None


class MitigationSpec(BaseModel):
    """Settings common to every arm."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str

    derived: ClassVar[bool] = False  # True: runs measured from the control run's weights, never trained
    variant_key: ClassVar[str | None] = None  # a list field expanding into one run per value (scale's grid)

    def variants(self) -> list[Any]:
        """The values of `variant_key` (one run each), or [None]."""
        return [None] if self.variant_key is None else list(getattr(self, self.variant_key))

    def identity(self, variant: Any = None) -> dict[str, Any]:
        """What defines one run of this arm (part of the run_id; the variant list is not, its value is)."""
        data = self.model_dump(mode="json", exclude={self.variant_key} if self.variant_key else None)
        if variant is not None:
            data[self.variant_key] = variant
        return data

    def tag(self) -> str:
        """The value stored in runs.mitigation: the name, plus any setting changed from its default."""
        changed = [f"{k}={v}" for k, v in self.identity().items()
                   if k != "name" and v != type(self).model_fields[k].get_default(call_default_factory=True)]
        return self.name + (":" + ",".join(changed) if changed else "")

    def label(self, variant: Any = None) -> str:
        return self.tag() + ("" if variant is None else f"{variant:g}")

    def check(self, method: Any) -> str | None:
        """Why this arm cannot run with `method` (a MethodSpec), or None."""
        return None

    def prepare(self, inputs: Any) -> None:
        """Build the once-per-sweep inputs this arm needs (called while the base model is loaded)."""

    def hooks(self, ctx: Any, model: torch.nn.Module, plan: Any) -> Hooks:
        """Per-run setup on the freshly attached model; returns what the training loop calls."""
        return Hooks()


class ControlSpec(MitigationSpec):
    """No mitigation: the arm every other arm is compared with."""

    name: Literal["none"] = "none"


MITIGATIONS: Registry[type[MitigationSpec]] = Registry("mitigation")
MITIGATIONS.add("none", ControlSpec)
CONTROL = ControlSpec()


def stored_arm_label(run: dict[str, Any]) -> str:
    """A stored run's arm as its plan label wrote it (MitigationSpec.label: the tag, plus the variant of an
    arm that expands into one run per value, e.g. 'scale0.5'); '' for the control."""
    tag = run.get("mitigation") or "none"
    if tag == "none":
        return ""
    try:
        settings = json.loads(run["config"])["mitigation"]
        key = MITIGATIONS.get(settings["name"]).variant_key
        variant = settings[key] if key else None
    except (TypeError, ValueError, KeyError):  # an older or hand-edited row (or unknown arm): the tag alone
        return tag
    return tag if variant is None else f"{tag}{variant:g}"


def arms(listed: list[MitigationSpec]) -> list[MitigationSpec]:
    """The arms of a sweep: the control first (always, when anything is listed), then the listed ones."""
    seen: dict[str, int] = {}
    for i, arm in enumerate(listed):
        key = json.dumps(arm.model_dump(mode="json"), sort_keys=True)
        if key in seen:
            raise ConfigError(f"mitigation[{i}]: the same arm as mitigation[{seen[key]}] ('{arm.tag()}'); "
                              "remove one of them")
        seen[key] = i
    return [CONTROL, *(a for a in listed if a.name != "none")]


def check_arms(listed: list[MitigationSpec], methods: list[Any]) -> None:
    """Fail with one line naming the entry when an arm cannot run with one of the sweep's methods."""
    for i, arm in enumerate(listed):
        for method in methods:
            why = arm.check(method)
            if why:
                raise ConfigError(f"mitigation[{i}] ({arm.name}): {why}")


from forgetscale.mitigations import freeze, kl, l2sp, replay, scale, self_replay  # noqa: E402,F401  (register)
from forgetscale.mitigations.inputs import ArmInputs, prepare_arms  # noqa: E402

__all__ = ["CONTROL", "MITIGATIONS", "ArmInputs", "ControlSpec", "Hooks", "MitigationSpec", "arms", "check_arms",
           "prepare_arms", "stored_arm_label"]
