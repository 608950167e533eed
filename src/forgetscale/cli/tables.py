"""Terminal tables (rich) of stored rows: the sweep summary and the eval summaries (printed by sweep,
demo and eval). The tables of laws.json (fit, predict, paper-laws) stay in those verbs' modules."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from forgetscale.formatting import cell
from forgetscale.mitigations import stored_arm_label


def print_summary(store, console: Console | None = None) -> None:
    """Per run and checkpoint: rank, P, step, fine-tuning loss, forgetting CE, KL; then where results are."""
    console = console or Console(width=None if sys.stdout.isatty() else 130)
    runs = {r["run_id"]: r for r in store.runs()}
    table = Table(title="forgetting sweep", show_lines=False)
    for col in ("method", "rank", "seed", "params P", "step", "L_ft held-out", "L_ft train", "forget CE", "KL", "status"):
        table.add_column(col, justify="right" if col not in ("method", "status") else "left")
    rows = store.checkpoints()
    order = sorted(rows, key=lambda c: (runs[c["run_id"]]["method"], runs[c["run_id"]]["rank"] or 0,
                                        stored_arm_label(runs[c["run_id"]]), runs[c["run_id"]]["seed"],
                                        c["step"]))
    previous = None
    for row in order:
        run = runs[row["run_id"]]
        first = row["run_id"] != previous
        if first and previous is not None:
            table.add_section()
        previous = row["run_id"]
        arm = stored_arm_label(run)
        table.add_row((run["method"] + (f"-{arm}" if arm else "")) if first else "", cell(run["rank"]) if first else "", cell(run["seed"]) if first else "",
                      cell(run["trainable_params"]) if first else "", str(row["step"]), cell(row["ft_loss"]),
                      cell(row["ft_loss_train"]), cell(row["forget_ce"]), cell(row["forget_kl"], 5),
                      run["status"] if first else "")
    console.print(table)
    failed = [r for r in runs.values() if r["status"] == "failed"]
    for run in failed:
        console.print(f"[red]failed[/red] {run['method']} rank {run['rank']} seed {run['seed']}: {run['error']}")
    console.print(f"results: {store.path} ({len(rows)} checkpoint rows, {len(runs)} runs)")


def _rate(value: float | None, lo: float | None, hi: float | None, k: int | None, n: int) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({k}/{n})"


def print_eval_summary(summaries: list[dict], labels: dict[str, str], console: Console | None = None) -> None:
    """One table per suite: each metric of the base and of every evaluated checkpoint, with 95% intervals."""
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    for suite in sorted({s["suite"] for s in summaries}):
        table = Table(title=f"eval: {suite}", title_justify="left")
        for col in ("protocol", "metric", "model", "rate [95% CI] (k/n)", "vs base [95% CI]"):
            table.add_column(col)
        rows = [s for s in summaries if s["suite"] == suite]
        rows.sort(key=lambda s: (s["protocol"], s["metric"], s["model_key"] != "base",
                                 labels.get(s["run_id"], s["model_key"]), s["step"] or 0))
        previous = None
        for s in rows:
            if previous is not None and (s["protocol"], s["metric"]) != previous:
                table.add_section()
            previous = (s["protocol"], s["metric"])
            model = "base" if s["model_key"] == "base" else f"{labels.get(s['run_id'], s['run_id'])} @ {s['step']}"
            vs = "-"
            if s.get("vs_base") is not None:
                tag = "[dim](noise)[/dim]" if s["within_noise"] else "[bold]outside noise[/bold]"
                vs = f"{100 * s['vs_base']:+.1f} pts [{100 * s['vs_base_lo']:+.1f}, {100 * s['vs_base_hi']:+.1f}] {tag}"
            table.add_row(s["protocol"], s["metric"], model, _rate(s["value"], s["lo"], s["hi"], s["k"], s["n"]), vs)
        console.print(table)
