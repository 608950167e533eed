"""Which form to trust at a pilot budget: the rule `plan` and `predict` take from the forecasting benchmark.

A pilot's own held-out split is one small, early-step test; `benchmarks/forecast_bench.py` instead
forecasts many real long runs from pilots at fixed shares of their compute and stores each form's pooled
record per budget (resources/forecast_record.json). The rule: the pilot's share of the planned run's
compute (steps x tokens, summed over the pilot's fitted runs) picks the largest benchmarked budget it
reaches; there, the form with the smallest median KL-rise error among the *reliable* ones (median error
within RELIABLE_ERROR of the rise, new-run coverage at least RELIABLE_COVERAGE, and a finite forecast from
every pilot) is used. Where no form
is reliable, the best one is still named, flagged, with the benchmarked budget at which one became
reliable (and how many more pilot steps that is), or the statement that none did.

The record is per design (model x fine-tuning data): a sweep on data the benchmark ran uses that data's record
(the same model's); on data it did not run, or on a model no design ran with that data when several did,
each form is held to its worst record over those designs, since the instruction-data benchmark showed that a
verdict measured on news does not carry over.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from forgetscale.errors import DataError

RELIABLE_ERROR = 0.10  # median |KL-rise error| / rise
RELIABLE_COVERAGE = 0.80  # pooled coverage of the 95% new-run interval


@dataclass(frozen=True)
class Choice:
    """A form and why: `reliable` False means the benchmark saw no form hold up at this budget."""

    form: str
    share: float  # pilot compute / planned run's compute
    budget: float | None  # the benchmarked budget applied (None: the pilot is below every one)
    reliable: bool
    reason: str
    needed_share: float | None = None  # smallest benchmarked budget with a reliable form, above `budget`
    more_steps: float | None = None  # pilot steps (summed over runs) to add to reach it


def load(path: str | Path | None = None) -> list[dict[str, Any]] | None:
    """The stored benchmark records, one per design (None when the package ships none). A file holding a
    single record (the benchmark's own OUT/record.json of one design) reads as a list of one."""
    if path is not None:
        doc = json.loads(Path(path).read_text())
    else:
        ref = resources.files("forgetscale") / "resources" / "forecast_record.json"
        if not ref.is_file():
            return None
        doc = json.loads(ref.read_text())
    return list(doc["records"]) if "records" in doc else [doc]


def for_data(records: list[dict[str, Any]] | dict[str, Any], dataset: str,
             models: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    """The record that speaks for a sweep fine-tuned on `dataset` (with `models`), and a note saying which.
    A record without a `dataset` applies to any data (a planted or pre-design record)."""
    records = [records] if isinstance(records, dict) else list(records)
    if not records:
        raise DataError("the forecast record holds no design")
    anywhere = [r for r in records if "dataset" not in r]
    if anywhere:
        return anywhere[0], ""
    same = [r for r in records if r["dataset"] == dataset]
    exact = [r for r in same if r.get("model") in models]
    if exact:
        return exact[0], f"record of design {exact[0].get('design')}: same data, same model"
    if len(same) == 1:
        return same[0], f"record of design {same[0].get('design')}: same data, model {same[0].get('model')}"
    pool, what = (same, f"this model on {dataset}") if same else (records, dataset)
    names = ", ".join(str(r.get("design")) for r in pool)
    return strictest(pool), f"no benchmark ran on {what}: each form held to its worst record over the designs {names}"


def strictest(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from many: per budget (the labels every record has) and per form (in every record), the
    largest median error, the smallest coverage, the forecasts summed."""
    labels = [b["label"] for b in records[0]["budgets"]
              if all(any(x["label"] == b["label"] for x in r["budgets"]) for r in records[1:])]
    budgets = []
    for label in labels:
        at = [next(x for x in r["budgets"] if x["label"] == label) for r in records]
        forms = {}
        for form in at[0]["forms"]:
            entries = [b["forms"][form] for b in at if form in b["forms"]]
            if len(entries) < len(at) or any(e.get("median_abs_kl") is None for e in entries):
                continue
            worst = dict(max(entries, key=lambda e: e["median_abs_kl"]))
            covs = [e.get("coverage_kl") for e in entries]
            worst.update(n=sum(int(e["n"]) for e in entries), missing=sum(int(e.get("missing") or 0) for e in entries),
                         coverage_kl=None if any(c is None for c in covs) else min(covs))
            forms[form] = worst
        budgets.append({"label": label, "budget": at[0]["budget"], "forms": forms})
    designs = ", ".join(str(r.get("design")) for r in records)
    return {"source": f"benchmarks/forecast_bench.py, designs {designs}, each form at its worst", "design": designs,
            "budgets": budgets}


def pilot_steps(group: dict[str, Any]) -> float:
    """The pilot's compute in update steps: every fitted run's last step, summed (the step-0 base is free)."""
    last: dict[str, int] = {}
    for d in group["laws"].values():
        for run, steps in (d.get("rows") or {}).items():
            if steps:
                last[run] = max(last.get(run, 0), max(int(s) for s in steps))
    if not last:
        raise DataError(f"laws.json records no fitted rows for {group['label']}; re-run `forgetscale fit`")
    return float(sum(last.values()))


def reliable(entry: dict[str, Any]) -> bool:
    """A form's record at one budget passes the rule (a form whose fits sometimes gave no forecast does not)."""
    err, cov = entry.get("median_abs_kl"), entry.get("coverage_kl")
    return (err is not None and cov is not None and err <= RELIABLE_ERROR and cov >= RELIABLE_COVERAGE
            and not entry.get("missing"))


def select(record: dict[str, Any], usable: list[str], pilot: float, target_steps: float) -> Choice:
    """The form for a run of `target_steps` steps forecast from a pilot of `pilot` steps (summed over runs),
    among the `usable` forms, by the benchmark's record (see the module docstring)."""
    if not usable:
        raise DataError("no law form was fitted, so none can be chosen")
    share = pilot / float(target_steps)
    budgets = sorted(record["budgets"], key=lambda b: b["budget"])
    reached = [b for b in budgets if b["budget"] <= share + 1e-9]
    at = reached[-1] if reached else budgets[0]
    entries = {f: e for f, e in at["forms"].items() if f in usable and e.get("median_abs_kl") is not None}
    if not entries:
        raise DataError(f"the forecast record has no result at the {at['label']} budget for the forms fitted "
                        f"({', '.join(usable)})")
    ok = {f: e for f, e in entries.items() if reliable(e)}
    pool = ok if ok and reached else entries
    form = min(pool, key=lambda f: pool[f]["median_abs_kl"])
    e = pool[form]
    said = (f"{form}: on the forecasting benchmark ({record.get('source', 'benchmarks/forecast_bench.py')}) at a "
            f"{at['label']} pilot budget its median KL-rise error was {100 * e['median_abs_kl']:.1f}% over {e['n']} "
            "forecasts, and its 95% new-run interval " + ("was never given" if e.get("coverage_kl") is None else
                                                          f"covered {100 * e['coverage_kl']:.0f}% of them"))
    beyond = " (larger pilots were not benchmarked)" if share > budgets[-1]["budget"] + 1e-9 else ""
    if reached and ok:
        return Choice(form, share, at["budget"], True, f"{said}; this pilot is {100 * share:.1f}% of the run's "
                      f"compute{beyond} (rule: the best form with median error <= {100 * RELIABLE_ERROR:g}% and "
                      f"coverage >= {100 * RELIABLE_COVERAGE:g}%)")
    later = [b for b in budgets if b["budget"] > (at["budget"] if reached else share)
             and any(f in usable and reliable(x) for f, x in b["forms"].items())]
    where = (f"this pilot is {100 * share:.1f}% of the run's compute, below the smallest benchmarked budget "
             f"({budgets[0]['label']})" if not reached else
             f"no form met median error <= {100 * RELIABLE_ERROR:g}% with coverage >= {100 * RELIABLE_COVERAGE:g}% "
             f"at {at['label']}; this pilot is {100 * share:.1f}% of the run's compute{beyond}")
    if later:
        need = later[0]["budget"]
        more = max(0.0, need * float(target_steps) - pilot)
        return Choice(form, share, at["budget"] if reached else None, False,
                      f"NOT RELIABLE: {where}. The benchmark found a reliable form from a {later[0]['label']} pilot: "
                      f"about {more:,.0f} more pilot steps (summed over runs). Best here: {said}", need, more)
    top = budgets[-1]["label"]
    return Choice(form, share, at["budget"] if reached else None, False,
                  f"NOT RELIABLE: {where}, and no benchmarked budget (up to {top}) gave a reliable form: expect "
                  f"errors beyond {100 * RELIABLE_ERROR:g}% of the KL rise. Best here: {said}")
