"""What every arm shares: the spec base class, the `Arm` base class (its torch half), the one registration
that ties the two (MITIGATIONS for config, ARMS for the executor), the control arm, and the config rules
over a sweep's arms.

Torch-free: an arm's module imports torch, forgetscale.train and the rest inside the methods that run, so
config validates `mitigation:` entries without them.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import ConfigDict

from forgetscale.errors import ConfigError
from forgetscale.methods import MethodSpec
from forgetscale.registry import Registry
from forgetscale.schema import Strict

if TYPE_CHECKING:
    import torch

    from forgetscale.mitigations.inputs import ArmInputs
    from forgetscale.runs import RunPlan
    from forgetscale.train import RunContext, StepHooks


class MitigationSpec(Strict):
    """Settings common to every arm."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str

    derived: ClassVar[bool] = False  # True: runs measured from the control run's weights, never trained
    grid_key: ClassVar[str | None] = None  # a list field expanding into one run per value (scale's s)
    # a derived arm's curve: the grid values whose row is a stored row of its control run, measured or not
    # ('base': the control's step 0, 'control': its row at the same step); the comparison adds them to the curve
    curve_ends: ClassVar[dict[float, str]] = {}

    def grid(self) -> list[Any]:
        """The values of `grid_key` (one run each), or [None]."""
        return [None] if self.grid_key is None else list(getattr(self, self.grid_key))

    def identity(self, value: Any = None) -> dict[str, Any]:
        """What defines one run of this arm (part of the run_id; the grid list is not, its value is)."""
        data = self.model_dump(mode="json", exclude={self.grid_key} if self.grid_key else None)
        if value is not None:
            data[self.grid_key] = value
        return data

    def tag(self) -> str:
        """The value stored in runs.mitigation: the name, plus any setting changed from its default."""
        changed = [f"{k}={v}" for k, v in self.identity().items()
                   if k != "name" and v != type(self).model_fields[k].get_default(call_default_factory=True)]
        return self.name + (":" + ",".join(changed) if changed else "")

    def label(self, value: Any = None) -> str:
        return with_value(self.tag(), self.grid_key, value)

    def check(self, method: MethodSpec) -> str | None:
        """Why this arm cannot run with `method`, or None."""
        return None


class Arm:
    """The torch half of an arm; these defaults do nothing: the control arm. A derived arm (spec.derived)
    defines `derive(spec, plan, ctx, sink)` instead of training."""

    def prepare(self, spec: Any, inputs: ArmInputs) -> None:
        """Ask for the once-per-sweep inputs this arm needs (called while the base model is loaded)."""

    def hooks(self, spec: Any, ctx: RunContext, model: torch.nn.Module, plan: RunPlan) -> StepHooks:
        """Per-run setup on the freshly attached model; returns what the training loop calls."""
        from forgetscale.train import NoHooks

        return NoHooks()


class ArmHooks:
    """StepHooks that leave the step as it is, as train.NoHooks, but importable without torch (an arm's
    module defines its hooks next to its spec); an arm's hooks override `mix` or `penalty`."""

    def mix(self, step: int, blocks: Any) -> Any:
        return blocks

    def penalty(self, model: torch.nn.Module, step: int) -> torch.Tensor | None:
        return None


MITIGATIONS: Registry[type[MitigationSpec]] = Registry("mitigation")
ARMS: Registry[Arm] = Registry("mitigation")


def register_arm(spec: type[MitigationSpec], arm: Arm) -> type[MitigationSpec]:
    """Register an arm: its spec (what config validates) and its torch half (what the executor runs), under
    the spec's `name` default, in one call."""
    name = spec.model_fields["name"].default
    MITIGATIONS.add(name, spec)
    ARMS.add(name, arm)
    return spec


class ControlSpec(MitigationSpec):
    """No mitigation: the arm every other arm is compared with."""

    name: Literal["none"] = "none"


register_arm(ControlSpec, Arm())
CONTROL = ControlSpec()


def with_value(tag: str, key: str | None, value: Any) -> str:
    """An arm's tag with its grid value: 'scale0.5'; after changed settings, named ('intruders:top_k=5,
    mitigation_lambda=0.5'), so the value is not read as part of the last setting."""
    if value is None:
        return tag
    return f"{tag},{key}={value:g}" if ":" in tag else f"{tag}{value:g}"


def stored_arm_label(run: dict[str, Any]) -> str:
    """A stored run's arm as its plan label wrote it (MitigationSpec.label: the tag, plus the grid value of an
    arm that expands into one run per value, e.g. 'scale0.5'); '' for the control."""
    tag = run.get("mitigation") or "none"
    if tag == "none":
        return ""
    try:
        settings = json.loads(run["config"])["mitigation"]
        key = MITIGATIONS.get(settings["name"]).grid_key
        value = settings[key] if key else None
    except (TypeError, ValueError, KeyError):  # an older or hand-edited row (or unknown arm): the tag alone
        return tag
    return with_value(tag, key, value)


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


def check_arms(listed: list[MitigationSpec], methods: list[MethodSpec]) -> None:
    """Fail with one line naming the entry when an arm cannot run with one of the sweep's methods."""
    for i, arm in enumerate(listed):
        for method in methods:
            why = arm.check(method)
            if why:
                raise ConfigError(f"mitigation[{i}] ({arm.name}): {why}")
