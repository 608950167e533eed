"""The suite registry. A suite is data + three functions, so adding one is one module:

- `load(settings, cache_dir)`: the items (prompts, questions), read once per `forgetscale eval`;
- `evaluate(target, items, settings)`: one model's per-item rows (generation and parsing happen here);
- `summarize(rows, base_rows, settings)`: per-model metrics with 95% intervals, compared item by item
  with the base model's rows (None for the base model itself).

A family of suites is named `<family>:<argument>` (`lm-eval:arc_easy`): its module registers a function
in FAMILIES that builds the Suite for one argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from forgetscale.evals.stats import paired_difference, wilson
from forgetscale.registry import Registry


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


SUITES: Registry[Suite] = Registry("eval suite")
FAMILIES: dict[str, Callable[[str], Suite]] = {}


def suite_for(name: str) -> Suite:
    """The suite a name picks: a registered one, or one member of a family (`lm-eval:TASK`)."""
    family, sep, argument = name.partition(":")
    if sep and family in FAMILIES:
        return FAMILIES[family](argument)
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
