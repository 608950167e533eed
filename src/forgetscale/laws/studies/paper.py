"""The paper's published constants (arXiv 2401.05605, Table 1) and what they predict.

These are published numbers copied from the paper, not fitted by us: they let users set their own
fits beside the paper's (`forgetscale paper-laws`, the report's comparison table). Valid for
Llama 2 7B chat, LoRA on all linear modules with rsLoRA scaling, and N >= 50.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from forgetscale.errors import UnknownNameError, did_you_mean
from forgetscale.laws.estimators import forms

SOURCE = (
    "arXiv 2401.05605 Table 1 (Llama 2 7B chat, LoRA on all linear modules, rsLoRA scaling); "
    "P = raw count of trainable parameters, N = update steps; valid for N >= 50"
)
P_PER_RANK = 2_498_560  # LoRA on q,k,v,o,gate,up,down of Llama 2 7B: trainable parameters per unit rank
RANKS = (8, 16, 32, 64, 128, 256)
STEPS = (50, 75, 100, 150, 200, 260)
MIN_STEP = 50

LINEAR_R2 = {"openorca": 0.945, "news": 0.9736}
POWER_F_R2 = {"openorca": 0.9598, "news": 0.9769}

CONSTANTS: dict[str, dict[str, float]] = {
    "openorca": {
        "a_f": 388000.0, "a_ft": 7000.0, "b_f": 23.6418, "b_ft": 72.9186, "c_ft": 0.002,
        "c_f_ft": 1.7334, "s_ft": 0.6126, "s_f_ft": 2.0481, "alpha_f": 0.0351, "alpha_ft": 0.0424,
        "beta_f": 0.1468, "beta_ft": 0.1219, "rho": 7.6885,
    },
    "news": {
        "a_f": 11000.0, "a_ft": 22000.0, "b_f": 97.8466, "b_ft": 54.8678, "c_ft": 0.0028,
        "c_f_ft": 1.0615, "s_ft": 1.9253, "s_f_ft": 3.1285, "alpha_f": 0.0458, "alpha_ft": 0.0383,
        "beta_f": 0.1044, "beta_ft": 0.1161, "rho": 7.5996,
    },
}

PREDICTION_COLUMNS = (
    "dataset", "rank", "trainable_params", "step", "ft_loss_eq5", "forgetting_eq6", "forgetting_eq4_of_eq5",
)


def constants(dataset: str) -> dict[str, float]:
    """The 13 published constants of one dataset ('openorca' or 'news')."""
    if dataset not in CONSTANTS:
        raise UnknownNameError(did_you_mean("paper dataset", dataset, list(CONSTANTS)))
    return dict(CONSTANTS[dataset])


def match_dataset(name: str) -> str | None:
    """The paper dataset a sweep's dataset spec refers to, if any ('Open-Orca/OpenOrca' -> 'openorca')."""
    low = name.lower().replace("-", "").replace("_", "")
    for key in CONSTANTS:
        if key in low:
            return key
    return None


def predictions(
    datasets: Sequence[str] = ("openorca", "news"),
    ranks: Sequence[int] = RANKS,
    steps: Sequence[int] = STEPS,
    p_per_rank: int = P_PER_RANK,
) -> pd.DataFrame:
    """What the constants predict on a (rank, step) grid: Eq. 5, Eq. 6 and Eq. 4 applied to Eq. 5."""
    rows = []
    for dataset in datasets:
        p = constants(dataset)
        for rank in ranks:
            P = p_per_rank * int(rank)
            for step in steps:
                ft = float(forms.power_ft(P, step, p))
                rows.append({
                    "dataset": dataset, "rank": int(rank), "trainable_params": P, "step": int(step),
                    "ft_loss_eq5": ft,
                    "forgetting_eq6": float(forms.power_f(P, step, p)),
                    "forgetting_eq4_of_eq5": float(forms.linear(ft, p)),
                })
    return pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))


def in_gauge(dataset: str, c_ft: float) -> dict[str, float]:
    """The constants rewritten with c_ft pinned to our fits' gauge, so a and b compare like for like."""
    return {k: float(np.asarray(v)) for k, v in forms.regauge(constants(dataset), c_ft).items()}
