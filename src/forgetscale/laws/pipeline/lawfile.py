"""RUN_DIR/laws.json: every fitted law with its constants, intervals, diagnostics and the rows it used.

The file is the hand-off between `fit` and everything downstream (`predict`, `report`): those read
it and never fit on their own, so what they show is what `fit` printed. It is rewritten whole on
every fit (never appended), with bootstrap draws at full precision so intervals of any derived
quantity can be recomputed. Non-finite numbers are stored as null (strict JSON).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from forgetscale.errors import NotFittedError, StoreError
from forgetscale.laws.estimators.base import Law
from forgetscale.laws.estimators.registry import LAWS

LAWS_FILE = "laws.json"
FORMAT = 1


def _num(x: Any) -> Any:
    """JSON-safe value: numpy scalars to Python, non-finite floats to None, recursively."""
    if isinstance(x, dict):
        return {str(k): _num(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_num(v) for v in x]
    if isinstance(x, np.ndarray):
        return _num(x.tolist())
    if isinstance(x, np.integer | np.bool_):
        return x.item()
    if isinstance(x, float | np.floating):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


json_safe = _num  # public name for other modules that build parts of laws.json


def _float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def law_to_dict(law: Law) -> dict[str, Any]:
    """Everything `predict` and `report` need from a fitted law."""
    return _num({
        "law": law.name, "title": law.title, "outputs": list(law.outputs), "names": list(law.names),
        "free": list(law.free), "borrowed": dict(law.borrowed), "settings": law.get_params(),
        "status": law.status_, "weak": law.weak_, "converged": law.converged_, "at_bound": law.at_bound_,
        "params": law.params_, "ci": {k: list(v) for k, v in law.ci_.items()},
        "r2": law.r2_, "heldout_mare": law.heldout_mare_, "heldout_errors": law.heldout_errors_,
        "given_ft": law.given_ft, "noise": law.noise_,
        "heldout": {"params": law.heldout_params_, **law.heldout_split_},
        "min_step": law.min_step_, "n_rows": law.n_rows_, "ranges": law.ranges_, "ranks": law.ranks_,
        "rows_fingerprint": law.fingerprint_, "excluded": law.excluded_, "rows": law.rows_,
        "bootstrap": {**law.bootstrap_, "draws": law.boot_},
    })


def law_from_dict(d: dict[str, Any]) -> Law:
    """A fitted estimator rebuilt from laws.json: predict() and predict_interval() work on it."""
    law = LAWS.get(d["law"])(**d["settings"])
    law.params_ = {k: _float(v) for k, v in d["params"].items()}
    law.ci_ = {k: (_float(v[0]), _float(v[1])) for k, v in d["ci"].items()}
    draws = d["bootstrap"].get("draws") or []
    law.boot_ = np.array([[_float(x) for x in row] for row in draws], dtype=float).reshape(-1, len(law.names))
    law.status_, law.weak_, law.converged_ = d["status"], d["weak"], d["converged"]
    law.at_bound_ = d.get("at_bound", [])
    law.r2_ = {k: _float(v) for k, v in d["r2"].items()}
    law.heldout_mare_ = {k: _float(v) for k, v in d["heldout_mare"].items()}
    law.heldout_errors_ = {o: {k: (_float(v) if k not in ("given_ft", "rows") else v) for k, v in e.items()}
                           for o, e in (d.get("heldout_errors") or {}).items()}
    law.noise_ = d.get("noise") or {}  # laws.json written before prediction intervals: none
    ho = d["heldout"].get("params")
    law.heldout_params_ = None if ho is None else {k: _float(v) for k, v in ho.items()}
    law.heldout_split_ = {k: v for k, v in d["heldout"].items() if k != "params"}
    law.min_step_, law.n_rows_, law.ranges_, law.ranks_ = d["min_step"], d["n_rows"], d["ranges"], d["ranks"]
    law.fingerprint_ = d["rows_fingerprint"]
    law.excluded_, law.rows_ = d.get("excluded", {}), d.get("rows", {})
    law.bootstrap_ = {k: v for k, v in d["bootstrap"].items() if k != "draws"}
    return law


def save(run_dir: str | Path, doc: dict[str, Any]) -> Path:
    """Write laws.json atomically (a crash mid-write leaves the previous file intact)."""
    path = Path(run_dir) / LAWS_FILE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".laws-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(_num(doc), fh, indent=1, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def load(run_dir: str | Path) -> dict[str, Any]:
    """The fitted laws of a sweep; NotFittedError names the command that makes them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StoreError(f"{run_dir}: no such run directory")
    path = run_dir / LAWS_FILE
    if not path.exists():
        raise NotFittedError(f"{path}: laws are not fitted yet; run `forgetscale fit {run_dir}` first")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); re-run `forgetscale fit`") from None
    if doc.get("format") != FORMAT:
        raise StoreError(f"{path}: laws file format {doc.get('format')}; this forgetscale reads {FORMAT}; re-run fit")
    return doc


def fitted_laws(group: dict[str, Any]) -> dict[str, Law]:
    """The laws of one group that were fitted (skipped ones carry only their reason)."""
    return {name: law_from_dict(d) for name, d in group["laws"].items() if "params" in d}
