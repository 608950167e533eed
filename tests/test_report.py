"""The report: a self-contained page with every figure, extensible by registered sections."""

from __future__ import annotations

import re

import pytest

from forgetscale.cli import main
from forgetscale.laws.pipeline.fitall import FitOptions
from forgetscale.laws.studies import synthetic
from forgetscale.report import SECTIONS, build_report, register_section

FIGURES = ("tradeoff", "curves", "parity", "extrapolation")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report")
    synthetic.simulate_sweep(run_dir, datasets=("openorca", "news"), ranks=(8, 32, 128), seeds=(0, 1),
                             steps=range(20, 201, 20))
    assert main(["fit", str(run_dir), "--bootstrap", "20"]) == 0

    @register_section("test_extra", "Extra section from a plug-in", 65)
    def extra(ctx):
        return f"<p>plug-in saw {len(ctx.laws['groups'])} groups</p>"

    try:
        path, notes = build_report(run_dir)
    finally:
        SECTIONS._items.pop("test_extra")
    return run_dir, path, notes, path.read_text()


def test_page_embeds_every_figure(report):
    run_dir, path, notes, page = report
    assert path == run_dir / "report.html" and notes == []
    for group in ("openorca-lora", "news-lora"):
        for fig in FIGURES:
            assert (run_dir / "figures" / f"{group}_{fig}.png").stat().st_size > 10_000
            assert re.search(rf'<img src="data:image/png;base64,[A-Za-z0-9+/=]{{1000,}}"[^>]*data-figure="{group}_{fig}"',
                             page), (group, fig)


def test_page_needs_no_network(report):
    page = report[3]
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<script" not in page


def test_page_has_tables_config_and_plugin_section(report):
    page = report[3]
    for text in ("Fitted constants (95% intervals) beside the paper", "paper: openorca", "paper: news",
                 "Rows used", "sweep_config", "&quot;simulated&quot;: true", "plug-in saw 2 groups",
                 "held-out error", "gauge"):
        assert text in page, text
    assert page.index("Extrapolation") < page.index("Extra section from a plug-in") < page.index("Rows used")


def test_report_fits_when_laws_are_missing(tmp_path):
    synthetic.simulate_sweep(tmp_path, ranks=(8, 64), seeds=(0, 1), steps=range(20, 101, 20))
    path, notes = build_report(tmp_path, options=FitOptions(n_bootstrap=20))
    assert any("laws.json was missing" in n for n in notes)
    assert (tmp_path / "laws.json").exists() and path.exists()
