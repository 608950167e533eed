"""`forgetscale report`: one self-contained HTML page (figures embedded) plus RUN_DIR/figures/*.png.

The report reads RUN_DIR/laws.json and the stored rows; it fits only when laws.json is missing
(with `fit`'s defaults), and its figures evaluate the stored laws, never refit them. Sections come
from the SECTIONS registry (report/sections.py): the built-in ones, the capability suites' (evals.py),
refusals through training (guardrails.py) and the mitigation arms' (mitigations.py) register on import
here; a plug-in registers its own.
"""

from __future__ import annotations

import html
from pathlib import Path

from forgetscale.errors import NotFittedError, StoreError
from forgetscale.laws.fit import fit_run_dir
from forgetscale.laws.pipeline import lawfile
from forgetscale.laws.pipeline.fitall import FitOptions, stale_groups
from forgetscale.report import builtin, evals, guardrails, mitigations  # noqa: F401  (register their sections)
from forgetscale.report.sections import (
    SECTIONS,
    Markup,
    ReportContext,
    Section,
    ordered,
    register_section,
    table,
)

REPORT_FILE = "report.html"

CSS = """
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;max-width:1320px;margin:2em auto;padding:0 1.5em;
color:#1d1d1f;line-height:1.45;font-size:15px}
h1{font-size:1.7em;margin-bottom:.2em}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}
th,td{border-bottom:1px solid #e4e4e4;padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f5f5f7;font-weight:600}
table.consts td{font-variant-numeric:tabular-nums}.ci{color:#666;font-size:11px}.dim{color:#888}
img{max-width:100%;height:auto;display:block;margin:.3em 0}
.warn{color:#a15c00;font-weight:600}.cap{color:#555;font-size:13px}
pre{background:#f5f5f7;padding:1em;overflow:auto;font-size:12px}nav a{margin-right:1em}
"""


def build_report(run_dir: str | Path, *, fit_if_missing: bool = True,
                 options: FitOptions | None = None) -> tuple[Path, list[str]]:
    """Write RUN_DIR/report.html and RUN_DIR/figures/*.png; returns the page's path and notes to print.

    `options` are used only when laws.json is missing and the laws are fitted first (default: fit's).
    """
    from forgetscale.store import Store

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StoreError(f"{run_dir}: no such run directory")
    notes = []
    with Store(run_dir, create=False) as store:
        frame = store.frame()
        sweep_config = store.get_meta("sweep_config")
    try:
        doc = lawfile.load(run_dir)
    except NotFittedError:
        if not fit_if_missing:
            raise
        doc, path = fit_run_dir(run_dir, options or FitOptions())
        notes.append(f"laws.json was missing: fitted with default options and wrote {path}")
    ctx = ReportContext(run_dir, doc, frame, sweep_config, stale=stale_groups(frame, doc))
    if ctx.stale:
        notes.append(f"results.sqlite changed since laws.json was written ({', '.join(ctx.stale)}); "
                     f"re-run `forgetscale fit {run_dir}`")
    body, nav = [], []
    for name, section in ordered():
        fragment = section.build(ctx)
        if fragment is None:
            continue
        nav.append(f'<a href="#{name}">{html.escape(section.title)}</a>')
        body.append(f'<section id="{name}"><h2>{html.escape(section.title)}</h2>{fragment}</section>')
    title = f"forgetscale report: {run_dir.name}"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='cap'>Scaling laws for forgetting (Kalajdzievski 2024, arXiv 2401.05605), fitted on "
            f"{html.escape(str(run_dir))}. All losses in nats per token.</p><nav>{''.join(nav)}</nav>"
            f"{''.join(body)}</body></html>")
    out = run_dir / REPORT_FILE
    out.write_text(page, encoding="utf-8")
    return out, notes


__all__ = ["SECTIONS", "Markup", "ReportContext", "Section", "build_report", "register_section", "table"]
