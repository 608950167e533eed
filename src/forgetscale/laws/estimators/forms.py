"""The law forms as plain equations: the one place each formula is written.

Fits, forecasts, figures and the paper's table all evaluate these functions, so a constant means
the same thing everywhere. `p` maps a constant's name to a number or to an array that broadcasts
against P and N (a column of bootstrap draws gives a (draws, points) array).

Notation (paper, section 3): P = trainable parameters, N = update steps, L_ft = fine-tuning loss,
L_f = forgetting (CE against the base model, or its KL part).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

Params = Mapping[str, ArrayLike]

# Names of each form's constants, in the order they are printed and stored.
LINEAR = ("c_f_ft", "s_f_ft")
POWER_FT = ("a_ft", "b_ft", "alpha_ft", "beta_ft", "rho", "c_ft", "s_ft")
POWER_F = ("a_f", "b_f", "alpha_f", "beta_f", "rho", "c_ft", "s_ft", "c_f_ft", "s_f_ft")
POWER_JOINT = (
    "a_ft", "b_ft", "alpha_ft", "beta_ft", "a_f", "b_f", "alpha_f", "beta_f", "rho", "c_ft", "s_ft",
    "c_f_ft", "s_f_ft",
)
MULT = ("A", "alpha", "beta", "E")


def _a(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=float)


def power_term(P: ArrayLike, N: ArrayLike, a, b, alpha, beta, rho) -> np.ndarray:
    """((a/P)^alpha + (b/N)^beta)^rho: the shape both power laws share."""
    return ((_a(a) / _a(P)) ** _a(alpha) + (_a(b) / _a(N)) ** _a(beta)) ** _a(rho)


def linear(L_ft: ArrayLike, p: Params) -> np.ndarray:
    """Eq. 4: L_f = -c_f_ft * L_ft + s_f_ft."""
    return -_a(p["c_f_ft"]) * _a(L_ft) + _a(p["s_f_ft"])


def power_ft(P: ArrayLike, N: ArrayLike, p: Params) -> np.ndarray:
    """Eq. 5: L_ft = c_ft * ((a_ft/P)^alpha_ft + (b_ft/N)^beta_ft)^rho + s_ft."""
    term = power_term(P, N, p["a_ft"], p["b_ft"], p["alpha_ft"], p["beta_ft"], p["rho"])
    return _a(p["c_ft"]) * term + _a(p["s_ft"])


def power_f(P: ArrayLike, N: ArrayLike, p: Params) -> np.ndarray:
    """Eq. 6: L_f = -c_f_ft * (c_ft * ((a_f/P)^alpha_f + (b_f/N)^beta_f)^rho + s_ft) + s_f_ft."""
    term = power_term(P, N, p["a_f"], p["b_f"], p["alpha_f"], p["beta_f"], p["rho"])
    return -_a(p["c_f_ft"]) * (_a(p["c_ft"]) * term + _a(p["s_ft"])) + _a(p["s_f_ft"])


def mult_ft(P: ArrayLike, N: ArrayLike, p: Params) -> np.ndarray:
    """Competing form for L_ft (Chinchilla-like, multiplicative): A * P^-alpha * N^-beta + E."""
    return _a(p["A"]) * _a(P) ** -_a(p["alpha"]) * _a(N) ** -_a(p["beta"]) + _a(p["E"])


def mult_f(P: ArrayLike, N: ArrayLike, p: Params) -> np.ndarray:
    """Competing form for L_f: E - A * P^-alpha * N^-beta (forgetting rises towards a ceiling E)."""
    return _a(p["E"]) - _a(p["A"]) * _a(P) ** -_a(p["alpha"]) * _a(N) ** -_a(p["beta"])


def regauge(p: Params, c_ft: float) -> dict[str, np.ndarray]:
    """The same power law written with c_ft fixed to `c_ft` (every prediction is unchanged).

    c * (u + v)^rho == (c k^rho) * (u/k + v/k)^rho for any k > 0, so c_ft trades off exactly with
    a^alpha and b^beta: the data fix only their combination. Fits pin c_ft (the gauge) and compare
    a and b only between constants written in the same gauge.
    """
    out = {k: _a(v) for k, v in p.items()}
    log_k = (np.log(c_ft) - np.log(out["c_ft"])) / out["rho"]
    for a, b, alpha, beta in (("a_ft", "b_ft", "alpha_ft", "beta_ft"), ("a_f", "b_f", "alpha_f", "beta_f")):
        if a in out:
            out[a] = out[a] * np.exp(-log_k / out[alpha])
            out[b] = out[b] * np.exp(-log_k / out[beta])
    out["c_ft"] = np.broadcast_to(_a(c_ft), np.shape(out["c_ft"])).copy()
    return out
