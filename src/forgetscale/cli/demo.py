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
  forgetscale demo --study safety  # the guarded model on instruction data and on news: refusals and KL per step
Re-running the same command resumes the sweep (finished runs are skipped), then fits and reports again."""

# the fitted laws shown beside the paper's Table 1, with the paper's equation numbers
PAPER_LAWS = (("linear", "Eq. 4"), ("power_ft", "Eq. 5"), ("power_f", "Eq. 6"), ("mult_ft", "multiplicative L_ft"),
              ("mult_f", "multiplicative L_f"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", choices=sorted(STUDIES), default="forgetting",
                        help="forgetting: the paper's laws on news (default); safety: the guarded model organism "
                        "fine-tuned on instruction data and on news, refusals and choice agreement at every "
                        "checkpoint, compared at the same KL (docs/evals.md)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default runs/demo; --study safety: runs/safety, one folder per dataset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a demo config key (dotted), value parsed as YAML; repeatable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--bootstrap", type=int, default=None,
                        help="bootstrap resamples of the fit (default: fit's own default)")
    parser.add_argument("--verbose", action="store_true",
                        help="print every table of `forgetscale fit` and the laws beside the paper's, not only the verdict")


# study -> (config in forgetscale/resources, default RUN_DIR)
STUDIES = {"forgetting": ("demo.yaml", Path("runs/demo")), "safety": ("safety.yaml", Path("runs/safety"))}
# the safety study's sweeps: one design, two kinds of data (the paper's OpenOrca and news); label -> dataset
SAFETY_DATA = {"instructions": "embedded:sharegpt", "news": "embedded:news"}


def demo_config_path(study: str = "forgetting") -> Path:
    return Path(str(files("forgetscale") / "resources" / STUDIES[study][0]))


def run(args: argparse.Namespace) -> int:
    out = args.out or STUDIES[args.study][1]
    if args.study == "safety":
        return run_safety(args, out)
    code = sweep_once(args.overrides, out, "forgetting", not args.no_progress)
    if code != 0:  # a failed run: fitting the others would describe a different sweep; the re-run fits
        return code
    return fit_and_report(out, args.bootstrap, verbose=args.verbose)


def sweep_once(overrides: list[str], out: Path, study: str, progress: bool) -> int:
    """The study's sweep into `out` (resumed when it exists) and the eval suites its config lists."""
    from forgetscale.cli.sweep import finish_sweep
    from forgetscale.config import load_config, parse_overrides
    from forgetscale.sweep import run_sweep

    cfg = load_config(demo_config_path(study), parse_overrides(overrides))
    store = run_sweep(cfg, out, progress=progress)
    return finish_sweep(cfg, store, out, progress=progress)


def run_safety(args: argparse.Namespace, out: Path) -> int:
    """The guarded model (built and checked first, timed apart, when not cached), then one sweep per kind of
    data with safety and choice at every checkpoint, `fit` and `report` of each, the refusal and KL per step
    and rank, and the comparison at the same KL (laws/studies/erosion.py)."""
    import time

    from forgetscale import guarded
    from forgetscale.cli import fit, report
    from forgetscale.config import load_config, parse_overrides
    from forgetscale.laws.fit import fit_run_dir
    from forgetscale.laws.studies import erosion
    from forgetscale.models import GUARDED

    started = time.perf_counter()
    if load_config(demo_config_path("safety"), parse_overrides(args.overrides)).model.name == GUARDED:
        folder = guarded.build(progress=not args.no_progress)
        print(f"{GUARDED} ready in {time.perf_counter() - started:.0f} s (built once, then cached in {folder})")
    started = time.perf_counter()
    sweeps = {}
    for label, dataset in SAFETY_DATA.items():
        folder = out / label
        print(f"\n== {label} ({dataset}) -> {folder}")
        code = sweep_once([f"finetune.dataset={dataset}", *args.overrides], folder, "safety", not args.no_progress)
        if code != 0:
            return code
        fit_args = _verb_args(fit, [str(folder)] + ([] if args.bootstrap is None else ["--bootstrap", str(args.bootstrap)]))
        fit_run_dir(folder, fit.options_from_args(fit_args))
        code = report.run(_verb_args(report, [str(folder), "--no-fit"]))
        if code != 0:
            return code
        sweeps[label] = erosion.sweep_points(folder)
    console = Console() if Console().is_terminal else Console(width=140)
    console.print(safety_table(sweeps))
    result = erosion.at_matched_kl(sweeps, n_bootstrap=args.bootstrap or 1000)
    print("\n".join(erosion.verdict_lines(result)))
    print(f"sweeps, evals, fits and reports in {time.perf_counter() - started:.0f} s; reports: "
          + ", ".join(str(out / label / "report.html") for label in sweeps))
    return 0


def safety_table(sweeps: dict[str, dict[str, Any]]) -> Table:
    """Refusal rate, choice agreement and KL per data, rank and step (the rows behind the comparison)."""
    from forgetscale.formatting import pct

    t = Table(title="guarded model fine-tuned: refusals (HarmBench) and choice agreement against KL, per step",
              title_justify="left")
    for col in ("data", "rank", "step", "KL", "refused", "95% interval", "agrees with base"):
        t.add_column(col, justify="left" if col == "data" else "right")
    for label, pts in sweeps.items():
        refusal, agreement = pts["refusal"], pts["agreement"]
        agree = {(r.run_id, int(r.step)): r for r in agreement.itertuples()}
        for r in refusal.sort_values(["rank", "step"]).itertuples():
            a = agree.get((r.run_id, int(r.step)))
            t.add_row(label, str(int(r.rank)) if r.rank == r.rank else "", str(int(r.step)), f"{r.forget_kl:.4f}",
                      f"{int(r.k)}/{int(r.n)}", f"[{pct(r.lo, 0)}, {pct(r.hi, 0)}]", "" if a is None else f"{pct(a.rate, 0)}")
        t.add_section()
    return t


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
