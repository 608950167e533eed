"""Run the embedded demo end to end: the sweep (SmolLM2-135M-Instruct, LoRA, news -> Wikipedia forgetting),
then `fit` and `report` on its RUN_DIR, and a verdict in a few lines (the trade-off slope, which laws are
identified, the held-out forecast error, where the report is); `--verbose` prints every table of `fit` and
the fitted laws beside the paper's constants.

The fit and the report are the same entry points as `forgetscale fit RUN_DIR` and `forgetscale report
RUN_DIR` with their defaults, so the demo shows exactly what a user gets from those verbs.
"""

from __future__ import annotations

import argparse
import json
import math
from importlib.resources import files
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from forgetscale.formatting import bracket, ci_suffix, num

NAME = "demo"
HELP = "run the embedded demo offline: sweep, fit, report, laws beside the paper's"
EPILOG = """examples:
  forgetscale demo                 # writes runs/demo/results.sqlite, laws.json, report.html
  forgetscale demo --out /tmp/d --set train.steps=16 --bootstrap 100
  forgetscale demo --verbose       # every table of `forgetscale fit`, and the laws beside the paper's
Re-running the same command resumes the sweep (finished runs are skipped), then fits and reports again."""

# the fitted laws shown beside the paper's Table 1, with the paper's equation numbers
PAPER_LAWS = (("linear", "Eq. 4"), ("power_ft", "Eq. 5"), ("power_f", "Eq. 6"), ("mult_ft", "multiplicative L_ft"),
              ("mult_f", "multiplicative L_f"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a demo config key (dotted), value parsed as YAML; repeatable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--bootstrap", type=int, default=None,
                        help="bootstrap resamples of the fit (default: fit's own default)")
    parser.add_argument("--verbose", action="store_true",
                        help="print every table of `forgetscale fit` and the laws beside the paper's, not only the verdict")


def demo_config_path() -> Path:
    return Path(str(files("forgetscale") / "resources" / "demo.yaml"))


def run(args: argparse.Namespace) -> int:
    from forgetscale.cli.sweep import finish_sweep
    from forgetscale.config import load_config, parse_overrides
    from forgetscale.sweep import run_sweep

    cfg = load_config(demo_config_path(), parse_overrides(args.overrides))
    store = run_sweep(cfg, args.out, progress=not args.no_progress)
    code = finish_sweep(cfg, store, args.out, progress=not args.no_progress)
    if code != 0:  # a failed run: fitting the others would describe a different sweep; the re-run fits
        return code
    return fit_and_report(args.out, args.bootstrap, verbose=args.verbose)


def _verb_args(module: Any, argv: list[str]) -> argparse.Namespace:
    """A verb's arguments exactly as its own command line would parse them (its defaults included)."""
    parser = argparse.ArgumentParser(prog=f"forgetscale {module.NAME}")
    module.add_arguments(parser)
    return parser.parse_args(argv)


def fit_and_report(run_dir: Path, bootstrap: int | None = None, verbose: bool = False) -> int:
    """`forgetscale fit RUN_DIR` then `forgetscale report RUN_DIR`, then the verdict (verbose: fit's tables
    and the laws beside the paper's before it)."""
    from forgetscale.cli import fit, report
    from forgetscale.laws.fit import fit_run_dir
    from forgetscale.laws.pipeline.lawfile import LAWS_FILE

    fit_args = _verb_args(fit, [str(run_dir)] + ([] if bootstrap is None else ["--bootstrap", str(bootstrap)]))
    console = Console() if Console().is_terminal else Console(width=140)
    if verbose:
        code = fit.run(fit_args)
        if code != 0:
            return code
    else:
        with console.status("fitting laws..."):
            fit_run_dir(run_dir, fit.options_from_args(fit_args))
    code = report.run(_verb_args(report, [str(run_dir), "--no-fit"]))
    doc = json.loads((Path(run_dir) / LAWS_FILE).read_text())
    if verbose:
        for table in beside_paper_tables(doc):
            console.print(table)
    print("\n".join(verdict(doc, Path(run_dir))))
    return code


def verdict(doc: dict[str, Any], run_dir: Path) -> list[str]:
    """What the demo found, in a few lines per group of laws.json: the Eq. 4 slope (nats of forgetting per
    nat of fine-tuning loss gained) with its interval, which laws identified every constant, the held-out
    forecast of the largest rank's later steps beside the nearest-checkpoint baseline, and where to look next."""
    lines = []
    for group in doc["groups"]:
        lines.append(f"verdict for {group['label']}:")
        linear = group["laws"].get("linear", {})
        if "params" in linear:
            r2 = num(linear["r2"].get("f"))
            lines.append(f"  trade-off (Eq. 4): forgetting rises {num(linear['params']['c_f_ft'])}"
                         f"{ci_suffix(*(linear['ci'].get('c_f_ft') or (None, None)))} nats per nat of fine-tuning loss gained "
                         f"(R^2 {r2})")
        identified = [k for k, d in group["laws"].items() if "params" in d and not d["weak"]
                      and d["status"].startswith("converged")]
        weak = [f"{k} ({', '.join(d['weak'])})" for k, d in group["laws"].items() if "params" in d and d["weak"]]
        unfitted = [k for k, d in group["laws"].items() if "params" not in d]
        lines.append(f"  laws identified: {', '.join(identified) or 'none'}"
                     + (f"; not identified: {'; '.join(weak)}" if weak else "")
                     + (f"; not fitted: {', '.join(unfitted)}" if unfitted else ""))
        check = group.get("forecast_check")
        forms = [r for r in (check or {}).get("forms", []) if r["output"] == "f" and not r["given_ft"]
                 and r.get("rise") is not None and math.isfinite(r["rise"])]
        laws = [r for r in forms if not r["form"].startswith("baseline")]
        if laws:
            best = min(laws, key=lambda r: r["rise"])
            base = next((r for r in forms if r["form"].startswith("baseline")), None)
            lines.append(f"  held-out forecast ({check['description']}): {best['form']} misses the KL rise by "
                         f"{100 * best['rise']:.1f}%" + (f" (nearest-checkpoint baseline {100 * base['rise']:.1f}%)"
                                                        if base else ""))
        else:
            lines.append("  held-out forecast: not made (too few ranks or steps; see `forgetscale fit`)")
    lines.append(f"report: {run_dir / 'report.html'}   laws: {run_dir / 'laws.json'}")
    lines.append(f"every table: forgetscale fit {run_dir}   (or forgetscale demo --verbose)")
    return lines


def beside_paper_tables(doc: dict[str, Any]) -> list[Table]:
    """Per group of laws.json: each law's status and R^2, its fitted constants with 95% intervals, and the
    paper's value of the same constant (news, or both datasets when the data is neither), a and b written
    at our gauge c_ft. Borrowed and gauge constants are shown once, in the law that fits them."""
    from forgetscale.laws.studies import paper

    gauge = doc["options"]["gauge_c_ft"]
    tables = []
    for group in doc["groups"]:
        matched = paper.match_dataset(group["key"]["dataset"])
        datasets = [matched] if matched else list(paper.CONSTANTS)
        theirs = {d: paper.in_gauge(d, gauge) for d in datasets}
        t = Table(title=escape(f"{group['label']}: fitted laws beside the paper's (Table 1; a, b at c_ft = {gauge:g})"),
                  caption=escape(paper.SOURCE), title_justify="left")
        for col in ("law", "status", "R^2", "constant", "fitted", "95% interval", *(f"paper: {d}" for d in datasets)):
            t.add_column(col, overflow="fold", justify="right" if col in ("R^2", "fitted") else "left")
        for key, title in PAPER_LAWS:
            d = group["laws"].get(key)
            if d is None:
                continue
            status = escape(d["status"])
            colour = "green" if d["status"] == "converged" else "yellow" if "params" in d else "red"
            r2 = ", ".join(f"{num(v)}" for v in d.get("r2", {}).values())
            names = [n for n in d.get("free", []) if n not in d.get("borrowed", {})]
            if not names:
                t.add_row(f"{title} ({key})", f"[{colour}]{status}[/]", r2, "", "", "", *("" for _ in datasets))
            for i, name in enumerate(names):
                lo, hi = d["ci"][name]
                value = num(d["params"][name])
                if name in d["weak"]:
                    value = f"[dim]{value}[/] (not identified)"
                paper_values = [num(theirs[p].get(name)) if name in theirs[p] else "-" for p in datasets]
                t.add_row(f"{title} ({key})" if i == 0 else "", f"[{colour}]{status}[/]" if i == 0 else "",
                          r2 if i == 0 else "", name, value, bracket(lo, hi), *paper_values)
            t.add_section()
        tables.append(t)
    return tables
