"""`forgetscale fit` on a run folder: every group's laws (pipeline/fitall), then the studies on them
(cross_method, mitigation, guardrails), written as one laws.json.

The one module that calls both the pipeline and the studies, so that neither imports the other back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from forgetscale.errors import DataError
from forgetscale.laws.pipeline import lawfile
from forgetscale.laws.pipeline.fitall import FitOptions, Progress, fit_groups, within_budget
from forgetscale.laws.studies import crossmethod, guardrails, mitigation


def fit_frame(frame: pd.DataFrame, options: FitOptions, progress: Progress | None = None) -> dict[str, Any]:
    """The laws.json document for stored rows (all groups, and the comparison across methods)."""
    doc, fitted = fit_groups(frame, options, progress)
    doc["cross_method"] = crossmethod.compare(within_budget(frame, options.max_step), fitted, options, progress)
    return doc


def fit_run_dir(run_dir: str | Path, options: FitOptions, progress: Progress | None = None) -> tuple[dict, Path]:
    """Fit a sweep's stored rows and (over)write RUN_DIR/laws.json."""
    from forgetscale.store import Store

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory; pass the --out folder of `forgetscale sweep`")
    with Store(run_dir, create=False) as store:
        frame = store.frame()
    doc = fit_frame(frame, options, progress)
    doc["run_dir"] = str(run_dir)
    mitigation.add_to_doc(doc, run_dir, options)  # mitigation arms vs the control at matched L_ft
    guardrails.add_to_doc(doc, run_dir, options)  # refusal rate against forgetting, when safety was evaluated
    return doc, lawfile.save(run_dir, doc)
