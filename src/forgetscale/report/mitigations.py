"""The mitigation comparison in the report: a section (registered like any other, see report/sections.py)
and the text rows that `forgetscale fit`'s tables (cli/tables.py) share. Both read laws.json's
'mitigation' block (laws/studies/mitigation.py) and never fit; the figure plots the stored rows and
draws the stored lines."""

from __future__ import annotations

import html
import math
import re
from typing import Any

import numpy as np

from forgetscale.formatting import ci_suffix, fixed, missing, pct, signed
from forgetscale.report.sections import Markup, ReportContext, register_section, table

HEADER = ["arm", "seeds", "matched L_ft (depth)", "KL control", "KL arm", "KL reduction [95%]", "L_f arm - control [95%]",
          "line gap at L* [95%]", "verdict", "train time x control"]


def _pct(x: Any) -> str:
    return pct(x, 0)


def _signed3(x: Any) -> str:
    return signed(x, 3)


def rows(cell: dict[str, Any]) -> list[list[str]]:
    """The matched-loss table of one cell, as text (control first)."""
    control = cell["control"]
    out = [["none (control)", ",".join(map(str, control["seeds"])), "", "", "", "", "", "", "", "1.00"]]
    for a in cell["arms"]:
        cost = a["cost"]
        cost_text = fixed(cost["ratio"], 2) + (" (reuses control)" if cost.get("note") else "")
        if "matched" not in a:
            out.append([a["arm"], ",".join(map(str, a["seeds"])), "", "", "", "", "", "", a.get("status", ""), cost_text])
            continue
        p = a["matched"][-1]
        gap = a["gap"]["f"]
        out.append([
            a["arm"], ",".join(map(str, a["paired_seeds"])), f"{fixed(p['ft'])} ({_pct(a['depth'])})", fixed(p["kl_none"]),
            fixed(p["kl_arm"]), _pct(p["reduction"]) + ci_suffix(*p["reduction_ci"], _pct),
            signed(p["f_diff"]) + ci_suffix(*p["f_diff_ci"], signed) if not missing(p["f_diff"]) else "-",
            signed(gap["value"]) + ci_suffix(*gap["ci"], signed) if not missing(gap["value"]) else "-",
            a["verdict"] if a["status"] == "compared" else f"{a['verdict']} ({a['status']})", cost_text,
        ])
    return out

def line_rows(cell: dict[str, Any]) -> list[list[str]]:
    """Eq. 4 per arm: slope and intercept with their intervals (L_f = forget_ce)."""
    out = []
    for name, line in [("none (control)", cell["control"]["line"]["f"]), *((a["arm"], a["line"]["f"]) for a in cell["arms"])]:
        if "slope" not in line:
            out.append([name, "", "", "", line["status"]])
            continue
        out.append([name, f"{line['slope']:.3f}" + ci_suffix(*line["slope_ci"], _signed3), f"{line['intercept']:.3f}"
                    + ci_suffix(*line["intercept_ci"], _signed3), fixed(line["r2"], 3), line["status"]])
    return out

def figure(frame: Any, cell: dict[str, Any]) -> Any:
    """KL and L_f against held-out L_ft for every arm of a cell, with each arm's fitted Eq. 4 line."""
    import matplotlib.pyplot as plt

    from forgetscale.report import figures  # noqa: F401  (Agg backend and the report's style)

    arms = ["none", *(a["arm"] for a in cell["arms"])]
    colours = {arm: ("black" if arm == "none" else plt.get_cmap("tab10")(i % 10)) for i, arm in enumerate(arms)}
    lines = {"none": cell["control"]["line"], **{a["arm"]: a["line"] for a in cell["arms"]}}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    for ax, (col, key, ylabel) in zip(axes, (("forget_kl", "kl", "forgetting KL(base $\\|$ tuned) (nats/token)"),
                                             ("forget_ce", "f", "forgetting $L_f$ (CE vs base, nats/token)")), strict=True):
        for arm in arms:
            sub = frame[frame["mitigation"] == arm]
            for _, run in sub.groupby("run_id"):
                run = run.sort_values("step")
                style = {"ls": "none", "marker": "D"} if float(run["wall_s"].max()) == 0.0 else {"ls": "-", "marker": "o"}
                ax.plot(run["ft_loss"], run[col], color=colours[arm], lw=0.8, ms=3.5, alpha=0.6, **style)
            line = lines[arm].get(key, {})
            fitted = sub[sub["step"] >= line.get("min_step", 1)]  # the line over the rows it was fitted on
            if "slope" in line and len(fitted):
                x = np.linspace(fitted["ft_loss"].min(), fitted["ft_loss"].max(), 50)
                ax.plot(x, line["slope"] * x + line["intercept"], color=colours[arm], lw=2.2,
                        label=f"{arm}: slope {line['slope']:.2f}")
            elif len(sub):  # no line: still name the arm
                ax.plot([], [], color=colours[arm], lw=2.2, label=f"{arm}: no line fitted")
        ax.set_xlabel("held-out fine-tuning loss $L_{ft}$ (nats/token)")
        ax.set_ylabel(ylabel)
        ax.invert_xaxis()
    axes[0].set_title("KL against L_ft (training runs right to left)")
    axes[1].set_title("Eq. 4 line per arm")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(labels) / 5), 1, 1))
    return fig

@register_section("mitigation", "Mitigation: does an arm move the trade-off line?", 25)
def section(ctx: ReportContext) -> str | None:
    cells = ctx.laws.get("mitigation")
    if not cells:
        return None
    from forgetscale.laws.estimators.groups import GROUP, add_groups
    from forgetscale.laws.studies.mitigation import summary_lines

    frame = add_groups(ctx.frame)
    parts = []
    for cell in cells:
        rows_ = frame[(frame["dataset"] == cell["dataset"]) & (frame[GROUP] == cell["variant"])]
        if cell["rank"] is not None:
            rows_ = rows_[rows_["rank"] == cell["rank"]]
        slug = re.sub(r"[^A-Za-z0-9]+", "-", cell["label"]).strip("-").lower()
        parts.append(f"<h3>{html.escape(cell['label'])}</h3>")
        parts.append(ctx.figure(f"{slug}_mitigation", figure(rows_, cell), "forgetting against L_ft per arm"))
        parts.append(table(HEADER, rows(cell)))
        parts.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in summary_lines(cell)) + "</ul>")
        min_step = cell["control"]["line"]["f"].get("min_step")
        steps = f"steps &ge; {min_step}" if min_step is not None else "steps &ge; the fit's minimum step"
        parts.append(f"<p>Eq. 4 fitted per arm (L_f = forget_ce, {steps}; <code>forgetscale fit --min-step</code> "
                     "changes it, the matched-loss numbers above do not depend on it):</p>"
                     + table(["arm", "slope [95%]", "intercept [95%]", "R²", "status"], line_rows(cell)))
    parts.append(Markup(
        "<p class='cap'>Matched L_ft: the lowest held-out fine-tuning loss that every run of the arm and of the "
        "control reaches (depth: its distance from the base as a share of the control's own gain); KL and L_f are "
        "interpolated along each run's trajectory (points that set a new lowest L_ft) and compared seed by seed. "
        "Reduction: 1 - KL_arm / KL_control, mean and t interval over paired seeds. Line gap: the arm's Eq. 4 line "
        "minus the control's at L*, 95% bootstrap interval over runs; an interval that excludes 0 means the arm "
        "moved the line, otherwise it slid along it. Train time: training wall time (evaluation excluded), mean over "
        "seeds, against the control, as timed while the runs ran (other jobs on the machine change it; "
        "benchmarks/bench_mitigations.py interleaves the arms' steps for a drift-free ratio); derived arms (scale, intruders) train nothing (diamonds: their curves at the last step, from the control run's weights). "
        "Lines in the figure: each run's checkpoints in step order.</p>"))
    return "".join(parts)
