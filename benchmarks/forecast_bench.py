"""Forecasting benchmark on real runs (issue 32): how far do pilot-fitted laws miss long runs?

Per design (model x fine-tuning data), two pilots (ranks 4/8/16/32, one seed each, 10 steps) and eight
targets (ranks 16/64 x seeds 0-3, TARGET_STEPS steps). Every pilot is fitted
at each budget (the first k steps of its 4 runs, 4 k <= budget x TARGET_STEPS), and every fit forecasts
every target's checkpoints: KL-rise and L_ft-drop errors (signed, absolute) and the 95% new-run
interval's coverage, per form, beside the nearest-checkpoint baseline. Pooled numbers carry 95% intervals
from a bootstrap over pilots and targets (the pairs share both, so a pair bootstrap would be too narrow).

    OMP_NUM_THREADS=1 python benchmarks/forecast_bench.py --out runs/forecast-bench        # run + score
    python benchmarks/forecast_bench.py --out runs/forecast-bench --score-only             # score what exists
    python benchmarks/forecast_bench.py --designs smollm2-sharegpt gemma-news ...          # other designs

Resumable: every sweep resumes (finished runs are skipped) and each fit is cached under
OUT/<design>/fits/<pilot>-<budget>/laws.json. One torch process at a time, one thread (train.threads=1).
Writes OUT/<design>/scores.csv (one row per pilot x budget x form x target checkpoint), OUT/summary.csv,
OUT/record.json (one record per design scored: what `plan` and `predict` read; `--install` merges them into
src/forgetscale/resources/forecast_record.json, replacing that file's records of the same designs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from forgetscale.errors import DataError
from forgetscale.laws.estimators.select import base_column, group_rows, with_base
from forgetscale.laws.fit import fit_frame
from forgetscale.laws.pipeline import forecast, lawfile, plan
from forgetscale.laws.pipeline import record as rule
from forgetscale.laws.pipeline.fitall import FitOptions
from forgetscale.store import Store

TARGET_STEPS = 120
PILOT_STEPS = 10
PILOT_RANKS = (4, 8, 16, 32)
TARGET_RANKS = (16, 64)
PILOT_SEEDS = (0, 1)
TARGET_SEEDS = (0, 1, 2, 3)
BUDGETS = {"10%": 3, "20%": 6}  # budget -> steps per pilot run: 4 runs x k steps <= budget x TARGET_STEPS
TARGET_CHECKPOINTS = [0, 30, 60, 120]
PILOT_CHECKPOINTS = [0, 1, 2, 3, 4, 6, 8, 10]
BASELINE = "baseline: nearest fitted checkpoint"
SELECTED_HELDOUT = "selected by the pilot's held-out check"
SELECTED_RECORD = "selected by the rule (record of the other pilots)"
SHIPPED = Path(__file__).resolve().parents[1] / "src" / "forgetscale" / "resources" / "forecast_record.json"
DESIGNS = {
    "smollm2-news": {"model": "smollm2-135m-instruct", "dataset": "embedded:news"},
    "smollm2-sharegpt": {"model": "smollm2-135m-instruct", "dataset": "embedded:sharegpt"},
    # Gemma costs ~4x SmolLM2 per step and per checkpoint here (docs/models.md): bf16 weights + autocast as in
    # configs/cross-model-gemma.yaml, and the pilots stop at the last step a budget fits (6), every checkpoint used.
    # LoRA alpha 1 (rsLoRA: the paper's 1/sqrt(r)) as in that config: at the method default of 16 Gemma's held-out
    # L_ft did not fall over the 120 steps (measured 2026-12-04; docs/laws.md), the forecasts were of an over-stepped run
    "gemma-news": {"model": "gemma3-270m", "dataset": "embedded:news", "dtype": "bfloat16", "alpha": 1.0,
                   "pilot_steps": 6, "pilot_checkpoints": [0, 1, 2, 3, 4, 6]},
}


def sweep_config(design: str, ranks: tuple[int, ...], steps: int, checkpoints: list[int],
                 seeds: tuple[int, ...]) -> dict:
    """The forecast-pilot/target settings of configs/ (batch 4 x 64 tokens, lr 1e-3, warm-up 2: the same
    schedule for every length, so a pilot's first steps are a long run's first steps), 2,048 tokens each."""
    d = DESIGNS[design]
    dtype = {"dtype": d["dtype"]} if "dtype" in d else {}
    return {
        "name": f"forecast-bench-{design}",
        "model": {"name": d["model"], **dtype},
        "finetune": {"dataset": d["dataset"], "heldout_fraction": 0.1, "heldout_max_tokens": 2048},
        "forgetting": {"dataset": "embedded:wikipedia", "max_tokens": 2048},
        "method": {"name": "lora", "ranks": list(ranks), "scaling": "rslora",
                   **({"alpha": d["alpha"]} if "alpha" in d else {})},
        "train": {"steps": steps, "checkpoints": checkpoints, "batch_size": 4, "context_length": 64,
                  "lr": 0.001, "warmup_steps": 2, "optimizer": "adafactor", "seeds": list(seeds),
                  "threads": 1, "save_adapters": "none", **dtype},
    }


def sweeps(design: str) -> dict[str, dict]:
    """Run folder name -> sweep config, in the order run: one folder per seed, pilots and targets
    interleaved, so a benchmark cut short still holds both ranks and both pilots."""
    steps = DESIGNS[design].get("pilot_steps", PILOT_STEPS)
    checkpoints = DESIGNS[design].get("pilot_checkpoints", PILOT_CHECKPOINTS)
    pilots = {f"pilot-s{s}": sweep_config(design, PILOT_RANKS, steps, checkpoints, (s,)) for s in PILOT_SEEDS}
    targets = {f"target-s{s}": sweep_config(design, TARGET_RANKS, TARGET_STEPS, TARGET_CHECKPOINTS, (s,))
               for s in TARGET_SEEDS}
    order = ["pilot-s0", "target-s0", "pilot-s1", *[f"target-s{s}" for s in TARGET_SEEDS[1:]], *pilots]
    both = {**pilots, **targets}
    return {name: both[name] for name in dict.fromkeys(order)}


def run_sweeps(root: Path, design: str) -> bool:
    """Run (or resume) every sweep of a design, one process at a time; True when all finished."""
    ok = True
    for name, cfg in sweeps(design).items():
        run_dir = root / design / name
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "sweep.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        start = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        rc = subprocess.call([sys.executable, "-m", "forgetscale", "sweep", str(path), "--out", str(run_dir)],
                             env=env, stdout=subprocess.DEVNULL)
        print(f"{design}/{name}: exit {rc} ({time.perf_counter() - start:.0f} s)", flush=True)
        ok = ok and rc == 0
        if rc == 2:  # bad input (e.g. a model not installed): the rest of the design cannot run either
            return False
    return ok


def _frame(run_dir: Path) -> pd.DataFrame:
    with Store(run_dir, create=False) as store:
        return store.frame()


def pilot_fit(root: Path, design: str, seed: int, budget: str, n_bootstrap: int) -> dict | None:
    """The laws of one pilot at one budget (cached; None when the pilot's runs are not all finished)."""
    cache = root / design / "fits" / f"pilot-s{seed}-{budget}"
    if (cache / "laws.json").exists():
        return lawfile.load(cache)
    pilot = root / design / f"pilot-s{seed}"
    if not (pilot / "results.sqlite").exists():
        return None
    frame = _frame(pilot)
    if frame.empty or len(frame["run_id"].unique()) < len(PILOT_RANKS) or (frame["status"] != "finished").any():
        return None
    options = FitOptions(max_step=BUDGETS[budget], n_bootstrap=n_bootstrap, seed=0)
    start = time.perf_counter()
    doc = fit_frame(frame, options)
    cache.mkdir(parents=True, exist_ok=True)
    lawfile.save(cache, doc)
    print(f"{design}: fitted pilot s{seed} at {budget} ({time.perf_counter() - start:.0f} s)", flush=True)
    return doc


def score_pair(group: dict, pilot_rows: pd.DataFrame, target: pd.DataFrame, k: int) -> pd.DataFrame:
    """Every form's forecast of every target checkpoint, plus the nearest-checkpoint baseline (the
    pilot's largest rank at its last fitted step, reused) and the form the pilot's own held-out check
    picks (what `plan` used before the benchmark)."""
    scored = forecast.against(group, target)
    scored = scored.copy()
    nearest = pilot_rows[pilot_rows["step"] <= k].sort_values(["trainable_params", "step"]).iloc[-1]
    base = with_base(target, ("ft_loss", "forget_ce"))
    base = base[base["step"] >= 1].sort_values(["run_id", "step"])
    rows = []
    for output, col in (("ft", "ft_loss"), ("f", "forget_ce")):
        for r in base.to_dict("records"):
            measured, start = r[col], r[base_column(col)]
            err = float(nearest[col]) - measured
            rows.append({"form": BASELINE, "law": "", "output": output, "run_id": r["run_id"],
                         "P": r["trainable_params"], "N": r["step"], "forecast": float(nearest[col]), "measured": measured,
                         "error": err, "share_of_change": err / abs(measured - start), "pi_lo": np.nan,
                         "pi_hi": np.nan, "covered": None})
    out = pd.concat([scored, pd.DataFrame(rows)], ignore_index=True)
    try:
        held = plan.best_form(group)
    except DataError:
        held = None
    if held is not None:
        out = pd.concat([out, form_rows(out, held).assign(form=SELECTED_HELDOUT, chosen=held)], ignore_index=True)
    return out


def form_rows(scores: pd.DataFrame, form: str) -> pd.DataFrame:
    """A form's forecasts as `plan` uses them: L_ft from its L_ft law (Eq. 5's for "linear of power_ft"),
    L_f from its L_f law."""
    ft_law, f_law = plan.FORMS[form]
    ft = scores[(scores["output"] == "ft") & (scores["law"] == ft_law)]
    f = scores[(scores["output"] == "f") & (scores["law"] == f_law) & (scores["form"] == form)]
    return pd.concat([ft.drop_duplicates(["run_id", "N", "pilot", "budget"] if "pilot" in ft else ["run_id", "N"]), f])


def score_design(root: Path, design: str, n_bootstrap: int) -> pd.DataFrame:
    """scores.csv of a design: every (pilot, budget, form, output, target checkpoint) scored so far."""
    dirs = [root / design / f"target-s{s}" for s in TARGET_SEEDS]
    frames = [_frame(d) for d in dirs if (d / "results.sqlite").exists()]
    if not frames:
        return pd.DataFrame()
    target_all = pd.concat(frames, ignore_index=True)
    finished = target_all[target_all["status"] == "finished"]
    if finished.empty:
        return pd.DataFrame()
    info = finished.groupby("run_id")[["rank", "seed"]].first()
    parts = []
    for seed in PILOT_SEEDS:
        for budget, k in BUDGETS.items():
            doc = pilot_fit(root, design, seed, budget, n_bootstrap)
            if doc is None:
                continue
            group = forecast.choose_group(doc)
            pilot_rows = _frame(root / design / f"pilot-s{seed}")
            target = group_rows(finished, group["key"])
            s = score_pair(group, pilot_rows, target, k)
            s["pilot"] = f"s{seed}"
            s["budget"] = budget
            s["target_rank"] = s["run_id"].map(info["rank"]).astype(int)
            s["target_seed"] = s["run_id"].map(info["seed"]).astype(int)
            # the pilot ran this target's first steps (same rank and seed): a continuation, not a new run
            s["seen_start"] = (s["target_seed"] == seed) & s["target_rank"].isin(PILOT_RANKS)
            parts.append(s)
    if not parts:
        return pd.DataFrame()
    scores = pd.concat(parts, ignore_index=True)
    scores["design"] = design
    scores["final"] = scores["N"] == TARGET_STEPS
    scores.to_csv(root / design / "scores.csv", index=False)
    return scores


def _cluster_ci(sub: pd.DataFrame, column: str, stat, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of stat(values) over a bootstrap of pilots and targets (both resampled)."""
    rng = np.random.default_rng(seed)
    pilots, targets = sub["pilot"].unique(), sub["target"].unique()
    cells = {(p, t): g[column].to_numpy(float) for (p, t), g in sub.groupby(["pilot", "target"])}
    vals = []
    for _ in range(n):
        ps, ts = rng.choice(pilots, pilots.size), rng.choice(targets, targets.size)
        parts = [cells[(p, t)] for p in ps for t in ts if (p, t) in cells]
        x = np.concatenate(parts) if parts else np.empty(0)
        x = x[np.isfinite(x)]
        if x.size:
            vals.append(stat(x))
    vals = np.asarray(vals)
    return (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))) if vals.size else (np.nan, np.nan)


def _median_abs(x: np.ndarray) -> float:
    return float(np.median(np.abs(x)))


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x))


def summarise(scores: pd.DataFrame, final_only: bool = True) -> pd.DataFrame:
    """Pooled per (design, budget, form): median |error| / change, signed mean, share within 10%,
    coverage; KL rise and L_ft drop; 95% intervals from the pilot x target bootstrap."""
    s = scores[scores["final"]] if final_only else scores
    s = s.assign(target=s["run_id"], rel=s["share_of_change"].astype(float))
    rows: list[dict] = []
    for (design, budget, form), g in s.groupby(["design", "budget", "form"], sort=False):
        row = {"design": design, "budget": budget, "form": form}
        for output, name in (("f", "kl"), ("ft", "ft")):
            x = g[g["output"] == output]
            if x.empty:
                continue
            missing = int((~np.isfinite(x["rel"].to_numpy(float))).sum())  # the fit gave no finite forecast
            x = x[np.isfinite(x["rel"].to_numpy(float))]
            if x.empty:
                row[f"missing_{name}"] = missing
                continue
            rel = x["rel"].to_numpy(float)
            cov = x.assign(cov=x["covered"].map(lambda c: np.nan if c is None or pd.isna(c) else float(c)))
            covered = cov["cov"].to_numpy(float)
            row.update({f"n_{name}": len(x), f"missing_{name}": missing, f"median_abs_{name}": _median_abs(rel),
                        f"median_abs_{name}_ci": _cluster_ci(x, "rel", _median_abs),
                        f"signed_{name}": float(np.mean(rel)),
                        f"within10_{name}": float(np.mean(np.abs(rel) <= 0.10)),
                        f"coverage_{name}": float(np.nanmean(covered)) if np.isfinite(covered).any() else np.nan,
                        f"coverage_{name}_ci": _cluster_ci(cov, "cov", _mean),
                        # the interval's width over the run's own change: 100% or more says little
                        f"width_{name}": float(np.nanmedian(((x["pi_hi"] - x["pi_lo"]) * x["rel"] / x["error"])
                                                            .to_numpy(float))) if x["pi_hi"].notna().any() else np.nan})
        rows.append(row)
    return pd.DataFrame(rows, columns=list(rows[0]) if rows else ["design", "budget", "form"])


def record_doc(summary: pd.DataFrame, design: str, command: str) -> dict:
    """What `plan` / `predict` read: each law form's pooled record per budget (final checkpoints)."""
    budgets = []
    for budget, k in BUDGETS.items():
        forms = {}
        for r in summary[(summary["design"] == design) & (summary["budget"] == budget)].to_dict("records"):
            if r["form"] not in plan.FORMS or not np.isfinite(r.get("median_abs_kl", np.nan)):
                continue
            clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
            forms[r["form"]] = {"n": int(r["n_kl"]), "missing": int(r.get("missing_kl") or 0),
                                "median_abs_kl": clean["median_abs_kl"],
                                "median_abs_kl_ci": list(r["median_abs_kl_ci"]), "signed_kl": clean["signed_kl"],
                                "coverage_kl": clean["coverage_kl"], "coverage_kl_ci": list(r["coverage_kl_ci"]),
                                "median_abs_ft": clean.get("median_abs_ft")}
        budgets.append({"label": budget, "budget": len(PILOT_RANKS) * k / TARGET_STEPS, "forms": forms})
    return {"source": command, "design": design, "model": DESIGNS[design]["model"],
            "dataset": DESIGNS[design]["dataset"], "target_steps": TARGET_STEPS,
            "measured": time.strftime("%Y-%m-%d"), "budgets": budgets}


def install(records: list[dict], path: Path = SHIPPED) -> None:
    """Merge `records` into the shipped record file: a design measured again replaces its old record in place,
    a new design is added at the end."""
    old = rule.load(path) if path.is_file() else []
    new = {r["design"]: r for r in records}
    merged = [new.pop(r.get("design"), r) for r in old]
    path.write_text(json.dumps({"records": merged + list(new.values())}, indent=1) + "\n")


def with_rule(scores: pd.DataFrame) -> pd.DataFrame:
    """Add the rule `plan` now uses, measured without seeing the pilot it is applied to: for each pilot,
    the record of the other pilots' final-step forecasts picks the form (record.select), and that form's
    forecasts of this pilot are scored under SELECTED_RECORD."""
    parts = [scores]
    for (design, pilot), own in scores.groupby(["design", "pilot"]):
        others = scores[(scores["design"] == design) & (scores["pilot"] != pilot)]
        if others.empty:
            continue
        rec = record_doc(summarise(others), design, "")
        for budget, k in BUDGETS.items():
            mine = own[own["budget"] == budget]
            usable = [f for f in plan.FORMS if f in set(mine["form"])]
            if not usable or not any(b["forms"] for b in rec["budgets"]):
                continue
            form = rule.select(rec, usable, len(PILOT_RANKS) * k, TARGET_STEPS).form
            parts.append(form_rows(mine, form).assign(form=SELECTED_RECORD, chosen=form))
    return pd.concat(parts, ignore_index=True)


def _fmt(x: float, ci: tuple[float, float] | None = None, pct: bool = True) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
    return f(x) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci is not None and np.isfinite(ci[0]) else "")


def markdown(summary: pd.DataFrame, scores: pd.DataFrame) -> str:
    """The pooled table and the per-target table, as docs/laws.md prints them."""
    lines = ["| design | budget | form | median \\|KL error\\| / rise | signed | within 10% | KL covered | "
             "KL interval width / rise | median \\|L_ft error\\| / drop | L_ft covered |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples(index=False):
        lost = [f"{int(m)} {o}" for o, m in (("KL", getattr(r, "missing_kl", 0)), ("L_ft", getattr(r, "missing_ft", 0)))
                if isinstance(m, (int, float)) and np.isfinite(m) and m > 0]
        form = r.form + (f" (no finite forecast: {', '.join(lost)})" if lost else "")
        lines.append(f"| {r.design} | {r.budget} | {form} | {_fmt(r.median_abs_kl, r.median_abs_kl_ci)} | "
                     f"{_fmt(r.signed_kl)} | {_fmt(r.within10_kl)} | {_fmt(r.coverage_kl, r.coverage_kl_ci)} | "
                     f"{_fmt(getattr(r, 'width_kl', np.nan))} | "
                     f"{_fmt(getattr(r, 'median_abs_ft', np.nan), getattr(r, 'median_abs_ft_ci', None))} | "
                     f"{_fmt(getattr(r, 'coverage_ft', np.nan))} |")
    final = scores[scores["final"] & (scores["output"] == "f")]
    if final.empty:
        return "\n".join(lines)
    forms = list(dict.fromkeys(final["form"]))
    lines += ["", "| design | budget | target (rank, seed) | " + " | ".join(forms) + " |",
              "|---|---|---|" + "---|" * len(forms)]
    for (design, budget, rank, seed), g in final.groupby(["design", "budget", "target_rank", "target_seed"], sort=False):
        cells = []
        for f in forms:
            x = g[g["form"] == f]["share_of_change"].astype(float)
            cells.append("-" if x.empty else "/".join(f"{100 * v:+.0f}" for v in x))
        lines.append(f"| {design} | {budget} | r{rank} s{seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/forecast-bench")
    parser.add_argument("--designs", nargs="+", default=["smollm2-news"], choices=list(DESIGNS))
    parser.add_argument("--score-only", action="store_true", help="fit and score the runs stored so far")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--install", action="store_true", help=f"merge the records into {SHIPPED.name}")
    args = parser.parse_args()
    root = Path(args.out)
    all_scores = []
    for design in args.designs:
        if not args.score_only:
            run_sweeps(root, design)
        scores = score_design(root, design, args.bootstrap)
        if scores.empty:
            print(f"{design}: nothing to score yet", flush=True)
            continue
        all_scores.append(scores)
    if not all_scores:
        return
    scores = with_rule(pd.concat(all_scores, ignore_index=True))
    scores.to_csv(root / "scores.csv", index=False)
    summary = summarise(scores).sort_values(["design", "budget"], kind="stable")
    summary.to_csv(root / "summary.csv", index=False)
    every = summarise(scores, final_only=False).sort_values(["design", "budget"], kind="stable")
    every.to_csv(root / "summary-all-checkpoints.csv", index=False)
    new = summarise(scores[~scores["seen_start"]]).sort_values(["design", "budget"], kind="stable")
    new.to_csv(root / "summary-new-runs.csv", index=False)
    command = ("OMP_NUM_THREADS=1 python benchmarks/forecast_bench.py --out " + str(root)
               + ("" if args.designs == ["smollm2-news"] else " --designs " + " ".join(args.designs)))
    records = [record_doc(summary, d, command) for d in dict.fromkeys(scores["design"])]
    (root / "record.json").write_text(json.dumps({"records": records}, indent=1))
    if args.install:
        install(records)
    fresh = scores[~scores["seen_start"]]
    text = [f"## final checkpoint (step {TARGET_STEPS}), every pilot x target", markdown(summary, scores), "",
            "## new runs only (the pilot did not run the target's first steps)", markdown(new, fresh), "",
            f"## every target checkpoint ({', '.join(map(str, TARGET_CHECKPOINTS[1:]))})",
            markdown(every, scores.iloc[:0])]
    (root / "tables.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
