"""The report's "Guardrails lost" section: refusals of harmful requests against training step and against
forgetting, with the refusal law `forgetscale fit` wrote (laws.json "guardrails", laws/studies/guardrails.py),
and agreement with the base on multiple choice beside it, so a reader sees whether the model loses its
refusals faster or slower than its other behaviour. Shown only when the safety suite was evaluated on
tuned checkpoints.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from forgetscale.evals.labels import run_labels
from forgetscale.laws.studies import guardrails
from forgetscale.report.sections import ReportContext, register_section, table
from forgetscale.store import Store


def _curves(ctx: ReportContext, suite: str, metric: str, protocol: str | None) -> pd.DataFrame:
    """One row per evaluated tuned checkpoint of `metric`, with its run's rank, label and forgetting KL."""
    with Store(ctx.run_dir, create=False) as store:
        summaries, labels = store.eval_summaries(suite), run_labels(store)
    rows = [s for s in summaries if s["metric"] == metric and s["model_key"] != "base" and s["n"]
            and (protocol is None or s["protocol"] == protocol)]
    if not rows:
        return pd.DataFrame()
    out = pd.DataFrame(rows)[["run_id", "step", "protocol", "k", "n", "value", "lo", "hi"]]
    meta = ctx.frame[["run_id", "step", "rank", "forget_kl", "ft_loss"]]
    out = out.merge(meta, on=["run_id", "step"], how="left")
    out["label"] = [labels.get(r, r) for r in out["run_id"]]
    return out.sort_values(["rank", "label", "step"], na_position="last")


def _base(ctx: ReportContext, suite: str, metric: str, protocol: str | None) -> dict[str, Any] | None:
    with Store(ctx.run_dir, create=False) as store:
        rows = store.eval_summaries(suite)
    return next((s for s in rows if s["model_key"] == "base" and s["metric"] == metric
                 and (protocol is None or s["protocol"] == protocol)), None)


def _against_step(ax: Any, rows: pd.DataFrame, base: dict[str, Any] | None, ylabel: str, title: str) -> None:
    """One line per run (colour by rank), its 95% Wilson band shaded; the base's rate dashed."""
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("viridis")
    runs = list(dict.fromkeys(rows["label"]))
    for i, label in enumerate(runs):
        run = rows[rows["label"] == label].sort_values("step")
        colour = colours(i / max(1, len(runs) - 1))
        ax.plot(run["step"], 100 * run["value"], "o-", color=colour, ms=4, label=label)
        ax.fill_between(run["step"], 100 * run["lo"], 100 * run["hi"], color=colour, alpha=0.15, lw=0)
    if base is not None and base["value"] is not None:
        ax.axhline(100 * base["value"], color="k", ls="--", lw=1, label="base")
    if (rows["step"] > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _against_x(ax: Any, rows: pd.DataFrame, block: dict[str, Any] | None, x: str) -> None:
    """Refusal against x with Wilson error bars; each group's fitted logistic in x (and its band) on top."""
    import matplotlib.pyplot as plt

    xs = rows[x].to_numpy(float)
    colours = plt.get_cmap("viridis")
    runs = list(dict.fromkeys(rows["label"]))
    for i, label in enumerate(runs):  # the same colour per run as in the panel against step
        run = rows[rows["label"] == label]
        err = [100 * (run["value"] - run["lo"]), 100 * (run["hi"] - run["value"])]
        ax.errorbar(run[x], 100 * run["value"], yerr=err, fmt="o", color=colours(i / max(1, len(runs) - 1)), ms=4,
                    capsize=2, alpha=0.8)
    for g in (block or {}).get("groups", []):
        c = g["candidates"].get(x, {})
        if "params" not in c:
            continue
        finite = xs[np.isfinite(xs)]
        grid = np.linspace(min(finite.min(), 0.0 if x == "forget_kl" else finite.min()), finite.max(), 100)
        rate, lo, hi = guardrails.predict(c, grid)
        chosen = " (chosen)" if g.get("x") == x else ""
        ax.plot(grid, 100 * rate, "-", color="tab:red", lw=1.5, label=f"{g['label']}: fit{chosen}")
        if np.isfinite(lo).all():
            ax.fill_between(grid, 100 * lo, 100 * hi, color="tab:red", alpha=0.15, lw=0)
    ax.set_xlabel({"forget_kl": "forgetting KL(p_base || p_tuned) [nats/token]",
                   "ft_loss": "held-out fine-tuning loss L_ft [nats/token]"}[x])
    ax.set_ylabel("refusal rate [%]")
    ax.set_ylim(-2, 102)
    ax.set_title(f"refusal against {guardrails.CANDIDATES[x]}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no fit, no legend (not an empty box)
        ax.legend(fontsize=7, loc="best")


@register_section("guardrails", "Guardrails lost", 59)
def guardrails_section(ctx: ReportContext) -> str | None:
    """Refusal vs step per rank, refusal vs KL with the law, choice agreement vs step beside it."""
    import matplotlib.pyplot as plt

    refusal = _curves(ctx, guardrails.SUITE, guardrails.METRIC, guardrails.PROTOCOL)
    if refusal.empty:
        return None
    block = ctx.laws.get("guardrails")
    parts = []
    base = _base(ctx, guardrails.SUITE, guardrails.METRIC, guardrails.PROTOCOL)
    agreement = _curves(ctx, "choice", "agreement_with_base", None)
    panels = 2 if agreement.empty else 3
    fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels, 3.8), squeeze=False)
    _against_step(axes[0][0], refusal, base, "refusal rate [%]", "refusals of harmful requests")
    measured = refusal[np.isfinite(refusal["forget_kl"].to_numpy(float))]
    _against_x(axes[0][1], measured, block, "forget_kl")
    if not agreement.empty:
        protocol = sorted(agreement["protocol"].unique())[0]  # one protocol keeps the panel readable
        _against_step(axes[0][2], agreement[agreement["protocol"] == protocol], None,
                      "agreement with base [%]", f"multiple choice ({protocol}): same answer as the base")
    fig.tight_layout()
    parts.append(ctx.figure("guardrails", fig, "refusal rate against step and against forgetting KL; choice "
                                               "agreement with the base against step"))
    chosen = [g for g in (block or {}).get("groups", []) if g.get("x") == "ft_loss"]
    if chosen:  # the law picked L_ft somewhere: show that fit too
        fig, ax = plt.subplots(figsize=(5.0, 3.8))
        _against_x(ax, refusal[np.isfinite(refusal["ft_loss"].to_numpy(float))], block, "ft_loss")
        fig.tight_layout()
        parts.append(ctx.figure("guardrails_ft", fig, "refusal rate against the fine-tuning loss, with the fit"))
    parts.append("<p class='cap'>Left: each evaluated checkpoint's refusal rate on the harmful requests with its "
                 "95% Wilson band, one line per run; dashed: the base model. Middle: the same rates against the "
                 "checkpoint's forgetting KL, with the fitted law "
                 f"{html.escape(guardrails.FORM)} (shaded: 2.5-97.5 percentiles of refits on runs resampled)."
                 + (" Right: agreement with the base model's answers on the multiple-choice items." if panels == 3
                    else "") + "</p>")
    if block is None:
        parts.append(f"<p class='warn'>laws.json has no refusal law: run <code>forgetscale fit "
                     f"{html.escape(str(ctx.run_dir))}</code> after <code>forgetscale eval</code>.</p>")
    else:
        with Store(ctx.run_dir, create=False) as store:
            now = guardrails.fingerprint(store.eval_summaries(guardrails.SUITE))
        if block.get("summaries_fingerprint") != now:
            parts.append(f"<p class='warn'>The safety results changed since laws.json was written: re-run "
                         f"<code>forgetscale fit {html.escape(str(ctx.run_dir))}</code> for the law below.</p>")
        parts.append(table(guardrails.TABLE_HEADER, guardrails.table_rows(block)))
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in guardrails.summary_lines(block))
                     + "</ul>")
        parts.append(f"<p class='cap'>x is chosen by {html.escape(guardrails.CHOICE_RULE)}. Log loss: binomial "
                     "negative log-likelihood per prompt (nats); held-out |error|: mean absolute difference between "
                     "predicted and observed refusal rate on the held-out checkpoints.</p>")
    return "".join(parts)
