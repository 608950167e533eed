"""The report's built-in sections: summary, the four figures, constants, the paper's constants,
rows used and the sweep's config. Each is one registered builder (see sections.py)."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import numpy as np
import pandas as pd

from forgetscale.formatting import bracket, missing, num, pct
from forgetscale.laws.estimators import forms
from forgetscale.laws.estimators.groups import GROUP, add_groups, non_default
from forgetscale.laws.estimators.select import group_label, group_rows
from forgetscale.laws.pipeline import lawfile
from forgetscale.laws.studies import crossmethod, paper
from forgetscale.report import figures
from forgetscale.report.sections import Markup, ReportContext, register_section, table

OUT = {"ft": "L_ft", "f": "L_f"}


def _slug(group: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", group["label"]).strip("-").lower()


def _fitted(group: dict[str, Any]) -> dict[str, Any]:
    return {k: d for k, d in group["laws"].items() if "params" in d}


def group_points(ctx: ReportContext, group: dict[str, Any]) -> pd.DataFrame:
    """The group's stored checkpoints (step > 0), marked with whether a fit used them / held them out."""
    options = ctx.laws["options"]
    frame = group_rows(ctx.frame, group["key"])
    frame = frame[frame["step"] > 0]
    fitted = _fitted(group)
    used, test = set(), set()
    for d in fitted.values():
        used |= {(r, int(s)) for r, steps in d.get("rows", {}).items() for s in steps}
        test |= {(r, int(s)) for r, s in d["heldout"].get("test") or []}
    keys = list(zip(frame["run_id"], frame["step"].astype(int), strict=True))
    return pd.DataFrame({
        "run_id": frame["run_id"].to_numpy(), "P": frame["trainable_params"].to_numpy(float),
        "N": frame["step"].to_numpy(float), "ft": frame[options["ft_column"]].to_numpy(float),
        "f": frame[options["target"]].to_numpy(float), "rank": frame["rank"].to_numpy(),
        "used": [k in used for k in keys], "test": [k in test for k in keys],
    }).dropna(subset=["ft", "f"])


def _groups(ctx: ReportContext):
    for group in ctx.laws["groups"]:
        laws = lawfile.fitted_laws(group)
        if laws:
            yield group, laws, group_points(ctx, group)


@register_section("summary", "Summary", 10)
def summary(ctx: ReportContext) -> str:
    o = ctx.laws["options"]
    parts = []
    if ctx.stale:
        parts.append(f'<p class="warn">results.sqlite changed since laws.json was written ({", ".join(ctx.stale)}); '
                     f"re-run <code>forgetscale fit {html.escape(str(ctx.run_dir))}</code>.</p>")
    parts.append(
        f"<p>Laws fitted {html.escape(ctx.laws.get('created_at', '?'))} by forgetscale "
        f"{html.escape(ctx.laws.get('forgetscale_version', '?'))}: L_f = <code>{o['target']}</code>, "
        f"L_ft = <code>{o['ft_column']}</code>, {o['n_bootstrap']} bootstrap resamples of whole runs "
        f"(seed {o['seed']}), log-space Huber loss (delta {o['huber_delta']:g}), c_ft fixed at {o['gauge_c_ft']:g} "
        "(gauge). Intervals are 2.5-97.5 percentiles over the resamples; a fit of fewer than 3 runs or 10 distinct "
        "resamples gives none. Held-out forecast: fit on the smaller ranks' earlier steps, errors on the largest "
        "rank's later steps, in nats and as a share of how far those runs moved from the base (KL rise for L_f, "
        "L_ft drop for L_ft); the share of the loss itself includes the base entropy and flatters.</p>")
    for group in ctx.laws["groups"]:
        if not _fitted(group):  # e.g. a method with one run: say why once, not law by law
            why = sorted({re.sub(r"^not fitted: law '\w+' ", "", d["status"]) for d in group["laws"].values()
                          if "needs law '" not in d["status"]})
            parts.append(f"<h3>{html.escape(group['label'])}</h3><p>No law fitted: "
                         f"{html.escape('; '.join(why))}."
                         + (" Its rows still enter the comparison across methods." if ctx.laws.get("cross_method")
                            else "") + "</p>")
            continue
        rows = []
        for d in group["laws"].values():
            if "params" not in d:
                rows.append([d["law"], "", "", "", d["status"]])
                continue
            for out in d["outputs"]:
                rows.append([d["law"], OUT[out], num(d["r2"].get(out)), d["status"]])
        parts.append(f"<h3>{html.escape(group['label'])}</h3>" + table(["law", "output", "R²", "status"], rows))
        check = group.get("forecast_check")
        if check:
            moved = {"ft": "L_ft drop", "f": "KL rise"}
            crows = [[r["form"], OUT[r["output"]], num(r["mae"]), f"{pct(r['rise'])} of {moved[r['output']]}",
                      pct(r["bias"]), pct(r["mare"]),
                      "not a forecast: uses the held-out runs' measured L_ft" if r["given_ft"] else ""]
                     for r in check["forms"]]
            parts.append(f"<p>Held-out forecast: {html.escape(check['description'])}.</p>" + table(
                ["form", "output", "mean |error| (nats)", "|error| / change", "signed / change", "|error| / value",
                 "note"], crows))
    return "".join(parts)


@register_section("tradeoff", "Forgetting against fine-tuning loss (paper Fig. 2)", 20)
def tradeoff(ctx: ReportContext) -> str:
    out = []
    for group, laws, pts in _groups(ctx):
        fig = figures.tradeoff(pts, laws, ctx.laws["options"]["target"])
        out.append(f"<h3>{html.escape(group['label'])}</h3>" + ctx.figure(f"{_slug(group)}_tradeoff", fig,
                                                                          "L_f against L_ft"))
    return "".join(out) + "<p class='cap'>Filled: checkpoints the fit used; hollow: earlier steps or unfinished " \
                          "runs. Line: Eq. 4 by least squares, band: 95% bootstrap interval of the line.</p>"


def _method_points(ctx: ReportContext, block: dict[str, Any]) -> pd.DataFrame:
    """Every checkpoint (step > 0) of one dataset's method groups, marked with whether the comparison used it."""
    o = ctx.laws["options"]
    frame = add_groups(ctx.frame)
    frame = frame[(frame["dataset"].astype(str) == block["dataset"])
                  & (frame["mitigation"].astype(str) == block["mitigation"]) & (frame["step"] > 0)]
    used = frame["step"] >= block.get("min_step", 1)
    if not o.get("include_unfinished"):
        used &= frame["status"] == "finished"
    return pd.DataFrame({
        "group": frame[GROUP].to_numpy(), "P": frame["trainable_params"].to_numpy(float),
        "N": frame["step"].to_numpy(float), "ft": frame[o["ft_column"]].to_numpy(float),
        "f": frame[o["target"]].to_numpy(float), "rank": frame["rank"].to_numpy(), "used": used.to_numpy(),
    }).dropna(subset=["ft", "f", "P"]).reset_index(drop=True)


def _err(e: dict[str, Any], key: str) -> Markup:
    lo, hi = e[f"{key}_ci"]
    ci = "" if missing(lo) or missing(hi) else f'<br><span class="ci">{bracket(lo, hi, pct)}</span>'
    return Markup(f"{pct(e[key])}{ci}")


def _methods_table(block: dict[str, Any]) -> str:
    rows = []
    for group, info in block["variants"].items():
        for i, r in enumerate(info["runs"]):
            changed = non_default(info["method"], info["settings"])
            rows.append([group if i == 0 else "", "" if i else json.dumps(changed, sort_keys=True) if changed else "defaults",
                         "-" if r["rank"] is None else r["rank"], f"{r['P']:,.0f}", r["step"], num(r.get("ft_loss")),
                         num(r.get("forget_ce")), num(r.get("forget_kl")), r["status"]])
    return table(["method", "settings (non-default)", "rank", "P (trainable)", "last step", "L_ft held-out", "L_f (CE)", "KL",
                  "status"], rows)


def _distance_table(block: dict[str, Any]) -> str:
    rows = []
    for group, info in block["variants"].items():
        ref = group == block["reference"]
        P = sorted({r["P"] for r in info["runs"]})
        p_text = Markup("<br>".join(f"{p:,.0f}" for p in P) + "".join(
            f'<br><span class="ci">{html.escape(o)}</span>' for o in info.get("outside", [])))
        if info.get("status") != "compared":
            rows.append([group, p_text, "", "", "", "", "", info.get("status", "")])
            continue
        for i, (law, e) in enumerate(info["errors"].items()):
            bias = {"under": "underestimates", "over": "overestimates"}.get(e["bias"], e["bias"].replace("unclear", ""))
            note = "in-sample (fitted on these rows)" if ref else (
                Markup(f'<span class="warn">{bias}</span>') if e["bias"] in ("under", "over") else bias)
            rows.append([f"{group} (reference)" if ref and i == 0 else (group if i == 0 else ""),
                         p_text if i == 0 else "", info["n_rows"] if i == 0 else "", law, _err(e, "signed"),
                         _err(e, "mean"), pct(e["max"]), note])
    return table(["method", "P", "rows", "law fitted on LoRA", "signed mean error", "mean |error|", "max |error|",
                  "bias (95% interval)"], rows, "consts")


def _heldout_tables(block: dict[str, Any]) -> str:
    out = []
    ho = block.get("heldout") or {}
    out.append(f"<p>{html.escape(ho.get('description', ''))}.</p>")
    if ho.get("by_variant"):
        rows = [[v if i == 0 else "", law, pct(r["own"].get(law)), pct(r["pooled"].get(law)), pct(r["lora"].get(law))]
                for v, r in ho["by_variant"].items() for i, law in enumerate(r["pooled"] or r["lora"])]
        out.append(table(["method", "law", "own fit", "pooled fit", "LoRA-only fit"], rows, "consts"))
    pooled = (block.get("pooled") or {}).get("laws") or {}
    if pooled:
        rows = [[d["law"], ", ".join(num(v) for v in d["r2"].values()) if "params" in d else "",
                 ", ".join(pct(v) for v in d["heldout_mare"].values()) if "params" in d else "", d["status"]]
                for d in pooled.values()]
        out.append(f"<p>{html.escape(block['pooled']['label'])}: every method fitted together as one group "
                   "(held-out error: its own largest-P split, see docs/laws.md).</p>"
                   + table(["law", "R²", "held-out error", "status"], rows))
    return "".join(out)


@register_section("methods", "Methods compared: do the LoRA laws hold for other methods? (paper appendix)", 25)
def methods(ctx: ReportContext) -> str | None:
    blocks = ctx.laws.get("cross_method") or []
    if not blocks:
        return None
    target = ctx.laws["options"]["target"]
    out = []
    for block in blocks:
        key = {"dataset": block["dataset"], "method": "lora", "mitigation": block["mitigation"]}
        slug = _slug({"label": " ".join(v for v in (block["dataset"], block["mitigation"]) if v not in ("none", "nan"))})
        out.append(f"<h3>{html.escape(block['dataset'])}</h3>" + _methods_table(block))
        out.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in crossmethod.verdict(block)) + "</ul>")
        if block.get("status") != "compared":
            continue
        ref = block["reference"]
        group = next((g for g in ctx.laws["groups"] if g["label"] == group_label({**key, "variant": ref})), None)
        laws = lawfile.fitted_laws(group) if group else {}
        pts = _method_points(ctx, block)
        fig = figures.methods_tradeoff(pts, ref, laws.get("linear"), target, ctx.laws["options"]["ft_column"])
        out.append(ctx.figure(f"{slug}_methods_tradeoff", fig, "every method against the LoRA linear law"))
        parity_fig = figures.methods_parity(pts, ref, laws, target)
        if parity_fig is not None:
            out.append(ctx.figure(f"{slug}_methods_parity", parity_fig, "LoRA power laws on every method"))
        out.append(f"<p>Reference: <b>{html.escape(ref)}</b>, its laws as fitted above; every other method's "
                   f"checkpoints at steps &ge; {block['min_step']} are predicted by them. Relative error = (predicted "
                   "&minus; observed) / observed L_f: a negative signed mean means the law <b>underestimates</b> "
                   "forgetting. Intervals: 2.5-97.5 percentiles over the LoRA laws' bootstrap refits (parameter "
                   "uncertainty of the LoRA fit, not the scatter of the other method's own points).</p>"
                   + _distance_table(block))
        out.append("<h4>Own, pooled or LoRA-only fit: which forecasts later steps best?</h4>" + _heldout_tables(block))
    return "".join(out)


@register_section("curves", "Losses against steps (paper Fig. 3)", 30)
def curves(ctx: ReportContext) -> str:
    out = []
    for group, laws, pts in _groups(ctx):
        out.append(f"<h3>{html.escape(group['label'])}</h3>" + ctx.figure(
            f"{_slug(group)}_curves", figures.curves(pts, laws, ctx.laws["options"]["target"]), "losses against N"))
    return "".join(out)


@register_section("parity", "Predicted against observed", 40)
def parity(ctx: ReportContext) -> str:
    out = []
    for group, laws, pts in _groups(ctx):
        out.append(f"<h3>{html.escape(group['label'])}</h3>" + ctx.figure(
            f"{_slug(group)}_parity", figures.parity(pts, laws), "parity plots"))
    return "".join(out) + "<p class='cap'>Dots: full fit on the rows it used. Red diamonds: the held-out rows " \
                          "(largest rank, later steps) as predicted by the fit that did not see them.</p>"


@register_section("extrapolation", "Extrapolation: forecasting the largest rank", 50)
def extrapolation(ctx: ReportContext) -> str:
    out = []
    for group, laws, pts in _groups(ctx):
        split = next((d["heldout"] for d in _fitted(group).values() if d["heldout"].get("n_cut")), None)
        if split is None:
            desc = next(iter(_fitted(group).values()))["heldout"]["description"]
            out.append(f"<h3>{html.escape(group['label'])}</h3><p>{html.escape(desc)}</p>")
            continue
        fig = figures.extrapolation(pts, laws, ctx.laws["options"]["target"], split["n_cut"], split["p_max"])
        out.append(f"<h3>{html.escape(group['label'])}</h3><p>{html.escape(split['description'])}</p>"
                   + ctx.figure(f"{_slug(group)}_extrapolation", fig, "extrapolation"))
    return "".join(out)


def _cell(d: dict[str, Any] | None, name: str) -> Markup | str:
    """'value [lo, hi]' for one constant of one law, marked when fixed, borrowed or not identified."""
    if d is None or name not in d["names"]:
        return ""
    value = num(d["params"][name])
    if name in d["borrowed"]:
        return Markup(f'<span class="dim">= {d["borrowed"][name]}</span>')
    if name not in d["free"]:
        return Markup(f'{value} <span class="dim">(gauge)</span>')
    lo, hi = d["ci"][name]
    ci = f'<br><span class="ci">{bracket(lo, hi)}</span>'
    if name in d["weak"]:
        return Markup(f'<span class="warn">{value}&thinsp;&dagger;</span>{ci}')
    return Markup(f"{value}{ci}")


PAPER_FORM = (("linear", "Eq. 4 linear"), ("power_ft", "Eq. 5 power_ft"), ("power_f", "Eq. 6 power_f"),
              ("power_joint", "Eq. 5+6 joint"))


@register_section("constants", "Fitted constants (95% intervals) beside the paper's", 60)
def constants(ctx: ReportContext) -> str:
    gauge = ctx.laws["options"]["gauge_c_ft"]
    out = []
    for group in ctx.laws["groups"]:
        fitted = _fitted(group)
        matched = paper.match_dataset(group["key"]["dataset"])
        datasets = [matched] if matched else list(paper.CONSTANTS)
        cols = [(k, t) for k, t in PAPER_FORM if k in fitted]
        header = ["constant", *(t for _, t in cols)]
        for d in datasets:
            header += [f"paper: {d}", f"paper: {d}, c_ft = {gauge:g}"]
        rows = []
        for name in forms.POWER_JOINT:
            row = [name, *(_cell(fitted[k], name) for k, _ in cols)]
            for d in datasets:
                row += [num(paper.CONSTANTS[d][name]), num(paper.in_gauge(d, gauge)[name])]
            rows.append(row)
        for out_key, label in (("ft", "R² of L_ft"), ("f", "R² of L_f")):
            row = [label, *(num(fitted[k]["r2"].get(out_key)) for k, _ in cols)]
            for d in datasets:
                row += [num(paper.POWER_F_R2[d]) + " (Eq. 6), " + num(paper.LINEAR_R2[d]) + " (Eq. 4)"
                        if out_key == "f" else "-", ""]
            rows.append(row)
        for out_key, label in (("ft", "held-out error L_ft"), ("f", "held-out error L_f")):
            rows.append([label, *(pct(fitted[k]["heldout_mare"].get(out_key)) for k, _ in cols)]
                        + ["", ""] * len(datasets))
        out.append(f"<h3>{html.escape(group['label'])}</h3>" + table(header, rows, "consts"))
        mult = [k for k in ("mult_ft", "mult_f") if k in fitted]
        if mult:
            rows = [[name, *(_cell(fitted[k], name) for k in mult)] for name in fitted[mult[0]]["names"]]
            rows.append(["R²", *(num(next(iter(fitted[k]["r2"].values()))) for k in mult)])
            rows.append(["held-out error", *(pct(next(iter(fitted[k]["heldout_mare"].values()))) for k in mult)])
            out.append("<p>Competing multiplicative form: L_ft = A P<sup>-alpha</sup> N<sup>-beta</sup> + E, "
                       "L_f = E - A P<sup>-alpha</sup> N<sup>-beta</sup>.</p>"
                       + table(["constant", *mult], rows, "consts"))
    return "".join(out) + (
        "<p class='cap'>Each cell: fitted value and its 95% bootstrap interval. &dagger; not identified: the "
        "interval spans more than 10x, the constant ran to its bound, or it lies on a flat direction of the loss; "
        "its value is one of many that fit equally well, so quote predictions (their intervals stay narrow), not "
        "it. '= law': taken from that law. c_ft is fixed (gauge): c_ft, a and b trade off exactly, so compare a "
        "and b with the paper's column written at the same c_ft; alpha, beta, rho, s_ft, c_f_ft and s_f_ft do not "
        "depend on the gauge. The paper's numbers are for Llama 2 7B chat with LoRA on all linear modules; they "
        "compare with ours only for the same model and data.</p>")


@register_section("rows", "Rows used", 80)
def rows_used(ctx: ReportContext) -> str:
    out = []
    for group in ctx.laws["groups"]:
        fitted = _fitted(group)
        if not fitted:
            continue
        d = fitted.get("linear") or next(iter(fitted.values()))
        runs = d.get("rows", {})
        excluded = ", ".join(f"{n} {why}" for why, n in d.get("excluded", {}).items()) or "none"
        steps = np.array([s for v in runs.values() for s in v])
        out.append(f"<h3>{html.escape(group['label'])}</h3><p>{d['n_rows']} checkpoints of {len(runs)} runs, "
                   f"steps {steps.min()}-{steps.max()} (minimum step {d['min_step']}); left out: "
                   f"{html.escape(excluded)}.</p>")
        out.append(table(["run", "steps used"],
                         [[r, f"{len(s)} steps: {s[0]}-{s[-1]}" if s else "-"] for r, s in sorted(runs.items())]))
    return "".join(out)


@register_section("config", "Sweep configuration", 90)
def config(ctx: ReportContext) -> str:
    cfg = ctx.config()
    text = json.dumps(cfg, indent=2, sort_keys=True) if cfg is not None else (ctx.sweep_config or "(not stored)")
    return f"<details open><summary>sweep_config</summary><pre>{html.escape(text)}</pre></details>"
