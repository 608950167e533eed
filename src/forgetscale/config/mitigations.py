"""Mitigation arms as config: one small frozen spec per arm, in the MITIGATIONS registry. Torch-free.

A spec holds an arm's settings and the rules that need no model: what defines one of its runs
(`identity`), its stored tag and label, and `check(method)` (why it cannot run with a method). What an
arm does while training is its torch half (mitigations/runtime.py and one module per arm).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator

from forgetscale.config.methods import METHODS, MethodSpec, adapter_methods
from forgetscale.config.sources import Strict
from forgetscale.errors import ConfigError
from forgetscale.registry import Registry


class MitigationSpec(Strict):
    """Settings common to every arm."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str

    derived: ClassVar[bool] = False  # True: runs measured from the control run's weights, never trained
    grid_key: ClassVar[str | None] = None  # a list field expanding into one run per value (scale's s)

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
        return self.tag() + ("" if value is None else f"{value:g}")

    def check(self, method: MethodSpec) -> str | None:
        """Why this arm cannot run with `method`, or None."""
        return None


class ControlSpec(MitigationSpec):
    """No mitigation: the arm every other arm is compared with."""

    name: Literal["none"] = "none"


class ReplaySpec(MitigationSpec):
    """A fraction p of every update step's sequences is general text instead of fine-tuning data."""

    name: Literal["replay"] = "replay"
    p: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of each step's sequences replaced by general text")
    dataset: str | None = Field(None, description="general-text source (default: forgetting.dataset, with the "
                                                  "forgetting set's documents removed)")
    split: str = Field("train", description="hub split of the general-text source")


class SelfReplaySpec(MitigationSpec):
    """replay with text sampled from the base model itself: no pre-training data needed."""

    name: Literal["self_replay"] = "self_replay"
    p: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of each step's sequences replaced by sampled text")
    samples: int = Field(256, ge=1, description="sequences sampled from the base model (once per sweep)")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature (1: the model's own distribution)")


class KLSpec(MitigationSpec):
    """lambda * KL(p_base || p_tuned) on general (or self-generated) text added to every update step."""

    name: Literal["kl"] = "kl"
    lam: float = Field(1.0, gt=0.0, description="lambda: weight of the KL term against the fine-tuning loss")
    rows: int = Field(1, ge=1, description="general-text sequences per update step the KL is taken on")
    source: Literal["general", "self"] = Field("general", description="general text, or text sampled from the base")
    dataset: str | None = Field(None, description="general-text source (default: forgetting.dataset minus its "
                                                  "forgetting documents)")
    split: str = Field("train", description="hub split of the general-text source")
    samples: int = Field(256, ge=1, description="source 'self': sequences sampled from the base model")

    def check(self, method: MethodSpec) -> str | None:
        if not METHODS.get(method.name).uses_adapter:
            return (f"needs the base predictions from the same weights with the adapter disabled; method "
                    f"'{method.name}' has no adapter (use one of: {', '.join(adapter_methods())})")
        return None


L2SP_METHODS = ("lora", "top_layers", "full")


class L2SPSpec(MitigationSpec):
    """lambda * sum F * (W - W0)^2: penalise how far the weights move from the base (F = 1)."""

    name: Literal["l2sp"] = "l2sp"
    lam: float = Field(0.01, gt=0.0, description="lambda: weight of sum F (W - W0)^2 against the fine-tuning loss")
    fisher: bool = Field(False, description="weight each entry by a diagonal Fisher of the base on general text")
    fisher_samples: int = Field(32, ge=1, description="general-text sequences the Fisher is estimated on")
    dataset: str | None = Field(None, description="general text for the Fisher (default: forgetting.dataset minus "
                                                  "its forgetting documents)")
    split: str = Field("train", description="hub split of that source")

    def check(self, method: MethodSpec) -> str | None:
        if method.name not in L2SP_METHODS:
            return (f"penalises the weight change B @ A (lora) or W - W0 (top_layers, full); method "
                    f"'{method.name}' changes the weights another way")
        return None


class EWCSpec(L2SPSpec):
    """l2sp with each entry weighted by a diagonal Fisher of the base weights on general text."""

    name: Literal["ewc"] = "ewc"  # type: ignore[assignment]
    fisher: bool = Field(True, description="weight each entry by a diagonal Fisher of the base on general text")


class FreezeSpec(MitigationSpec):
    """Tune only the upper layers: the first k decoder layers stay exactly as in the base model."""

    name: Literal["freeze"] = "freeze"
    layers: int | None = Field(None, ge=1, description="how many of the lowest decoder layers stay untouched "
                                                       "(default: half of them)")


class ScaleSpec(MitigationSpec):
    """After training, move the weights back toward the base by s in [0, 1]; runs derived, never trained."""

    name: Literal["scale"] = "scale"
    s: list[float] = Field([0.25, 0.5, 0.75], description="scale factors, each a derived run (0: base, 1: the "
                                                          "control run)")

    derived: ClassVar[bool] = True
    grid_key: ClassVar[str | None] = "s"

    @field_validator("s")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= x <= 1.0 for x in v) or len(set(v)) != len(v):
            raise ValueError("must be a non-empty list of distinct numbers in [0, 1]")
        return v

    def check(self, method: MethodSpec) -> str | None:
        if method.name == "dora":
            return "dora's magnitude vector makes scaling the adapter no interpolation to the base; use lora"
        return None


MITIGATIONS: Registry[type[MitigationSpec]] = Registry("mitigation")
for _spec in (ControlSpec, ReplaySpec, SelfReplaySpec, KLSpec, L2SPSpec, EWCSpec, FreezeSpec, ScaleSpec):
    MITIGATIONS.add(_spec.model_fields["name"].default, _spec)
CONTROL = ControlSpec()


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
    return tag if value is None else f"{tag}{value:g}"


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
