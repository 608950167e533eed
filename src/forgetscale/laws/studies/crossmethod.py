"""Laws across fine-tuning methods: the paper's appendix question, as the `cross_method` block of laws.json.

The paper fits its laws on LoRA (every linear module, several ranks) and asks whether they also hold
for other methods (IA3, top-3 layers, attention-only LoRA, very high ranks, full fine-tuning): the
power law in (P, N) still predicted them all; the linear law in L_ft underestimated forgetting for
IA3 and top-layer tuning. For each dataset (and mitigation) of a sweep with several method groups:

1. **Distance from the LoRA laws.** The reference is the all-linear LoRA group with >= 2 ranks;
   its laws as `fit` fitted them predict L_f on every other group's checkpoints (same row rules,
   same minimum step). Per group and law: signed mean, mean and max relative error
   (predicted - observed) / observed (a negative signed mean: the law underestimates forgetting),
   each with a 95% interval over the LoRA laws' bootstrap refits, and R^2 on all other groups'
   rows together (the paper's figure). The LoRA rows' own in-sample error is the yardstick.
2. **Pooled fit.** Every law fitted on all groups' rows together, as one group.
3. **Which is better.** A forecast test in N that every method supports (one run is enough): each
   run's checkpoints up to the cut step train, the later ones test. Fits on the training rows of
   (own) the group alone, (pooled) all groups, (lora) the reference alone each forecast every
   group's later rows; the mean absolute relative error (MARE) says which source to trust.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from forgetscale.errors import DataError
from forgetscale.formatting import pct
from forgetscale.laws.estimators import fitting
from forgetscale.laws.estimators.base import Law
from forgetscale.laws.estimators.groups import ALL_LINEAR, GROUP, METHOD_KEY, add_groups, settings
from forgetscale.laws.estimators.select import group_label, select_rows
from forgetscale.laws.pipeline import lawfile
from forgetscale.laws.pipeline.fitall import FitOptions, Progress, fit_group

COMPARED = ("linear", "power_f", "power_joint", "mult_f")  # the L_f laws compared across methods
REFERENCE_METHOD = "lora"
POOLED = "pooled"
SOURCES = ("own", "pooled", "lora")
COARSE_RESAMPLES = 30  # fewer distinct bootstrap resamples than this: say the intervals are coarse


def is_reference_group(method: str, method_config: Any) -> bool:
    """All-linear LoRA on every layer (the paper's main setting); scaling, alpha and dropout may vary."""
    cfg = settings(method_config)
    modules = cfg.get("target_modules", list(ALL_LINEAR))
    return method == REFERENCE_METHOD and sorted(modules) == sorted(ALL_LINEAR) and cfg.get("layers") is None


def _select(rows: pd.DataFrame, options: FitOptions, min_step: int) -> pd.DataFrame:
    cols = (options.ft_column, options.target)
    return select_rows(rows, law="cross_method", columns=cols, min_step=min_step,
                       include_unfinished=options.include_unfinished).rows


def _reference(frame: pd.DataFrame, options: FitOptions) -> tuple[str | None, str]:
    """The reference group's label, or None and why there is none."""
    best: tuple[int, int, str] | None = None
    for group, sub in frame.groupby(GROUP, sort=True):
        first = sub.iloc[0]
        if not is_reference_group(str(first["method"]), first.get("method_config")):
            continue
        done = sub if options.include_unfinished else sub[sub["status"] == "finished"]
        n_p = done["trainable_params"].nunique()
        if n_p >= 2:
            cand = (int(group == REFERENCE_METHOD), n_p, str(group))
            best = cand if best is None or cand[:2] > best[:2] else best
    if best is None:
        return None, "no all-linear LoRA variant with >= 2 finished ranks to fit the reference laws on"
    return best[2], ""


def _predict(law: Law, params: np.ndarray, rows: pd.DataFrame) -> np.ndarray:
    """L_f predicted at the rows for every parameter row (b, n): Eq. 4 reads L_ft, the others (P, N)."""
    x = rows[law.ft_column] if law.name == "linear" else rows["trainable_params"]
    with np.errstate(all="ignore"):
        return law._predict_draws(params, x.to_numpy(float), rows["step"].to_numpy(float), "f")


def _stats(pred: np.ndarray, obs: np.ndarray) -> dict[str, np.ndarray]:
    rel = (pred - obs) / obs
    return {"signed": rel.mean(axis=1), "mean": np.abs(rel).mean(axis=1), "max": np.abs(rel).max(axis=1)}


def relative_errors(law: Law, rows: pd.DataFrame) -> dict[str, Any]:
    """Relative errors of a fitted law's L_f on rows, with 95% intervals over its bootstrap draws."""
    obs = rows[law.target].to_numpy(float)
    point = _stats(_predict(law, np.array([[law.params_[n] for n in law.names]]), rows), obs)
    out: dict[str, Any] = {"n": int(len(rows))}
    boot = _stats(_predict(law, law.boot_, rows), obs) if len(law.boot_) else None
    for k, v in point.items():
        out[k] = float(v[0])
        lo, hi = fitting.interval(boot[k][:, None]) if boot is not None else (np.full(1, np.nan),) * 2
        out[f"{k}_ci"] = [float(lo[0]), float(hi[0])]
    lo, hi = out["signed_ci"]
    if not math.isfinite(out["signed"]):
        out["bias"] = "no finite prediction"
    elif not (math.isfinite(lo) and math.isfinite(hi)):
        out["bias"] = "no interval"
    elif hi < 0:
        out["bias"] = "under"
    elif lo > 0:
        out["bias"] = "over"
    else:
        out["bias"] = "unclear"
    return out


def _outside(ref: Law, rows: pd.DataFrame) -> list[str]:
    """Where the group's rows lie outside what the reference fit saw (its predictions extrapolate)."""
    notes = []
    lo, hi = ref.ranges_["P"]
    P = rows["trainable_params"].to_numpy(float)
    if P.max() > hi * (1 + 1e-9):
        notes.append(f"P up to {P.max() / hi:.3g}x the largest LoRA P")
    if P.min() < lo * (1 - 1e-9):
        notes.append(f"P down to {P.min() / lo:.3g}x the smallest LoRA P")
    return notes


def _summary(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Per run: P, rank, status and its last checkpoint's losses (the methods table)."""
    out = []
    for run_id, g in rows.sort_values("step").groupby("run_id", sort=True):
        last = g.iloc[-1]
        out.append({"run_id": str(run_id), "rank": None if pd.isna(last["rank"]) else int(last["rank"]),
                    "P": float(last["trainable_params"]), "status": str(last["status"]), "step": int(last["step"]),
                    **{c: float(last[c]) for c in ("ft_loss", "ft_loss_train", "forget_ce", "forget_kl") if c in g}})
    return sorted(out, key=lambda r: (r["P"], r["run_id"]))


def _r2(laws: dict[str, Law], rows: pd.DataFrame) -> dict[str, float]:
    obs = rows[next(iter(laws.values())).target].to_numpy(float) if laws and len(rows) else np.array([])
    out = {}
    for name, law in laws.items():
        pred = _predict(law, np.array([[law.params_[n] for n in law.names]]), rows)[0] if obs.size else obs
        out[name] = fitting.r2(obs, pred) if obs.size > 1 and np.all(np.isfinite(pred)) else float("nan")
    return out


def _pooled(rows: pd.DataFrame) -> pd.DataFrame:
    """All groups' rows relabelled as one group."""
    return rows.assign(method=POOLED, **{GROUP: POOLED, METHOD_KEY: POOLED})


def _mean(values) -> float:
    v = list(values)
    return float(np.mean(v)) if v else float("nan")


def _time_split(rows: pd.DataFrame, ref: str, options: FitOptions, min_step: int) -> dict[str, Any]:
    """Forecast every group's later steps from fits on earlier steps: own, pooled or LoRA-only rows."""
    steps = np.unique(rows["step"])
    if steps.size < 4:
        return {"description": f"no held-out test: needs >= 4 distinct steps >= {min_step}; got {steps.size} "
                               "(lower --min-step)", "by_variant": {}, "summary": {}}
    n_cut = float(steps[max(3, math.ceil(steps.size / 2)) - 1])
    train, test = rows[rows["step"] <= n_cut], rows[rows["step"] > n_cut]
    opts = dataclasses.replace(options, n_bootstrap=0, min_step=min_step,
                               laws=tuple(n for n in COMPARED if n in options.laws))

    def fit(part: pd.DataFrame) -> dict[str, Law]:
        fitted, _ = fit_group(part, opts, heldout=False) if len(part) else ({}, {})
        return {n: law for n, law in fitted.items() if n in opts.laws}

    shared = {"pooled": fit(_pooled(train)), "lora": fit(train[train[GROUP] == ref])}
    by_group: dict[str, Any] = {}
    for group, t in test.groupby(GROUP, sort=True):
        own = shared["lora"] if group == ref else fit(train[train[GROUP] == group])
        obs = t[options.target].to_numpy(float)
        res: dict[str, Any] = {"n_test": int(len(t))}
        for source, laws in (("own", own), *shared.items()):
            res[source] = {n: fitting.mare(obs, _predict(law, np.array([[law.params_[k] for k in law.names]]), t)[0])
                           for n, law in laws.items()}
        by_group[str(group)] = res
    summary: dict[str, Any] = {}
    for name in opts.laws:
        got = {v: {s: r[s].get(name, math.nan) for s in SOURCES} for v, r in by_group.items()}
        paired = [g for g in got.values() if math.isfinite(g["own"]) and math.isfinite(g["pooled"])]
        every = [g for g in got.values() if math.isfinite(g["pooled"]) and math.isfinite(g["lora"])]
        summary[name] = {
            "paired_n": len(paired),  # groups with both an own and a pooled forecast
            "own_mean": _mean(g["own"] for g in paired), "pooled_mean_paired": _mean(g["pooled"] for g in paired),
            "own_better": sum(g["own"] < g["pooled"] for g in paired),
            "pooled_better": sum(g["pooled"] < g["own"] for g in paired),
            "all_n": len(every),  # groups with both a pooled and a LoRA-only forecast
            "pooled_mean": _mean(g["pooled"] for g in every), "lora_mean": _mean(g["lora"] for g in every),
        }
    desc = (f"fit on N <= {n_cut:g} ({len(train)} rows), forecast N > {n_cut:g} ({len(test)} rows) of every run; "
            "own = the variant's rows alone, pooled = all variants, lora = the reference alone")
    return {"description": desc, "n_cut": n_cut, "by_variant": by_group, "summary": summary}


def _compare_one(frame: pd.DataFrame, key: dict[str, str], fitted: dict[str, dict[str, Law]], options: FitOptions,
                 progress: Progress | None) -> dict[str, Any]:
    ref, why = _reference(frame, options)
    block: dict[str, Any] = {"dataset": key["dataset"], "mitigation": key["mitigation"], "reference": ref,
                             "variants": {}}
    for group, sub in frame.groupby(GROUP, sort=True):
        first = sub.iloc[0]
        block["variants"][str(group)] = {
            "method": str(first["method"]), "settings": settings(first.get("method_config")),
            "label": group_label({**key, "method": str(first["method"]), "variant": str(group)}),
            "runs": _summary(sub[sub["step"] > 0] if (sub["step"] > 0).any() else sub)}
    if ref is None:
        block["status"] = f"not compared: {why}"
        return block
    ref_laws = fitted.get(group_label({**key, "variant": ref}), {})
    laws = {n: law for n, law in ref_laws.items() if n in COMPARED}
    if "linear" not in ref_laws:
        block["status"] = "not compared: the reference LoRA laws were not fitted (see its group)"
        return block
    min_step = int(ref_laws["linear"].min_step_)
    boot = ref_laws["linear"].boot_
    block.update(min_step=min_step, law_status={n: law.status_ for n, law in laws.items()},
                 reference_ranges=ref_laws["linear"].ranges_, reference_runs=len(ref_laws["linear"].rows_),
                 distinct_resamples=int(len(np.unique(boot[np.all(np.isfinite(boot), axis=1)], axis=0))))
    selected = []
    for group, sub in frame.groupby(GROUP, sort=True):
        info = block["variants"][str(group)]
        try:
            rows = _select(sub, options, min_step)
        except DataError as err:
            info["status"] = "not compared: " + str(err).replace("law 'cross_method' needs", "needs")
            continue
        selected.append(rows)
        info.update(status="compared", n_rows=int(len(rows)), steps=sorted(int(s) for s in rows["step"].unique()),
                    outside=_outside(ref_laws["linear"], rows),
                    errors={n: relative_errors(law, rows) for n, law in laws.items()})
    if not any((r[GROUP] == ref).any() for r in selected) or len(selected) < 2:
        block["status"] = "not compared: fewer than two method variants have rows at the reference's steps"
        return block
    rows = pd.concat(selected, ignore_index=True)
    others = rows[rows[GROUP] != ref]
    block["r2_other_methods"] = _r2(laws, others)
    block["n_other_rows"] = int(len(others))
    if progress:
        progress(f"{key['dataset']} / {POOLED}", "pooled laws", 0, 1)
    pooled_laws, failed = fit_group(_pooled(frame), options)
    block["pooled"] = {
        "label": f"{key['dataset']} / {POOLED} ({rows[GROUP].nunique()} methods)",
        "laws": {n: lawfile.law_to_dict(pooled_laws[n]) if n in pooled_laws else
                 {"law": n, "status": f"not fitted: {failed.get(n, 'a law it borrows from was not fitted')}"}
                 for n in options.laws}}
    block["heldout"] = _time_split(rows, ref, options, min_step)
    block["status"] = "compared"
    return block


def compare(frame: pd.DataFrame, fitted: dict[str, dict[str, Law]], options: FitOptions,
            progress: Progress | None = None) -> list[dict[str, Any]]:
    """The cross_method blocks: one per (dataset, mitigation) holding two or more method groups.

    `fitted` maps group labels to the laws `fit` fitted on them (the reference's are reused, so its
    bootstrap draws give the intervals). A single-method sweep gives an empty list.
    """
    frame = add_groups(frame)
    out = []
    for (dataset, mitigation), sub in frame.groupby(["dataset", "mitigation"], sort=True, dropna=False):
        if sub[GROUP].nunique() < 2:
            continue
        key = {"dataset": str(dataset), "method": REFERENCE_METHOD, "mitigation": str(mitigation)}
        out.append(_compare_one(sub, key, fitted, options, progress))
    return json.loads(json.dumps(lawfile.json_safe(out)))  # as laws.json will hold it (NaN -> null)


LAW_NAMES = {"linear": "Eq. 4 (linear in L_ft)", "power_f": "Eq. 6 (power in P, N)",
             "power_joint": "Eq. 5+6 joint (power in P, N)", "mult_f": "multiplicative in P, N"}


def verdict(block: dict[str, Any]) -> list[str]:
    """The block read in plain sentences (what `fit` prints and the report shows)."""
    if block.get("status") != "compared":
        return [block.get("status", "not compared")]
    ref = block["reference"]
    ref_err = block["variants"][ref].get("errors", {})
    others = {v: i for v, i in block["variants"].items() if v != ref and i.get("status") == "compared"}
    lines = []
    few = block.get("distinct_resamples")
    if few is not None and few < COARSE_RESAMPLES:
        lines.append(f"The LoRA fit has {block['reference_runs']} runs, so its bootstrap has only {few} distinct "
                     "resamples: the intervals, and the under/over calls that rest on them, are coarse.")
    for law in (n for n in COMPARED if n in ref_err):
        errs = {v: i["errors"][law] for v, i in others.items() if law in i.get("errors", {})}
        if not errs:
            continue
        if all(e["bias"] == "no finite prediction" for e in errs.values()):
            lines.append(f"{LAW_NAMES[law]}: no finite prediction ({block['law_status'][law]}).")
            continue
        parts = []
        for bias, text in (("under", "underestimates L_f for"), ("over", "overestimates L_f for"),
                           ("unclear", "no bias beyond its 95% interval for"),
                           ("no interval", "no interval (law not identified) for")):
            hit = [f"{v} ({pct(e['signed'])})" if bias != "unclear" else v for v, e in errs.items() if e["bias"] == bias]
            if hit:
                parts.append(f"{text} {', '.join(hit)}")
        means = [e["mean"] for e in errs.values() if e["mean"] is not None and math.isfinite(e["mean"])]
        r2 = (block.get("r2_other_methods") or {}).get(law)
        spread = pct(min(means)) if min(means) == max(means) else f"{pct(min(means))}-{pct(max(means))}"
        lines.append(f"{LAW_NAMES[law]}: {'; '.join(parts)}. Mean |error| {spread} on "
                     f"other methods vs {pct(ref_err[law]['mean'])} on the LoRA rows it was fitted on"
                     + (f"; R^2 {r2:.3f} on the other methods' rows." if r2 is not None and math.isfinite(r2) else "."))
    ho = block.get("heldout", {})
    if not ho.get("summary"):
        lines.append(f"Own vs pooled fits: {ho.get('description', 'no held-out test')}.")
    for law, s in ho.get("summary", {}).items():
        if not s["paired_n"] and not s["all_n"]:
            continue
        text = f"Held-out forecast, {LAW_NAMES[law]}: "
        if s["paired_n"]:
            text += (f"own-method fit better for {s['own_better']} of {s['paired_n']} methods (MARE {pct(s['own_mean'])} "
                     f"vs pooled {pct(s['pooled_mean_paired'])}); ")
        if s["all_n"]:
            text += f"pooled {pct(s['pooled_mean'])} vs LoRA-only {pct(s['lora_mean'])} over {s['all_n']} methods."
        lines.append(text.rstrip("; ") + ("" if text.endswith(".") else "."))
    return lines
