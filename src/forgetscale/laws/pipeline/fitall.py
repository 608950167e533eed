"""Fit every law on every group of a sweep: the per-group part of the laws.json document.

Groups are (dataset, method with its settings, mitigation): a law is a property of one fine-tuning
dataset and one method with its settings, so rows of different ones are never pooled in a group's
fit. The studies on these fits (laws across methods, mitigation arms) are added by laws/fit.py, which
calls this module and them. Within a group the laws are fitted in
dependency order and share their bootstrap resamples. A law that the group cannot support (one
rank, too few steps, ...) is recorded as "not fitted: <why>" and the others still run; only when
nothing at all can be fitted is the first reason raised.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import asdict, field, make_dataclass
from typing import Annotated, Any

import pandas as pd

from forgetscale import __version__
from forgetscale.errors import ConfigError, DataError, ForgetscaleError
from forgetscale.laws.estimators.base import Law
from forgetscale.laws.estimators.registry import LAWS, ORDER
from forgetscale.laws.estimators.select import FitData, group_label, groups, select_rows
from forgetscale.laws.estimators.settings import Declared, Setting, declared
from forgetscale.laws.pipeline import forecast, lawfile

Progress = Callable[[str, str, int, int], None]


def _law_names(text: str) -> tuple[str, ...]:
    """--laws a,b -> ('a', 'b')."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _known_laws(names: tuple[str, ...]) -> bool:
    """True, or the registry's did-you-mean error (more use than a generic 'must be' rule)."""
    for name in names:
        LAWS.get(name)  # unknown law -> did-you-mean error
    return True


def _fit_only(
    *,
    max_step: Annotated[int | None, Setting(
        "largest step fitted (a pilot: fit the first steps, then `predict --against` the rest)", parse=int,
        check=lambda v: v is None or (isinstance(v, int) and v >= 1), rule="an integer >= 1",
    )] = None,
    laws: Annotated[tuple[str, ...], Setting(
        "comma-separated laws to fit (default: all)", parse=_law_names, check=_known_laws,
    )] = ORDER,
) -> None:
    """The settings of a whole fit that no single law has, declared the way Law declares its own."""


def _options() -> list[Declared]:
    """FitOptions' fields: the law settings that are options, then the fit's own, in the order laws.json
    has always recorded them (max_step beside min_step, laws last)."""
    law = [d for d in declared(Law.__init__) if d.setting.option]
    max_step, laws = declared(_fit_only)
    at = [d.name for d in law].index("min_step") + 1
    return [*law[:at], max_step, *law[at:], laws]


OPTIONS = _options()
LAW_OPTIONS = tuple(d.name for d in declared(Law.__init__) if d.setting.option)


class _Options:
    """What FitOptions does; its fields are made from OPTIONS below."""

    def __post_init__(self) -> None:
        for d in OPTIONS:
            problem = d.setting.problem(d.name, getattr(self, d.name))
            if problem:
                raise ConfigError(problem)

    def law_params(self) -> dict[str, Any]:
        """The options every law takes (the rest, max_step and laws, are the fit's own)."""
        return {k: getattr(self, k) for k in LAW_OPTIONS}


FitOptions = make_dataclass(
    "FitOptions", [(d.name, d.type, field(default=d.default, metadata={"setting": d.setting})) for d in OPTIONS],
    bases=(_Options,), frozen=True,
    namespace={"__doc__": "How `fit` fits: Law's settings (less the per-fit ones) plus max_step and laws; every "
                          "field is recorded in laws.json.", "__module__": __name__},
)


def _needed(names: tuple[str, ...]) -> list[str]:
    """The requested laws plus the ones they borrow from, in fit order."""
    want = set(names)
    for name in ORDER[::-1]:
        if name in want:
            want.update(LAWS.get(name).requires)
    return [n for n in ORDER if n in want]


def fit_group(frame: pd.DataFrame, options: FitOptions, progress: Progress | None = None,
              label: str = "", heldout: bool = True) -> tuple[dict[str, Law], dict[str, str]]:
    """Fit the laws on one group's rows: (fitted laws, reasons for the ones that could not be fitted).

    heldout=False skips each law's held-out refit (for fits that are themselves a held-out test)."""
    fitted: dict[str, Law] = {}
    failed: dict[str, str] = {}
    todo = _needed(options.laws)
    for i, name in enumerate(todo):
        if progress:
            progress(label, name, i, len(todo))
        missing = [d for d in LAWS.get(name).requires if d in failed]
        if missing:
            failed[name] = f"needs law '{missing[0]}', which was not fitted"
            continue
        try:
            fitted[name] = LAWS.get(name)(**options.law_params(), heldout=heldout).fit(frame, deps=fitted)
        except DataError as err:
            failed[name] = str(err)
    return fitted, failed


def fit_groups(frame: pd.DataFrame, options: FitOptions,
               progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Law]]]:
    """The laws.json document for stored rows with every group's laws (no study yet), and the fitted
    laws by group label (the studies reuse them, so their intervals come from the same bootstrap)."""
    if frame.empty:
        raise DataError("the results store has no checkpoints yet; run the sweep first")
    frame = within_budget(frame, options.max_step)
    out_groups = []
    first_error = None
    by_label: dict[str, dict[str, Law]] = {}
    for key, sub in groups(frame):
        label = group_label(key)
        fitted, failed = fit_group(sub, options, progress, label)
        by_label[label] = fitted
        laws: dict[str, Any] = {}
        for name in _needed(options.laws):
            if name in fitted and name in options.laws:
                laws[name] = lawfile.law_to_dict(fitted[name])
            elif name in failed and name in options.laws:
                laws[name] = {"law": name, "title": LAWS.get(name).title, "status": f"not fitted: {failed[name]}"}
                first_error = first_error or failed[name]
        models = sorted(str(m) for m in sub["model"].dropna().unique()) if "model" in sub else []
        group = {"key": key, "label": label, "models": models, "laws": laws}
        check = forecast.heldout_check(fitted)
        if check is not None:
            group["forecast_check"] = check
        out_groups.append(group)
    if not any("params" in d for g in out_groups for d in g["laws"].values()):
        raise DataError(first_error or "no law could be fitted")
    doc = {
        "format": lawfile.FORMAT,
        "forgetscale_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "options": {**asdict(options), "laws": list(options.laws)},
        "groups": out_groups,
    }
    return doc, by_label


def within_budget(frame: pd.DataFrame, max_step: int | None) -> pd.DataFrame:
    """The rows a fit with `max_step` reads: every step up to it (step 0, the base, included)."""
    return frame if max_step is None or frame.empty else frame[frame["step"] <= max_step]


def stale_groups(frame: pd.DataFrame, doc: dict[str, Any]) -> list[str]:
    """Groups whose stored rows changed since laws.json was written (so its numbers are out of date)."""
    out = []
    frame = within_budget(frame, (doc.get("options") or {}).get("max_step"))
    by_label = {group_label(k): sub for k, sub in groups(frame)} if not frame.empty else {}
    for group in doc["groups"]:
        sub = by_label.get(group["label"])
        for d in group["laws"].values():
            if "params" not in d:
                continue
            law = lawfile.law_from_dict(d)
            try:
                if sub is None:
                    raise ForgetscaleError("group gone")
                sel = select_rows(sub, law=law.name, columns=law._columns(), min_step=law.min_step_,
                                  include_unfinished=law.include_unfinished)
                fp = FitData.from_frame(sel.rows, law.target, law.ft_column).fingerprint(law._settings_key())
            except ForgetscaleError:
                fp = None
            if fp != law.fingerprint_:
                out.append(group["label"])
                break
    return out
