"""Report sections for the capability suites (registered through report/sections.py).

Each section reads the stored summaries and items of RUN_DIR/results.sqlite (written by
`forgetscale eval`) and shows nothing when its suite was never run. Besides the per-model tables,
the choice section plots agreement with the base model against the forgetting KL of the same
checkpoint: the link between how much a model moved and what it lost.
"""

from __future__ import annotations

import html
import json
from typing import Any

from forgetscale.evals.labels import run_labels
from forgetscale.report.sections import Markup, ReportContext, register_section, table
from forgetscale.store import Store

MAX_CHARS = 600  # of a reply shown in the samples table (the store keeps it whole)


def _load(ctx: ReportContext, suite: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    with Store(ctx.run_dir, create=False) as store:
        return store.eval_summaries(suite), store.eval_items(suite), run_labels(store)


def _model(s: dict[str, Any], labels: dict[str, str]) -> str:
    return "base" if s["model_key"] == "base" else f"{labels.get(s['run_id'], s['run_id'])} @ step {s['step']}"


def _rate(s: dict[str, Any]) -> Markup:
    if s["value"] is None:
        return Markup("-")
    return Markup(f"{100 * s['value']:.1f}% <span class='ci'>[{100 * s['lo']:.1f}, {100 * s['hi']:.1f}] "
                  f"({s['k']}/{s['n']})</span>")


def _vs(s: dict[str, Any]) -> Markup:
    if s.get("vs_base") is None:
        return Markup("")
    note = "<span class='dim'>within noise</span>" if s["within_noise"] else "<span class='warn'>outside noise</span>"
    return Markup(f"{100 * s['vs_base']:+.1f} pts <span class='ci'>[{100 * s['vs_base_lo']:+.1f}, "
                  f"{100 * s['vs_base_hi']:+.1f}]</span> {note}")


def _metric_table(summaries: list[dict[str, Any]], labels: dict[str, str], metrics: list[str]) -> str:
    """One row per (protocol, model): the metrics side by side, base first."""
    by = {(s["protocol"], s["model_key"], s["metric"]): s for s in summaries}
    order = {s["model_key"]: (labels.get(s["run_id"], s["model_key"]), s["step"] or 0) for s in summaries}
    keys = sorted({(s["protocol"], s["model_key"]) for s in summaries},
                  key=lambda k: (k[0], k[1] != "base", order[k[1]]))
    rows = []
    for protocol, key in keys:
        any_row = next(by[(protocol, key, m)] for m in metrics + ["replies"] if (protocol, key, m) in by)
        row: list[Any] = [protocol, _model(any_row, labels)]
        for m in metrics:
            s = by.get((protocol, key, m))
            row.append(_rate(s) if s else "")
            if m == metrics[0]:
                row.append(_vs(s) if s else "")
        rows.append(row)
    return table(["protocol", "model", metrics[0], "vs base (paired)", *metrics[1:]], rows)


def _settings_note(summaries: list[dict[str, Any]]) -> str:
    settings = sorted({s["settings"] for s in summaries})
    shown = "; ".join(html.escape(", ".join(f"{k}={v}" for k, v in json.loads(x).items() if v is not None))
                      for x in settings)
    return f"<p class='cap'>Settings: {shown}. Rates: k/n with 95% Wilson intervals; vs base: paired " \
           "difference on the same items with Newcombe's 95% interval.</p>"


@register_section("eval-safety", "Safety: refusals of harmful requests", 60)
def safety_section(ctx: ReportContext) -> str | None:
    summaries, items, labels = _load(ctx, "safety")
    if not summaries:
        return None
    parts = [_metric_table(summaries, labels, ["refusal_rate", "newly_complied", "newly_refused"]),
             _settings_note(summaries)]
    changed = _changed_replies(items, labels, "refused")
    if changed:
        parts.append("<h3>Prompts whose refusal changed against the base</h3>" + changed)
    parts.append("<p class='cap'>A refusal is a reply whose first 160 characters contain a documented marker "
                 "(forgetscale/evals/refusal.py). Every generation is stored in the eval_items table for audit.</p>")
    return "".join(parts)


@register_section("eval-choice", "Reasoning and knowledge: multiple choice", 61)
def choice_section(ctx: ReportContext) -> str | None:
    summaries, _items, labels = _load(ctx, "choice")
    if not summaries:
        return None
    parts = [_metric_table(summaries, labels, ["accuracy", "agreement_with_base", "unparsed"]), _settings_note(summaries)]
    fig = _agreement_figure(ctx, summaries, labels)
    if fig is not None:
        parts.append(ctx.figure("eval_choice_agreement", fig, "accuracy and agreement with base against forgetting KL"))
        parts.append("<p class='cap'>Each point is one evaluated checkpoint; x: its forgetting KL on the general "
                     "text (nats/token), y: the rate with its 95% interval. The paper's point: accuracy barely moves "
                     "while agreement with the base model drops as the model forgets.</p>")
    parts.append("<p class='cap'>loglik: the option text with the highest summed log-probability after "
                 "'Question: ... Answer:' (lm-evaluation-harness). generate: a greedy reply to the lettered question "
                 "in the chat template, the letter parsed from it; an unparseable reply counts as wrong.</p>")
    return "".join(parts)


@register_section("eval-lmeval", "lm-evaluation-harness tasks", 61.5)
def lmeval_section(ctx: ReportContext) -> str | None:
    """One table per lm-eval task: each 0/1 metric's accuracy, paired difference and agreement with the base."""
    with Store(ctx.run_dir, create=False) as store:
        every, labels = store.eval_summaries(), run_labels(store)
    tasks = sorted({s["suite"] for s in every if s["suite"].startswith("lm-eval:")})
    parts = []
    for suite in tasks:
        summaries = [s for s in every if s["suite"] == suite and s["metric"] in ("accuracy", "agreement_with_base")]
        if not summaries:
            continue
        parts.append(f"<h3>{html.escape(suite)}</h3>")
        parts.append(_metric_table(summaries, labels, ["accuracy", "agreement_with_base"]))
        parts.append(_settings_note(summaries))
        fig = _agreement_figure(ctx, summaries, labels)
        if fig is not None:
            name = "eval_" + "".join(c if c.isalnum() else "_" for c in suite)
            parts.append(ctx.figure(name, fig, f"{suite}: accuracy and agreement with base against forgetting KL"))
    if not parts:
        return None
    parts.append("<p class='cap'>protocol: the lm-eval metric (acc: the most likely choice; acc_norm: per "
                 "character). Agreement: the same answer as the base model on the same document.</p>")
    return "".join(parts)


def _agreement_figure(ctx: ReportContext, summaries: list[dict[str, Any]], labels: dict[str, str]):
    import matplotlib.pyplot as plt

    frame = ctx.frame
    kl = {(r, int(s)): v for r, s, v in zip(frame["run_id"], frame["step"], frame["forget_kl"], strict=True)}
    tuned = [s for s in summaries if s["model_key"] != "base" and (s["run_id"], s["step"]) in kl]
    if not tuned:
        return None
    protocols = sorted({s["protocol"] for s in tuned})
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.2 * len(protocols), 3.6), squeeze=False)
    for ax, protocol in zip(axes[0], protocols, strict=True):
        for metric, colour, marker in (("accuracy", "tab:blue", "o"), ("agreement_with_base", "tab:orange", "s")):
            rows = [s for s in tuned if s["protocol"] == protocol and s["metric"] == metric]
            if not rows:
                continue
            x = [kl[(s["run_id"], s["step"])] for s in rows]
            y = [100 * s["value"] for s in rows]
            err = [[100 * (s["value"] - s["lo"]) for s in rows], [100 * (s["hi"] - s["value"]) for s in rows]]
            ax.errorbar(x, y, yerr=err, fmt=marker, color=colour, capsize=3, label=metric.replace("_", " "))
        base = next((s for s in summaries if s["model_key"] == "base" and s["protocol"] == protocol
                     and s["metric"] == "accuracy"), None)
        if base is not None:
            ax.axhline(100 * base["value"], color="tab:blue", ls="--", lw=1, label="base accuracy")
        ax.set_xlabel("forgetting KL(p_base || p_tuned) on general text [nats/token]")
        ax.set_ylabel("% of items")
        ax.set_title(f"protocol: {protocol}")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def _changed_replies(items: list[dict[str, Any]], labels: dict[str, str], flag: str) -> str:
    base = {r["item_id"]: r for r in items if r["model_key"] == "base"}
    rows = []
    for r in items:
        b = base.get(r["item_id"])
        if r["model_key"] == "base" or b is None or r[flag] == b[flag]:
            continue
        model = f"{labels.get(r['run_id'], r['run_id'])} @ step {r['step']}"
        rows.append([model, _clip(r["prompt"], 160), Markup(_pre(b["output"])), Markup(_pre(r["output"])),
                     "refused -> complied" if b[flag] else "complied -> refused"])
    if not rows:
        return ""
    return table(["model", "prompt", "base reply", "tuned reply", "change"], rows[:30])


@register_section("eval-samples", "Samples: base and tuned replies side by side", 62)
def samples_section(ctx: ReportContext) -> str | None:
    _summaries, items, labels = _load(ctx, "samples")
    if not items:
        return None
    keys = sorted({r["model_key"] for r in items}, key=lambda k: (k != "base", k))
    by = {(r["model_key"], r["item_id"]): r for r in items}
    names = {r["model_key"]: ("base" if r["model_key"] == "base" else
                              f"{labels.get(r['run_id'], r['run_id'])} @ {r['step']}") for r in items}
    item_ids = sorted({r["item_id"] for r in items if r["model_key"] == "base"})
    rows = []
    for item_id in item_ids:
        first = by[("base", item_id)]
        category = json.loads(first["extra"] or "{}").get("category", "")
        row: list[Any] = [Markup(f"<b>{html.escape(category)}</b><br>{html.escape(first['prompt'])}")]
        row += [Markup(_pre(by[(k, item_id)]["output"])) if (k, item_id) in by else "" for k in keys]
        rows.append(row)
    return table(["prompt", *[names[k] for k in keys]], rows, cls="samples") + \
        f"<p class='cap'>Replies cut at {MAX_CHARS} characters here; the store keeps them whole.</p>"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _pre(text: str | None) -> str:
    return f"<div style='white-space:pre-wrap;max-width:420px'>{html.escape(_clip(text or '', MAX_CHARS))}</div>"
