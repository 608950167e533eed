"""The suite registry. A suite is data + three functions, and one module registers it together with its
settings (the `evals:` key config validates), in one call:

- `load(settings, cache_dir)`: the items (prompts, questions), read once per `forgetscale eval`;
- `evaluate(target, items, settings)`: one model's per-item rows (generation and parsing happen here);
- `summarize(rows, base_rows, settings)`: per-model metrics with 95% intervals, compared item by item
  with the base model's rows (None for the base model itself).

A family of suites is named `<family>:<argument>` (`lm-eval:arc_easy`): its module registers a function
that builds the Suite for one argument (`register_family`).

Torch-free to import: a suite module imports generation (torch) and item loading inside `load` and
`evaluate`, so config validates the `evals:` section without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from forgetscale.errors import ConfigError
from forgetscale.evals.stats import paired_difference, wilson
from forgetscale.registry import Registry
from forgetscale.schema import SourceSpec, Strict

if TYPE_CHECKING:
    import torch


class SuiteSettings(Strict):
    """The base of a suite's settings (the `evals.<suite>` keys); changed by `--set`, so not frozen."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SourceSettings(SourceSpec):
    """A suite's item source (the key is `source`: a suite reads prompts or questions, not documents)."""

    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


@dataclass
class Target:
    """One model under evaluation, with what its suites need to call it."""

    key: str  # 'base' or '<run_id>@<step>'
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype | None
    batch_size: int
    seed: int
    on_items: Callable[[int], None] | None = None  # progress: called with the number of prompts done


@dataclass(frozen=True)
class Suite:
    title: str
    settings_key: str  # the attribute of EvalsConfig holding this suite's settings
    load: Callable[[Any, Any], list[Any]]
    evaluate: Callable[[Target, list[Any], Any], list[dict[str, Any]]]
    summarize: Callable[[list[dict[str, Any]], list[dict[str, Any]] | None, Any], list[dict[str, Any]]]
    describe: str


@dataclass(frozen=True)
class Family:
    """Suites named `<name>:<argument>`, one per argument, sharing one settings key."""

    name: str
    build: Callable[[str], Suite]
    argument: str  # what the argument is, for messages: 'task' -> "needs a task name", `lm-eval:TASK`
    example: str  # an argument for messages: `lm-eval:arc_easy`


@dataclass(frozen=True)
class SettingsKey:
    """One suite's key in the `evals:` section (config builds EvalsConfig from these, in this order)."""

    key: str  # the EvalsConfig attribute (Suite.settings_key)
    settings: type[BaseModel]
    description: str
    alias: str | None = None  # the key as written, when it is not a Python name (`lm-eval`)


SUITES: Registry[Suite] = Registry("eval suite")
FAMILIES: dict[str, Family] = {}
SETTINGS: list[SettingsKey] = []
_ORDER: list[str] = []  # registration order: how messages and the config list the suites


def register_suite(name: str, settings: type[BaseModel], description: str, *, title: str,
                   load: Callable[[Any, Any], list[Any]],
                   evaluate: Callable[[Target, list[Any], Any], list[dict[str, Any]]],
                   summarize: Callable[[list[dict[str, Any]], list[dict[str, Any]] | None, Any], list[dict[str, Any]]],
                   describe: str) -> Suite:
    """Register a suite and its settings (the `evals.<name>` key, described by `description`) in one call."""
    suite = SUITES.add(name, Suite(title=title, settings_key=name, load=load, evaluate=evaluate,
                                   summarize=summarize, describe=describe))
    SETTINGS.append(SettingsKey(name, settings, description))
    _ORDER.append(name)
    return suite


def register_family(name: str, settings: type[BaseModel], description: str, *, key: str,
                    build: Callable[[str], Suite], argument: str, example: str) -> Family:
    """Register a family of suites (`<name>:<argument>`) and its settings (the `evals.<name>` key, stored
    as `key`, which the suites `build` makes must use as their settings_key) in one call."""
    if name in FAMILIES or name in SUITES:
        raise ConfigError(f"eval suite family '{name}' is registered twice")
    FAMILIES[name] = family = Family(name, build, argument, example)
    SETTINGS.append(SettingsKey(key, settings, description, alias=name if name != key else None))
    return family


def suite_names() -> list[str]:
    """The registered suites (not the families), in registration order."""
    return list(_ORDER)


def suite_for(name: str) -> Suite:
    """The suite a name picks: a registered one, or one member of a family (`lm-eval:TASK`)."""
    family, sep, argument = name.partition(":")
    if sep and family in FAMILIES:
        return FAMILIES[family].build(argument)
    return SUITES.get(name)


def rate(metric: str, protocol: str, flags: list[bool], base_flags: list[bool] | None, note: str = "") -> dict[str, Any]:
    """A k-of-n metric with its Wilson interval, and the paired difference to the base when given."""
    k, n = sum(flags), len(flags)
    lo, hi = wilson(k, n)
    row: dict[str, Any] = {"metric": metric, "protocol": protocol, "k": k, "n": n, "value": k / n if n else None,
                           "lo": lo, "hi": hi}
    if base_flags is not None:
        d = paired_difference(flags, base_flags)
        row.update(vs_base=d.diff, vs_base_lo=d.lo, vs_base_hi=d.hi, within_noise=int(d.within_noise))
    return row


def paired_rows(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]] | None, protocol: str):
    """This model's rows of one protocol and the base rows of the same items, in the same order."""
    mine = [r for r in rows if r["protocol"] == protocol]
    if base_rows is None:
        return mine, None
    base = {r["item_id"]: r for r in base_rows if r["protocol"] == protocol}
    mine = [r for r in mine if r["item_id"] in base]
    return mine, [base[r["item_id"]] for r in mine]
