"""Which stored checkpoints a law is fitted on, and the arrays the fitters read.

Rules (the report and laws.json list the rows actually used):
- one group per fit, (dataset, method with its settings, mitigation): laws of different data or
  methods differ, and a method's settings make a different method (LoRA on attention only is not
  LoRA on every linear module; see groups.py);
- runs with status 'finished' only, unless asked otherwise (a running or failed run's early
  checkpoints are valid measurements, but a half-done sweep over-weights small steps);
- step 0 never (N = 0 has no power law), and nothing below the minimum step: the paper drops
  N < 50; a short sweep would then keep nothing, so the default is min(50, 20% of the largest
  step), at least 1;
- rows whose used columns are not finite are dropped; a column with no finite value is an error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from forgetscale.errors import DataError
from forgetscale.laws.estimators.groups import GROUP, METHOD_KEY, add_groups

GROUP_KEYS = ("dataset", "method", "variant", "mitigation")  # a group's key in laws.json
_SPLIT = ("dataset", GROUP, "mitigation")  # what splits rows (a group implies its method)
TARGETS = ("forget_ce", "forget_kl", "forget_ce_hard")
FT_COLUMNS = ("ft_loss", "ft_loss_train")
PAPER_MIN_STEP = 50


def default_min_step(max_step: int) -> int:
    """The paper's N >= 50, scaled to 20% of the sweep when the sweep is shorter than 250 steps."""
    return int(max(1, min(PAPER_MIN_STEP, round(0.2 * max_step))))


def groups(frame: pd.DataFrame) -> list[tuple[dict[str, str], pd.DataFrame]]:
    """Split stored rows into the groups laws are fitted on (per dataset, method group and mitigation)."""
    missing = [k for k in ("dataset", "method", "mitigation") if k not in frame.columns]
    if missing:
        raise DataError(f"results have no {', '.join(missing)} column; is this a forgetscale results store?")
    frame = add_groups(frame)
    out = []
    for key, sub in frame.groupby(list(_SPLIT), sort=True, dropna=False):
        d = dict(zip(_SPLIT, (str(k) for k in key), strict=True))
        out.append(({"dataset": d["dataset"], "method": str(sub["method"].iloc[0]), "variant": d[GROUP],
                     "mitigation": d["mitigation"]}, sub))
    return out


def group_label(key: dict[str, str]) -> str:
    """'openorca / lora[attn]' with the mitigation only when there is one."""
    parts = [key["dataset"], key.get("variant", key["method"])]
    if key.get("mitigation", "none") not in ("none", "nan", ""):
        parts.append(key["mitigation"])
    return " / ".join(parts)


def group_rows(frame: pd.DataFrame, key: dict[str, str]) -> pd.DataFrame:
    """The rows of one group of a whole sweep's frame (laws.json keys written before groups had labels
    match their method's plain label)."""
    frame = add_groups(frame)
    want = {"dataset": key["dataset"], GROUP: key.get("variant", key["method"]), "mitigation": key["mitigation"]}
    mask = np.ones(len(frame), bool)
    for col, value in want.items():
        mask &= (frame[col].astype(str) == value).to_numpy()
    return frame[mask]


def base_column(col: str) -> str:
    """The column holding each row's step-0 value of `col` (its run's base model)."""
    return f"base:{col}"


def with_base(frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """`frame` plus, per used column, its run's step-0 value: errors are then also stated relative to
    how far a run moved from the base (the KL rise, the L_ft drop), not only to the loss itself, whose
    base entropy part no fine-tune changes. NaN where a run has no step-0 row."""
    base = frame[frame["step"] == 0].drop_duplicates("run_id").set_index("run_id")
    out = frame.copy()
    for col in columns:
        out[base_column(col)] = out["run_id"].map(pd.to_numeric(base[col], errors="coerce")).astype(float)
    return out


@dataclass
class Selection:
    """The rows a law uses and why the others were left out."""

    rows: pd.DataFrame
    min_step: int
    excluded: dict[str, int] = field(default_factory=dict)

    def used(self) -> dict[str, list[int]]:
        """run_id -> steps used (what laws.json records)."""
        return {r: sorted(int(s) for s in g["step"]) for r, g in self.rows.groupby("run_id", sort=True)}


def select_rows(
    frame: pd.DataFrame,
    *,
    law: str,
    columns: tuple[str, ...],
    min_step: int | str = "auto",
    include_unfinished: bool = False,
) -> Selection:
    """Apply the rules above for one law; `columns` are the stored columns the law reads."""
    for col in ("run_id", "step", "trainable_params", "status", *columns):
        if col not in frame.columns:
            raise DataError(f"law '{law}' needs column '{col}'; the results have: {', '.join(frame.columns)}")
    split = [k for k in ("dataset", "mitigation") if k in frame.columns]
    if "method" in frame.columns:
        split.append(add_groups(frame)[METHOD_KEY])
    if split and frame.groupby(split, dropna=False).ngroups > 1:
        labels = sorted({group_label(k) for k, _ in groups(frame)})
        raise DataError(
            f"law '{law}' fits one (dataset, method variant, mitigation) group at a time; got {len(labels)}: "
            f"{'; '.join(labels)}; filter the rows or use forgetscale.laws.fit.fit_frame"
        )
    excluded: dict[str, int] = {}
    rows = with_base(frame, columns)
    if not include_unfinished:
        keep = rows["status"] == "finished"
        if not keep.any():
            states = ", ".join(f"{n} {s}" for s, n in rows["status"].value_counts().items()) or "no runs"
            raise DataError(
                f"law '{law}' needs finished runs; found {states}; "
                "wait for the sweep or pass --include-unfinished"
            )
        excluded["unfinished runs"] = int((~keep).sum())
        rows = rows[keep]
    excluded["step 0"] = int((rows["step"] <= 0).sum())
    rows = rows[rows["step"] > 0]
    if rows.empty:
        raise DataError(f"law '{law}' needs checkpoints after step 0; the runs have none yet")
    if min_step == "auto":
        min_step = default_min_step(int(rows["step"].max()))
    min_step = int(min_step)
    if min_step < 1:
        raise DataError(f"min_step must be >= 1 (step 0 has no power law); got {min_step}")
    excluded[f"step < {min_step}"] = int((rows["step"] < min_step).sum())
    rows = rows[rows["step"] >= min_step]
    if rows.empty:
        raise DataError(
            f"law '{law}' needs checkpoints at step >= {min_step}; the largest stored step is "
            f"{int(frame['step'].max())}; lower --min-step"
        )
    for col in (*columns, "trainable_params"):
        values = pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float)
        if not np.isfinite(values).any():
            raise DataError(f"law '{law}' needs finite {col} values; all {len(rows)} selected rows are missing/NaN")
    finite = np.ones(len(rows), bool)
    for col in (*columns, "trainable_params"):
        finite &= np.isfinite(pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float))
    excluded["non-finite values"] = int((~finite).sum())
    rows = rows[finite].sort_values(["run_id", "step"]).reset_index(drop=True)
    return Selection(rows, min_step, {k: v for k, v in excluded.items() if v})


@dataclass
class FitData:
    """Arrays of the selected rows, with log P and log N centred (better-conditioned optimisation)."""

    frame: pd.DataFrame
    P: np.ndarray
    N: np.ndarray
    ft: np.ndarray
    f: np.ndarray
    ft0: np.ndarray  # the run's step-0 (base) value of each row, NaN when not stored
    f0: np.ndarray
    run: np.ndarray  # run index per row
    run_ids: list[str]
    lp0: float
    ln0: float
    uP: np.ndarray  # unique centred log P
    iP: np.ndarray
    uN: np.ndarray
    iN: np.ndarray
    kP: np.ndarray  # per distinct (P, N) design point: index into uP
    kN: np.ndarray  # ... and into uN
    point: np.ndarray  # design point of each row (seeds of one rank share points)

    @classmethod
    def from_frame(cls, rows: pd.DataFrame, target: str, ft_column: str) -> FitData:
        P = rows["trainable_params"].to_numpy(dtype=float)
        N = rows["step"].to_numpy(dtype=float)
        nan = np.full(len(rows), np.nan)
        def col(name: str) -> np.ndarray:
            return rows[name].to_numpy(dtype=float) if name in rows else nan

        ft, f = col(ft_column), col(target)
        ft0, f0 = col(base_column(ft_column)), col(base_column(target))
        run_ids, run = np.unique(rows["run_id"].astype(str).to_numpy(), return_inverse=True)
        lp, ln = np.log(P), np.log(N)
        lp0, ln0 = float(lp.mean()), float(ln.mean())
        uP, iP = np.unique(lp - lp0, return_inverse=True)
        uN, iN = np.unique(ln - ln0, return_inverse=True)
        pairs, point = np.unique(np.stack([iP, iN], axis=1), axis=0, return_inverse=True)
        return cls(rows, P, N, ft, f, ft0, f0, run, list(run_ids), lp0, ln0, uP, iP, uN, iN,
                   pairs[:, 0], pairs[:, 1], np.asarray(point).ravel())

    @property
    def n(self) -> int:
        return self.P.size

    def subset(self, mask: np.ndarray, target: str, ft_column: str) -> FitData:
        return FitData.from_frame(self.frame[mask].reset_index(drop=True), target, ft_column)

    def run_strata(self) -> np.ndarray:
        """The P of each run (bootstrap strata)."""
        out = np.zeros(len(self.run_ids))
        out[self.run] = self.P
        return out

    def fingerprint(self, *extra: object) -> str:
        """Identifies the rows (and settings) a fit used, so dependent laws share bootstrap draws."""
        h = hashlib.sha1()
        for r, s in zip(self.frame["run_id"].astype(str), self.frame["step"].astype(int), strict=True):
            h.update(f"{r}:{s};".encode())
        h.update(repr(extra).encode())
        return h.hexdigest()[:16]


def heldout_split(data: FitData) -> tuple[np.ndarray, np.ndarray, str]:
    """Fit on the smaller P and earlier steps, test on the largest P's later steps (`size_step_split`)."""
    return size_step_split(data.P, data.N)


def size_step_split(P: np.ndarray, N: np.ndarray, steps_name: str = "steps") -> tuple[np.ndarray, np.ndarray, str]:
    """Fit on the smaller P and earlier steps, test on the largest P's later steps: the split every law and
    the refusal law (laws/studies/guardrails) are tested on.

    The cut is the median distinct step, or the third when there are fewer than six (the power laws
    need three steps to fit). The split depends on the rows only, so every law is tested on the same
    rows and borrowed constants come from the same held-out fit. Returns (train mask, test mask,
    description); both masks are empty, with the reason as description, when the sweep is too small.
    """
    none = np.zeros(len(P), bool)
    steps = np.unique(N)
    ranks = np.unique(P)
    if ranks.size < 3 or steps.size < 4:
        return none, none, (
            f"no held-out test: needs >= 3 distinct P and >= 4 distinct {steps_name}; got {ranks.size} and {steps.size}"
        )
    p_max = ranks.max()
    n_cut = steps[max(3, int(np.ceil(steps.size / 2))) - 1]
    train = (P < p_max) & (N <= n_cut)
    test = (P == p_max) & (N > n_cut)
    desc = (
        f"fit on P < {p_max:.4g} and N <= {n_cut:g} ({int(train.sum())} rows); "
        f"test on P = {p_max:.4g}, N > {n_cut:g} ({int(test.sum())} rows)"
    )
    return train, test, desc
