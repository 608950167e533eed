"""Which forgetting number to log (issue 31): three candidates on every saved checkpoint of existing sweeps,
their noise and how well each ranks capability loss.

    python benchmarks/metric_choice.py runs/methods runs/mitigations --out /tmp/metric-choice.json

For every (run, step) whose weights a sweep kept (RUN_DIR/runs/<id>/adapter-step<N>/), on the sweep's own
forgetting set and held-out fine-tuning data:
- forget_kl: KL(p_base || p_tuned) on general text (the paper's metric; forgetscale's stored number);
- delta_ce:  PEFT-benchmark style, data cross-entropy of the tuned model on the same general text minus the
             base's (the text's own next tokens, not the base's predictions), paired block by block;
- ft_kl:     KL(p_base || p_tuned) on held-out fine-tuning tokens (RL's Razor's predictor).
Noise: the block standard error of each at each checkpoint (relative to its value), and the seed-to-seed
spread (coefficient of variation over runs equal but for the seed, same step). Prediction: Spearman rank
correlation of each with capability loss over checkpoints (1 - choice agreement with the base, loglik
protocol; and the drop in refusal rate where `safety` was evaluated), 95% bootstrap interval over checkpoints.
Capability numbers come from the store (`forgetscale eval RUN_DIR --suite choice,safety --steps checkpoints`);
checkpoints without them count for noise only.

`collect` needs the models; `compare` is pure and is what tests/test_metric_choice.py checks on a planted table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

METRICS = ("forget_kl", "delta_ce", "ft_kl")
CAPABILITY = {"choice_loss": ("choice", "loglik", "agreement_with_base"), "refusal_loss": ("safety", "greedy",
                                                                                        "refusal_rate")}


def _block_se(tokens: Any, counts: Any) -> tuple[float, float]:
    import torch

    from forgetscale.metric.meter import block_se

    index = torch.repeat_interleave(torch.arange(len(counts)), counts)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, index, tokens)
    return block_se(sums, counts)


def collect(run_dir: Path, threads: int = 1, exclude: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per saved (run, step): each metric's value and block SE, the run's cell and seed, and the
    capability losses stored for it (NaN where not evaluated). `exclude`: skip runs whose label contains one
    of these (e.g. derived runs identical to their control)."""
    import torch

    from forgetscale.config import SweepConfig
    from forgetscale.data import build_finetune_data, build_forgetting_blocks
    from forgetscale.data.blocks import IGNORE
    from forgetscale.evals.runner import select_checkpoints
    from forgetscale.metric.references import memory_reference
    from forgetscale.metric.sums import score
    from forgetscale.models import cache_root, load_configured_model, resolve_device
    from forgetscale.store import Store
    from forgetscale.weights import applied, saved_source

    torch.set_num_threads(threads)
    store = Store(run_dir, create=False)
    cfg = SweepConfig.model_validate(json.loads(store.get_meta("sweep_config")))
    device = resolve_device(cfg.train.device)
    base = load_configured_model(cfg, device)
    cache = cache_root(cfg.model.cache_dir) / "data"
    length = cfg.train.context_length
    forget = build_forgetting_blocks(cfg.forgetting, base.tokenizer, cfg.forgetting.block_length or length, cache)
    held = build_finetune_data(cfg.finetune, base.tokenizer, length, cache).heldout
    batch = cfg.train.eval_batch_size
    with torch.no_grad():
        ref_f = memory_reference(base.model, forget, batch, device, None)
        ref_h = memory_reference(base.model, held, batch, device, None)
        base_f = score(base.model, forget, batch, device, None, ref_f, per_token=True)["per_token"]["nll"]

    def counts(blocks: Any) -> Any:
        per = (blocks.labels[:, 1:] != IGNORE).sum(1)
        return per[per > 0]

    cf, ch = counts(forget), counts(held)
    runs = {r["run_id"]: r for r in store.runs()}
    caps = capability(store)
    targets, _notes = select_checkpoints(store, Path(run_dir), None, "checkpoints")
    rows = []
    for t in (t for t in targets if t.step > 0 and not any(x in t.label for x in exclude)):  # step 0: the base
        with torch.no_grad(), applied(base.model, saved_source(t.adapter, t.step)) as (model, _):
            f = score(model, forget, batch, device, None, ref_f, per_token=True)["per_token"]
            h = score(model, held, batch, device, None, ref_h, per_token=True)["per_token"]
        run = runs[t.run_id]
        row = {"run_dir": str(run_dir), "run_id": t.run_id, "label": t.label, "step": t.step, "seed": run["seed"],
               "cell": f"{run['method']}/r{run['rank']}/{run['mitigation']}/{_arm_value(run)}"}
        for name, tokens, c in (("forget_kl", f["kl"], cf), ("delta_ce", f["nll"] - base_f, cf), ("ft_kl", h["kl"], ch)):
            row[name], row[f"{name}_se"] = _block_se(tokens, c)
        row.update(caps.get((t.run_id, t.step), {}))
        rows.append(row)
        print(f"{t.label}@{t.step}: " + ", ".join(f"{m} {row[m]:.5f}" for m in METRICS), file=sys.stderr)
    store.close()
    return pd.DataFrame(rows)


def _arm_value(run: dict[str, Any]) -> str:
    arm = json.loads(run["config"]).get("mitigation") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(arm.items()) if k not in ("name", "source_run"))


def capability(store: Any) -> dict[tuple[str, int], dict[str, float]]:
    """(run_id, step) -> capability losses from stored eval summaries (refusal loss: base rate - model rate)."""
    out: dict[tuple[str, int], dict[str, float]] = {}
    for column, (suite, protocol, metric) in CAPABILITY.items():
        rows = [r for r in store.eval_summaries(suite) if r["protocol"] == protocol and r["metric"] == metric]
        base = next((r["value"] for r in rows if r["run_id"] is None), None)
        for r in rows:
            if r["run_id"] is None or r["value"] is None:
                continue
            if column == "choice_loss":
                value = 1.0 - r["value"]
            elif base is not None:
                value = base - r["value"]
            else:
                continue
            out.setdefault((r["run_id"], int(r["step"])), {})[column] = float(value)
    return out


def refreshed(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with its capability columns read again from each run dir's store."""
    from forgetscale.store import Store

    table = table.copy()
    for run_dir, rows in table.groupby("run_dir"):
        with Store(Path(run_dir), create=False) as store:
            caps = capability(store)
        for column in CAPABILITY:
            table.loc[rows.index, column] = [caps.get((r, int(s)), {}).get(column, math.nan)
                                             for r, s in zip(rows["run_id"], rows["step"], strict=True)]
    return table


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy import stats

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def compare(table: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per metric: median relative block SE, median seed CV, Spearman with each capability loss [95% bootstrap]."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        values, se = table[m].to_numpy(float), table[f"{m}_se"].to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(se / values)
        entry: dict[str, Any] = {"checkpoints": int(np.isfinite(values).sum()),
                                 "block_rel_se": float(np.nanmedian(rel)) if np.isfinite(rel).any() else math.nan}
        cvs = []
        for _, g in table.groupby(["run_dir", "cell", "step"]):
            v = g[m].to_numpy(float)
            if len(v) >= 2 and g["seed"].nunique() == len(g) and abs(v.mean()) > 0:
                cvs.append(float(v.std(ddof=1) / abs(v.mean())))
        entry["seed_cv"] = float(np.median(cvs)) if cvs else math.nan
        entry["seed_groups"] = len(cvs)
        for cap in CAPABILITY:
            if cap not in table:
                entry[cap] = {"rho": math.nan, "ci": [math.nan, math.nan], "n": 0}
                continue
            sub = table[np.isfinite(table[m].to_numpy(float)) & np.isfinite(table[cap].to_numpy(float))]
            x, y = sub[m].to_numpy(float), sub[cap].to_numpy(float)
            rho = spearman(x, y)
            draws = []
            for _ in range(n_bootstrap if len(x) >= 3 else 0):
                i = rng.integers(0, len(x), len(x))
                r = spearman(x[i], y[i])
                if math.isfinite(r):
                    draws.append(r)
            ci = [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))] if draws else [math.nan] * 2
            entry[cap] = {"rho": rho, "ci": ci, "n": int(len(x))}
        out[m] = entry
    return out


def markdown(result: dict[str, dict[str, Any]]) -> str:
    def rho(e: dict[str, Any]) -> str:
        return "-" if not math.isfinite(e["rho"]) else f"{e['rho']:.2f} [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}] (n {e['n']})"

    lines = ["| metric | checkpoints | block SE / value (median) | seed CV (median, groups) | Spearman with choice "
             "loss [95%] | Spearman with refusal loss [95%] |", "|---|---:|---:|---:|---|---|"]
    for m, e in result.items():
        lines.append(f"| `{m}` | {e['checkpoints']} | {e['block_rel_se']:.3f} | {e['seed_cv']:.3f} ({e['seed_groups']}) "
                     f"| {rho(e['choice_loss'])} | {rho(e['refusal_loss'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="JSON: the per-checkpoint table and the comparison")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                        help="reuse the checkpoints of an earlier --out (no model loaded); capability losses are "
                             "read again from the run dirs' stores (after a later `forgetscale eval`)")
    parser.add_argument("--exclude", action="append", default=[], metavar="TEXT",
                        help="skip runs whose label contains TEXT (repeatable)")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        table = refreshed(pd.DataFrame(json.loads(args.from_json.read_text())["checkpoints"]))
    else:
        table = pd.concat([collect(d, args.threads, tuple(args.exclude)) for d in args.run_dirs], ignore_index=True)
    result = compare(table, args.bootstrap)
    print(markdown(result))
    if args.out:
        args.out.write_text(json.dumps({"checkpoints": table.to_dict("records"), "comparison": result}, indent=1,
                                       default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
