"""The report is a list of sections; any module (builtin.py, evals.py, mitigations.py, a user plug-in) can add one.

A section is a builder `(ReportContext) -> str | None` returning an HTML fragment (None: nothing to
show for this sweep), registered with an order number in SECTIONS. The report calls every
registered section in order; figures go through `ctx.figure(...)`, which writes
RUN_DIR/figures/<name>.png and returns an <img> tag with the PNG embedded, so the page needs no
network and no neighbouring files. Built-in sections use orders 10-90 (see report/builtin.py).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from forgetscale.registry import Registry


@dataclass
class ReportContext:
    """What a section can read: the fitted laws, the stored rows, the sweep config, and a figure sink."""

    run_dir: Path
    laws: dict[str, Any]  # laws.json
    frame: pd.DataFrame  # Store.frame()
    sweep_config: str | None
    stale: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    @property
    def figures_dir(self) -> Path:
        return self.run_dir / "figures"

    def figure(self, name: str, fig: Any, alt: str) -> str:
        """Save a matplotlib figure as figures/<name>.png and return an <img> tag embedding it."""
        import matplotlib.pyplot as plt

        self.figures_dir.mkdir(parents=True, exist_ok=True)
        width = int(fig.get_size_inches()[0] * 100)  # same scale for every figure: fonts match across the page
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
        plt.close(fig)
        data = buf.getvalue()
        path = self.figures_dir / f"{name}.png"
        path.write_bytes(data)
        self.figures.append(path)
        b64 = base64.b64encode(data).decode("ascii")
        return (f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}" style="width:{width}px" '
                f'data-figure="{html.escape(name)}">')

    def config(self) -> dict[str, Any] | None:
        if not self.sweep_config:
            return None
        try:
            return json.loads(self.sweep_config)
        except json.JSONDecodeError:
            return None


@dataclass(frozen=True)
class Section:
    title: str
    order: float
    build: Callable[[ReportContext], str | None]


SECTIONS: Registry[Section] = Registry("report section")


def register_section(name: str, title: str, order: float):
    """Decorator: register `build(ctx) -> html | None` as a report section."""

    def deco(build: Callable[[ReportContext], str | None]):
        SECTIONS.add(name, Section(title, order, build))
        return build

    return deco


def ordered() -> list[tuple[str, Section]]:
    return sorted(((n, SECTIONS.get(n)) for n in SECTIONS.names()), key=lambda x: (x[1].order, x[0]))


def table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """An HTML table; cells are escaped unless they are already markup (wrapped in Markup)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Markup(str):
    """A string that table() inserts without escaping."""


def _cell(c: Any) -> str:
    return c if isinstance(c, Markup) else html.escape(str(c))
