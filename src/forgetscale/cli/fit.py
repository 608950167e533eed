"""Fit the forgetting laws on a sweep's stored checkpoints and write RUN_DIR/laws.json.

Fits every law (the paper's Eq. 4, 5, 6 separately and jointly, and the multiplicative competing
form) per fine-tuning dataset and method, with log-space Huber least squares from a grid of starts,
95% intervals from a bootstrap over whole runs, R^2, and the error of forecasting the largest
rank's later checkpoints from the smaller ranks' earlier ones. Only finished runs are used unless
--include-unfinished is given; step 0 and steps below --min-step never are.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from forgetscale.formatting import bracket, ci_suffix, num, pct
from forgetscale.laws.fit import fit_run_dir
from forgetscale.laws.pipeline.fitall import FitOptions
from forgetscale.laws.studies import crossmethod, guardrails
from forgetscale.laws.studies.mitigation import summary_lines
from forgetscale.report import mitigations as arms_report

NAME = "fit"
HELP = "fit the forgetting laws on a sweep's checkpoints (writes RUN_DIR/laws.json)"
EPILOG = """examples:
  forgetscale fit runs/demo
  forgetscale fit runs/demo --target forget_kl          # fit the KL part of forgetting (no base entropy)
  forgetscale fit runs/demo --target forget_ce_hard     # fit the hard CE (the base's top token)
  forgetscale fit runs/demo --min-step 20 --bootstrap 200 --seed 1
  forgetscale fit runs/demo --laws linear,power_joint   # only these (and what they borrow from)

a sweep with several methods (or settings: LoRA on attention only is its own method, 'lora[attn]')
is fitted per method, then compared: the LoRA laws (all-linear LoRA, >= 2 ranks) predict every other
method's L_f (signed/mean/max relative error; negative signed = the law underestimates forgetting),
all methods are fitted pooled, and own vs pooled vs LoRA-only fits forecast each run's later steps.

reading the table: an interval is the 2.5-97.5 percentile over bootstrap refits on resampled runs;
fewer than 3 runs (or 10 distinct resamples) give no interval ('no intervals: ...' in the status).
The held-out forecast table scores every form on the largest rank's later steps, fitted on the rest:
read '|error| / change' (share of the KL rise), not the error relative to L_f, which includes the
base entropy; 'Eq. 4 given measured L_ft' is not a forecast (it needs the run's measured L_ft).
A status 'not identifiable: X' means the data do not pin X down (its interval spans >10x or it ran
to its bound): do not quote X, use the law's predictions (forgetscale predict), which stay usable.
c_ft is fixed (gauge): c_ft, a and b trade off exactly, so only their combination is fitted.

guardrails (when `forgetscale eval` stored safety refusals at tuned checkpoints): refusal = sigmoid(a + b x)
by binomial maximum likelihood, x = forgetting KL or L_ft, whichever forecasts held-out checkpoints better
(lower log loss); 'too few points' (< 3 evaluated checkpoints): no fit; < 3 runs: no intervals (docs/evals.md)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="sweep output folder (holds results.sqlite)")
    add_option_flags(parser)


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per FitOptions field that has one, read from its declaration (name, type, help, choices).

    Every flag defaults to None, so a flag left out keeps the declared default."""
    for f in dataclasses.fields(FitOptions):
        setting = f.metadata["setting"]
        if setting.flag is None:
            continue
        flag = setting.flag or "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": setting.help.replace("%", "%%")}
        if isinstance(f.default, bool):
            kw["action"] = "store_true"
        elif setting.choices:
            kw["choices"] = setting.choices
        else:
            kw.update(type=setting.parse or type(f.default), metavar=flag.removeprefix("--").replace("-", "_").upper())
        parser.add_argument(flag, **kw)


def options_from_args(args: argparse.Namespace) -> FitOptions:
    """FitOptions from flags; a flag left out keeps the default (never merged by truthiness)."""
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(FitOptions)}
    return FitOptions(**{k: v for k, v in given.items() if v is not None})


OUT_NAME = {"ft": "L_ft", "f": "L_f"}


def group_tables(group: dict[str, Any], target: str) -> list[Table]:
    """The summary and constants tables of one group."""
    fitted = [d for d in group["laws"].values() if "params" in d]
    if not fitted:  # e.g. a method with one run: the cross-method comparison still uses its rows
        reasons = sorted({d["status"] for d in group["laws"].values()})
        lines = Table(title=f"{escape(group['label'])}: no law fitted", title_justify="left", show_header=False)
        lines.add_column("why", overflow="fold")
        for reason in reasons:
            lines.add_row(f"[red]{escape(reason)}[/]")
        return [lines]
    any_law = fitted[0]
    runs = len(any_law.get("rows", {}))
    summary = Table(title=f"{escape(group['label'])}: {any_law.get('n_rows', 0)} checkpoints of {runs} runs, "
                    f"steps >= {any_law.get('min_step', '?')}, L_f = {target}", title_justify="left")
    for col in ("law", "output", "R^2", "status"):
        summary.add_column(col, overflow="fold")
    for d in group["laws"].values():
        if "params" not in d:
            summary.add_row(d["law"], "", "", f"[red]{escape(d['status'])}[/]")
            continue
        for i, out in enumerate(d["outputs"]):
            colour = "green" if d["status"].startswith("converged") else "yellow"
            summary.add_row(d["law"] if i == 0 else "", OUT_NAME[out], num(d["r2"].get(out)),
                            f"[{colour}]{escape(d['status'])}[/]" if i == 0 else "")
    consts = Table(title=f"{escape(group['label'])}: constants (95% bootstrap interval)", title_justify="left")
    for col in ("law", "constant", "value", "95% interval", "note"):
        consts.add_column(col)
    for d in fitted:
        first = True
        for name in d["names"]:
            lo, hi = d["ci"][name]
            if name in d["borrowed"]:
                note = f"from {d['borrowed'][name]}"
            elif name not in d["free"]:
                note = "gauge (fixed)"
            elif name in d["weak"]:
                note = "[yellow]not identified[/]"
            else:
                note = ""
            value = num(d["params"][name])
            consts.add_row(d["law"] if first else "", name, f"[dim]{value}[/]" if name in d["weak"] else value,
                           bracket(lo, hi), note)
            first = False
        consts.add_section()
    return [summary, *forecast_check_tables(group, target), consts]


def forecast_check_tables(group: dict[str, Any], target: str) -> list[Table]:
    """Held-out forecast errors of every form, in nats and relative to how far the runs moved."""
    check = group.get("forecast_check")
    if not check:
        return []
    t = Table(title=escape(f"{group['label']}: held-out forecast ({check['description']})"), title_justify="left")
    for col in ("form", "output", "rows", "mean |error| (nats)", "|error| / change", "signed / change",
                "|error| / value", "note"):
        t.add_column(col, overflow="fold")
    rise = {"ft": "L_ft drop", "f": "KL rise" if target != "forget_ce_hard" else "hard-CE rise"}
    for r in check["forms"]:
        note = "not a forecast: uses the held-out runs' measured L_ft" if r["given_ft"] else ""
        t.add_row(escape(r["form"]), OUT_NAME[r["output"]], str(r.get("rows", "")), num(r["mae"]),
                  f"{pct(r['rise'])} of {rise[r['output']]}", pct(r["bias"]), pct(r["mare"]), note)
    return [t]


def _err(e: dict[str, Any], key: str) -> str:
    lo, hi = e[f"{key}_ci"]
    return f"{pct(e[key])}{ci_suffix(lo, hi, pct)}"


def cross_method_tables(block: dict[str, Any]) -> list[Table]:
    """The comparison across methods of one dataset: distance from the LoRA laws, held-out forecasts."""
    runs = Table(title=escape(f"{block['dataset']}: methods, each run's last checkpoint"), title_justify="left")
    for col in ("method", "rank", "P (trainable)", "step", "L_ft held-out", "L_ft train", "L_f (CE)", "KL", "status"):
        runs.add_column(col, justify="left" if col in ("method", "status") else "right")
    for group, info in block["variants"].items():
        for i, r in enumerate(info["runs"]):
            runs.add_row(escape(group) if i == 0 else "", "-" if r["rank"] is None else str(r["rank"]),
                         f"{r['P']:,.0f}", str(r["step"]), *(num(r.get(c)) for c in
                                                            ("ft_loss", "ft_loss_train", "forget_ce", "forget_kl")),
                         r["status"])
    title = escape(f"{block['dataset']}: methods against the laws fitted on LoRA ({block.get('reference') or '-'})")
    dist = Table(title=title + f", steps >= {block.get('min_step', '?')}", title_justify="left")
    for col in ("method", "P", "rows", "law", "signed error [95%]", "mean |error| [95%]", "max |error|", "note"):
        dist.add_column(col, overflow="fold")
    for group, info in block["variants"].items():
        P = sorted({r["P"] for r in info["runs"]})
        p_text = ", ".join(f"{p:,.0f}" for p in P) if len(P) <= 3 else f"{P[0]:,.0f}-{P[-1]:,.0f}"
        name = escape(f"{group} (reference)" if group == block.get("reference") else group)
        if info.get("status") != "compared":
            dist.add_row(name, p_text, "", "", "", "", "", escape(info.get("status", block.get("status", ""))))
            dist.add_section()
            continue
        for i, (law, e) in enumerate(info["errors"].items()):
            note = {"under": "[yellow]underestimates[/]", "over": "[yellow]overestimates[/]"}.get(e["bias"], "")
            if group == block["reference"]:
                note = "in-sample (fitted on these rows)"
            elif e["bias"] == "no finite prediction":
                note = "[red]no finite prediction[/]"
            if i == 0 and info.get("outside"):
                note = "; ".join([*([note] if note else []), *map(escape, info["outside"])])
            dist.add_row(name if i == 0 else "", p_text if i == 0 else "", str(info["n_rows"]) if i == 0 else "",
                         law, _err(e, "signed"), _err(e, "mean"), pct(e["max"]), note)
        dist.add_section()
    tables = [runs, dist]
    ho = block.get("heldout") or {}
    if ho.get("by_variant"):
        t = Table(title=escape(f"{block['dataset']}: forecast of later steps, MARE ({ho['description']})"),
                  title_justify="left")
        for col in ("method", "law", "own fit", "pooled fit", "LoRA-only fit"):
            t.add_column(col, overflow="fold")
        for group, r in ho["by_variant"].items():
            for i, law in enumerate(r["pooled"] or r["lora"]):
                t.add_row(escape(group) if i == 0 else "", law, pct(r["own"].get(law)), pct(r["pooled"].get(law)),
                          pct(r["lora"].get(law)))
            t.add_section()
        tables.append(t)
    pooled = (block.get("pooled") or {}).get("laws") or {}
    if pooled:
        t = Table(title=escape(f"{block['pooled']['label']}: every method fitted together"), title_justify="left")
        for col in ("law", "R^2", "held-out error", "status"):
            t.add_column(col, overflow="fold")
        for d in pooled.values():
            fitted = "params" in d
            t.add_row(d["law"], ", ".join(num(v) for v in d["r2"].values()) if fitted else "",
                      ", ".join(pct(v) for v in d["heldout_mare"].values()) if fitted else "", escape(d["status"]))
        tables.append(t)
    return tables


def mitigation_tables(cells: list[dict[str, Any]]) -> list[Any]:
    """Laws.json's 'mitigation' block: per cell the matched-loss and Eq. 4 tables, and one line per arm."""
    items: list[Any] = []
    for cell in cells:
        t = Table(title=escape(f"{cell['label']}: forgetting at matched held-out L_ft (base {cell['base_ft']:.4f}); "
                               "intervals over paired seeds"), title_justify="left")
        for col in arms_report.HEADER:
            t.add_column(col, overflow="fold")
        for row in arms_report.rows(cell):
            t.add_row(*(escape(c) for c in row))
        lines = Table(title=escape(f"{cell['label']}: Eq. 4 per arm, L_f = slope * L_ft + intercept"),
                      title_justify="left")
        for col in ("arm", "slope [95%]", "intercept [95%]", "R^2", "status"):
            lines.add_column(col, overflow="fold")
        for row in arms_report.line_rows(cell):
            lines.add_row(*(escape(c) for c in row))
        items += [t, lines, *(f"- {escape(s)}" for s in summary_lines(cell)), ""]
    return items


def guardrail_tables(block: dict[str, Any] | None) -> list[Any]:
    """Laws.json's 'guardrails' block: the refusal law per group and x, then one line per group."""
    if not block:
        return []
    base = block.get("base")
    where = f"; base {base['k']}/{base['n']} refused" if base else ""
    t = Table(title=escape(f"Guardrails lost: {block['form']}, binomial ML{where}; x chosen by "
                           "held-out log loss"), title_justify="left")
    for col in guardrails.TABLE_HEADER:
        t.add_column(col, overflow="fold")
    for row in guardrails.table_rows(block):
        t.add_row(*(escape(c) for c in row))
    return [t, *(f"- {escape(s)}" for s in guardrails.summary_lines(block)), ""]


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    with console.status("fitting laws...") as status:
        def progress(label: str, law: str, i: int, n: int) -> None:
            status.update(f"fitting {label}: {law} ({i + 1}/{n}, {options.n_bootstrap} resamples)")

        doc, path = fit_run_dir(args.run_dir, options, progress)
    for group in doc["groups"]:
        for table in group_tables(group, options.target):
            console.print(table)
        console.print()
    for block in doc.get("cross_method", []):
        for table in cross_method_tables(block):
            console.print(table)
        for line in crossmethod.verdict(block):
            console.print(f"- {escape(line)}", highlight=False)
        console.print()
    for item in mitigation_tables(doc.get("mitigation", [])):  # arms vs the control (docs/mitigations.md)
        console.print(item)
    for item in guardrail_tables(doc.get("guardrails")):  # refusal against forgetting (docs/evals.md)
        console.print(item)
    console.print(f"wrote {path}")
    return 0
