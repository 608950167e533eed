"""The `evals:` section of a sweep config (also the defaults of `forgetscale eval`). Torch-free.

Its per-suite keys (`evals.safety`, `evals.lm-eval`, ...) are the settings classes the suites register
with (forgetscale.evals, one module per suite), in registration order; the keys every suite shares are
declared here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, create_model, field_validator

from forgetscale.evals import FAMILIES, SETTINGS, suite_names
from forgetscale.evals.suites import SuiteSettings


def _family_names() -> list[str]:
    return [f"{f.name}:{f.argument.upper()}" for f in FAMILIES.values()]


def split_suites(names: list[str]) -> list[str]:
    """One name per suite: `lm-eval:a,b` (a CLI comma list, or one config entry) becomes `lm-eval:a`,
    `lm-eval:b`; a bare name after a family entry that is not a registered suite is one more member."""
    out: list[str] = []
    family = None
    known = suite_names()
    for part in (p.strip() for name in names for p in name.split(",")):
        if not part:
            continue
        head, sep, argument = part.partition(":")
        if sep and head in FAMILIES:
            family = FAMILIES[head]
            argument = argument.strip()
            if not argument:
                raise ValueError(f"'{head}:' needs a {family.argument} name, e.g. {head}:{family.example}")
            out.append(f"{head}:{argument}")
        elif family is not None and part not in known:
            out.append(f"{family.name}:{part}")
        else:
            family = None
            out.append(part)
    return out


class _Shared(SuiteSettings):
    """The keys of `evals:` that are not one suite's settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    suites: list[str] = Field(
        [], description="capability suites run after the sweep (also `forgetscale eval RUN_DIR`): "
        + ", ".join([*suite_names(), *(f"{n}[,{n.partition(':')[2]}...]" for n in _family_names())])
    )
    steps: list[int] | Literal["last", "checkpoints"] = Field(
        "last", description="checkpoint steps to evaluate: 'last', 'checkpoints' (every checkpoint step, e.g. for "
        "refusal against step; a measured trainer output: every kept checkpoint) or a list; adapters are saved at "
        "these steps"
    )
    batch_size: int = Field(16, gt=0, description="prompts per generation / scoring batch")
    seed: int = Field(0, ge=0, description="seed for sampled generations")

    @field_validator("suites")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        v = split_suites(v)
        known = suite_names()
        unknown = [s for s in v if s not in known and s.partition(":")[0] not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown suite '{unknown[0]}'; known: {', '.join([*known, *_family_names()])}")
        if len(set(v)) != len(v):
            raise ValueError("must list each suite once")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, list) and (not v or any(s < 0 for s in v)):
            raise ValueError("must be 'last', 'checkpoints' or a non-empty list of steps >= 0")
        return v

    def adapter_steps(self, checkpoint_steps: list[int], last: int) -> set[int]:
        """Steps whose adapters the sweep keeps for evals (also when the suites run later, from the CLI):
        'checkpoints' keeps every one, so the user never lists them to get refusal against step."""
        if self.steps == "checkpoints":
            return set(checkpoint_steps)
        return {last} if self.steps == "last" else set(self.steps)


def _suite_field(entry: Any) -> tuple[Any, Any]:
    return entry.settings, Field(default_factory=entry.settings, alias=entry.alias, description=entry.description)


# the shared keys, then one key per registered suite or family
EvalsConfig = create_model("EvalsConfig", __base__=_Shared, __module__=__name__,
                           **{entry.key: _suite_field(entry) for entry in SETTINGS})
