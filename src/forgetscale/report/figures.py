"""The report's figures (matplotlib, Agg). They only evaluate laws already fitted: figures never fit.

Each function takes one group's points (a frame with columns P, N, ft, f, rank, used, test) and its
fitted laws, and returns a Figure. Colours: one per rank (viridis, small to large P).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from forgetscale.laws.estimators import fitting  # noqa: E402
from forgetscale.laws.estimators.base import Law  # noqa: E402

plt.rcParams.update({
    "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9, "figure.dpi": 100,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
})
FT_LABEL = "fine-tuning loss $L_{ft}$ (nats/token)"
FT_LABELS = {"ft_loss": "fine-tuning loss $L_{ft}$, held-out (nats/token)",
             "ft_loss_train": "fine-tuning loss $L_{ft}$, training blocks (nats/token)"}
TARGET_LABEL = {"forget_ce": "forgetting $L_f$ (CE vs base, nats/token)",
                "forget_kl": "forgetting KL(base $\\|$ tuned) (nats/token)"}
STEP_LABEL = "update steps $N$ (log scale)"
OUT = {"ft": ("ft", "$L_{ft}$"), "f": ("f", "$L_f$")}


def colours(points: pd.DataFrame) -> dict[float, tuple]:
    ps = sorted(points["P"].unique())
    cmap = plt.get_cmap("viridis")
    return {p: cmap(0.05 + 0.85 * i / max(1, len(ps) - 1)) for i, p in enumerate(ps)}


def human(p: float) -> str:
    """20.0M, 640M, 1.2B: parameter counts as people write them."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if p >= scale:
            return f"{p / scale:.3g}{unit}"
    return f"{p:.0f}"


def _rank_label(points: pd.DataFrame, p: float) -> str:
    r = points.loc[points["P"] == p, "rank"].iloc[0]
    return f"rank {int(r)} (P = {human(p)})" if pd.notna(r) else f"P = {human(p)}"


def _log_steps(ax) -> None:
    """Log x axis with plain step numbers (50, 100, 200) instead of 10^x labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _legend_below(fig, axes, ncol: int = 4) -> None:
    handles, labels = [], []
    for ax in np.atleast_1d(axes):
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.045 * int(np.ceil(len(labels) / ncol)), 1, 1))


def _line(c: float, s: float) -> str:
    """Eq. 4 as mathtext with its fitted signs: L_f = -c L_ft + s (either constant may be negative)."""
    return (f"$L_f = {'-' if c >= 0 else ''}{abs(c):.3f}\\,L_{{ft}} {'+' if s >= 0 else '-'} {abs(s):.3f}$")


def _band(law: Law, P, N, output: str) -> tuple[np.ndarray, np.ndarray] | None:
    if not len(law.boot_):
        return None
    return fitting.interval(law._predict_draws(law.boot_, P, N, output))


def tradeoff(points: pd.DataFrame, laws: Mapping[str, Law], target: str) -> plt.Figure:
    """L_f against L_ft for every checkpoint, with the Eq. 4 line (the paper's Figure 2)."""
    fig, ax = plt.subplots(figsize=(11, 5.2))
    col = colours(points)
    for p, g in points.groupby("P"):
        used = g[g["used"]]
        ax.scatter(used["ft"], used["f"], s=22, color=col[p], label=_rank_label(points, p), zorder=3)
        early = g[~g["used"]]
        if len(early):
            ax.scatter(early["ft"], early["f"], s=22, facecolors="none", edgecolors=col[p], alpha=0.5, zorder=2)
    if (~points["used"]).any():
        ax.scatter([], [], s=22, facecolors="none", edgecolors="grey", label="not fitted (early step / unfinished)")
    if "linear" in laws:
        law = laws["linear"]
        x = np.linspace(points.loc[points["used"], "ft"].min(), points.loc[points["used"], "ft"].max(), 100)
        c, s = law.params_["c_f_ft"], law.params_["s_f_ft"]
        ax.plot(x, law.predict(x), color="black", lw=2, zorder=4,
                label=f"Eq. 4: {_line(c, s)}  "
                      f"($R^2$ = {law.r2_['f']:.3f})")
        band = _band(law, x, None, "f")
        if band is not None:
            ax.fill_between(x, *band, color="black", alpha=0.15, lw=0, label="95% bootstrap band")
    ax.set_xlabel(FT_LABEL)
    ax.set_ylabel(TARGET_LABEL[target])
    ax.set_title("Forgetting against fine-tuning loss, all checkpoints")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def curves(points: pd.DataFrame, laws: Mapping[str, Law], target: str) -> plt.Figure:
    """L_ft and L_f against N per rank, data as markers, power laws as lines (the paper's Figure 3)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    col = colours(points)
    used = points[points["used"]]
    n_grid = np.geomspace(used["N"].min(), used["N"].max(), 80)
    specs = (("ft", "power_ft", FT_LABEL), ("f", "power_f", TARGET_LABEL[target]))
    for ax, (out, name, ylabel) in zip(axes, specs, strict=True):
        # the axes show the data: a law's curve or band never stretches them (an unidentified law's
        # bootstrap band can span hundreds of nats on a small sweep), and such a law gets no band
        lo, hi = float(used[out].min()), float(used[out].max())
        pad = 0.25 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-3
        ylim = (lo - pad, hi + pad)
        for p, g in points.groupby("P"):
            gu = g[g["used"]]
            ax.scatter(gu["N"], gu[out], s=16, color=col[p], alpha=0.8, zorder=3, label=_rank_label(points, p))
            if name in laws:
                P = np.full_like(n_grid, p)
                ax.plot(n_grid, laws[name].predict(P, n_grid, output=out), color=col[p], lw=1.8, zorder=4)
                band = _band(laws[name], P, n_grid, out) if laws[name].status_.startswith("converged") else None
                if band is not None:
                    ax.fill_between(n_grid, *np.clip(band, *ylim), color=col[p], alpha=0.18, lw=0)
            if "power_joint" in laws:
                P = np.full_like(n_grid, p)
                ax.plot(n_grid, laws["power_joint"].predict(P, n_grid, output=out), color=col[p], lw=1, ls="--")
        _log_steps(ax)
        ax.set_ylim(*ylim)
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{OUT[out][1]} against steps ({'Eq. 5' if out == 'ft' else 'Eq. 6'})")
    axes[0].plot([], [], color="grey", lw=1.8, label="separate fit, 95% mean-curve band (identified laws only)")
    axes[0].plot([], [], color="grey", lw=1, ls="--", label="joint fit")
    _legend_below(fig, axes[:1], ncol=4)
    return fig


def _law_prediction(law: Law, params: Mapping[str, float], pts: pd.DataFrame, out: str) -> np.ndarray:
    row = np.array([[params[k] for k in law.names]])
    if law.name == "linear":
        return law._predict_draws(row, pts["ft"].to_numpy(), None, out)[0]
    return law._predict_draws(row, pts["P"].to_numpy(), pts["N"].to_numpy(), out)[0]


def parity(points: pd.DataFrame, laws: Mapping[str, Law]) -> plt.Figure:
    """Predicted against observed for every law and output; held-out points from the held-out fit."""
    panels = [(name, out) for name, law in laws.items() for out in law.outputs]
    ncol = min(4, len(panels))
    nrow = int(np.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.1 * ncol, 3.9 * nrow), squeeze=False)
    col = colours(points)
    used = points[points["used"]]
    for ax, (name, out) in zip(axes.ravel(), panels, strict=False):
        law = laws[name]
        obs = used[out].to_numpy()
        pred = _law_prediction(law, law.params_, used, out)
        ax.scatter(obs, pred, s=12, c=[col[p] for p in used["P"]], zorder=3)
        if not np.isfinite(pred).any():
            ax.text(0.5, 0.5, "no finite prediction:\n" + law.status_.replace(": ", ":\n", 1), ha="center",
                    va="center", transform=ax.transAxes, fontsize=8, wrap=True, color="#a15c00")
        test = used[used["test"]]
        if law.heldout_params_ is not None and len(test):
            tp = _law_prediction(law, law.heldout_params_, test, out)
            ax.scatter(test[out], tp, s=46, marker="D", facecolors="none", edgecolors="crimson", lw=1.3, zorder=4,
                       label=f"held out (MARE {100 * law.heldout_mare_[out]:.2f}%)")
            ax.legend(loc="lower right", frameon=False)
        lo, hi = np.nanmin(obs), np.nanmax(obs)
        pad = 0.05 * (hi - lo)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=1, zorder=2)
        r2 = law.r2_[out]
        ax.set_title(f"{name}: {OUT[out][1]}   $R^2$ = {r2:.3f}" if np.isfinite(r2) else f"{name}: {OUT[out][1]}")
        ax.set_xlabel(f"observed {OUT[out][1]} (nats)")
        ax.set_ylabel(f"predicted {OUT[out][1]} (nats)")
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


EXTRAPOLATORS = (("power_ft", "power_f", "power, separate", "-"), ("power_joint", "power_joint", "power, joint", "--"),
                 ("mult_ft", "mult_f", "multiplicative", ":"))


def extrapolation(points: pd.DataFrame, laws: Mapping[str, Law], target: str, n_cut: float, p_max: float) -> plt.Figure:
    """Fit on small P and early N, forecast the largest P's later checkpoints, against what was measured."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    big = points[(points["P"] == p_max) & points["used"]]
    n_grid = np.geomspace(points.loc[points["used"], "N"].min(), points["N"].max(), 80)
    P = np.full_like(n_grid, p_max)
    styles = {"power, separate": "tab:blue", "power, joint": "tab:orange", "multiplicative": "tab:green"}
    for ax, out in zip(axes, ("ft", "f"), strict=True):
        ax.axvspan(n_grid[0], n_cut, color="grey", alpha=0.12, lw=0, label="steps seen by the held-out fit")
        for later, g in big.groupby(big["N"] > n_cut):
            ax.scatter(g["N"], g[out], s=24, color="black" if later else "grey", zorder=4,
                       label="measured: forecast target" if later else "measured at this P, not used")
        errors = []
        for ft_name, f_name, form, ls in EXTRAPOLATORS:
            name = ft_name if out == "ft" else f_name
            law = laws.get(name)
            if law is None or law.heldout_params_ is None:
                continue
            row = np.array([[law.heldout_params_[k] for k in law.names]])
            ax.plot(n_grid, law._predict_draws(row, P, n_grid, out)[0], color=styles[form], ls=ls, lw=2,
                    label=f"forecast: {form}")
            errors.append(f"{form}: {100 * law.heldout_mare_[out]:.2f}%")
        ax.text(0.02, 0.03 if out == "ft" else 0.97, "held-out error (MARE)\n" + "\n".join(errors),
                transform=ax.transAxes, va="bottom" if out == "ft" else "top", fontsize=9,
                bbox={"facecolor": "white", "edgecolor": "#cccccc", "alpha": 0.9})
        _log_steps(ax)
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(FT_LABEL if out == "ft" else TARGET_LABEL[target])
        ax.set_title(f"Forecast of {OUT[out][1]} at P = {human(p_max)} from smaller P, N $\\leq$ {n_cut:g}")
    _legend_below(fig, axes, ncol=3)
    return fig


MARKERS = ("s", "^", "D", "v", "P", "X", "*", "h", "<", ">")


def method_styles(points: pd.DataFrame, reference: str) -> dict[str, dict]:
    """Scatter style per method group: the reference LoRA as circles, every other one its own marker and colour."""
    others = [v for v in sorted(points["group"].unique()) if v != reference]
    cmap = plt.get_cmap("tab10")
    styles = {v: {"marker": MARKERS[i % len(MARKERS)], "color": cmap((i + 1) % 10)} for i, v in enumerate(others)}
    styles[reference] = {"marker": "o", "color": None}
    return styles


def _method_scatter(ax, points: pd.DataFrame, reference: str, x: str, y: pd.Series | None = None) -> None:
    """Every checkpoint, one marker per method (LoRA coloured by rank); hollow where no fit used it."""
    styles = method_styles(points, reference)
    ref = points[points["group"] == reference]
    col = colours(ref) if len(ref) else {}
    for group, g in points.groupby("group", sort=True):
        st = styles[group]
        yy = g["f"] if y is None else y.loc[g.index]
        for used, part in ((True, g["used"]), (False, ~g["used"])):
            if not part.any():
                continue
            c = [col[p] for p in g.loc[part, "P"]] if group == reference else [st["color"]] * int(part.sum())
            kw = {"c": c} if used else {"facecolors": "none", "edgecolors": c, "alpha": 0.5}
            ax.scatter(g.loc[part, x], yy[part], s=30 if used else 24, marker=st["marker"], zorder=3, lw=1, **kw)
        if group != reference:
            P = g["P"].unique()
            ptext = human(P[0]) if len(P) == 1 else f"{human(P.min())}-{human(P.max())}"
            ax.scatter([], [], marker=st["marker"], color=st["color"], s=30, label=f"{group} (P = {ptext})")
    for p in sorted(col):
        ax.scatter([], [], marker="o", color=col[p], s=30, label=f"{reference}: {_rank_label(ref, p)}")


def methods_tradeoff(points: pd.DataFrame, reference: str, linear: Law | None, target: str,
                     ft_column: str = "ft_loss") -> plt.Figure:
    """L_f against L_ft for every method, with the Eq. 4 line fitted on the reference LoRA runs only."""
    fig, ax = plt.subplots(figsize=(11, 5.6))
    _method_scatter(ax, points, reference, "ft")
    if linear is not None:
        ref_used = points[(points["group"] == reference) & points["used"]]
        lo, hi = ref_used["ft"].min(), ref_used["ft"].max()
        x_all = np.linspace(min(lo, points["ft"].min()), max(hi, points["ft"].max()), 200)
        inside = (x_all >= lo) & (x_all <= hi)
        c, s = linear.params_["c_f_ft"], linear.params_["s_f_ft"]
        y_all = linear.predict(x_all)
        ax.plot(x_all[inside], y_all[inside], color="black", lw=2, zorder=4,
                label=f"Eq. 4 fitted on {reference}: {_line(c, s)}")
        ax.plot(x_all, y_all, color="black", lw=1.2, ls="--", zorder=4, label="same line outside LoRA's $L_{ft}$ range")
        band = _band(linear, x_all, None, "f")
        if band is not None:
            ax.fill_between(x_all, *band, color="black", alpha=0.12, lw=0, label="95% bootstrap band (LoRA fit)")
    if (~points["used"]).any():
        ax.scatter([], [], s=24, facecolors="none", edgecolors="grey", label="not compared (early step / unfinished)")
    ax.set_xlabel(FT_LABELS.get(ft_column, FT_LABEL))
    ax.set_ylabel(TARGET_LABEL[target])
    ax.set_title("Every method against the linear law fitted on LoRA only")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def methods_parity(points: pd.DataFrame, reference: str, laws: Mapping[str, Law], target: str) -> plt.Figure | None:
    """Observed L_f against the reference LoRA laws' predictions in (P, N), one marker per method."""
    panels = []
    for name in ("power_f", "power_joint", "mult_f"):
        law = laws.get(name)
        if law is not None:
            pred = pd.Series(law.predict(points["P"].to_numpy(), points["N"].to_numpy(), output="f"), index=points.index)
            if np.isfinite(pred).any():
                panels.append((name, pred))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.0), squeeze=False)
    obs = points["f"]
    lo, hi = np.nanmin(obs), np.nanmax(obs)
    for ax, (name, pred) in zip(axes[0], panels, strict=True):
        _method_scatter(ax, points, reference, "f", y=pred)
        lo2, hi2 = min(lo, np.nanmin(pred)), max(hi, np.nanmax(pred))
        pad = 0.04 * (hi2 - lo2)
        ax.plot([lo2 - pad, hi2 + pad], [lo2 - pad, hi2 + pad], color="grey", lw=1, zorder=2)
        status = laws[name].status_
        note = "" if status.startswith("converged") else "\n" + textwrap.fill(textwrap.shorten(status, 96, placeholder="..."), 48)
        ax.set_title(f"{name} fitted on {reference}{note}", fontsize=None if not note else 10)
        ax.set_xlabel(f"observed $L_f$ ({'CE' if target == 'forget_ce' else 'KL'}, nats)")
        ax.set_ylabel("predicted $L_f$ (nats)")
    _legend_below(fig, axes[0][:1], ncol=4)
    return fig
