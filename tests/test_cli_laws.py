"""CLI verbs fit, predict, report and paper-laws: exit codes, one-line errors, files written."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from forgetscale.cli import main
from forgetscale.laws.studies import synthetic

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sweep")
    synthetic.simulate_sweep(run_dir, ranks=(8, 32, 128), seeds=(0, 1), steps=range(20, 201, 20))
    return run_dir


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("forgetscale: ") and "\n" not in err, err
    assert match in err, err


def test_paper_laws_csv_reproduces_the_reference(capsys):
    assert main(["paper-laws", "--csv"]) == 0
    got = pd.read_csv(io.StringIO(capsys.readouterr().out))
    ref = pd.read_csv(DATA / "paper_table1_predictions.csv")
    assert got.shape == ref.shape
    assert (got.select_dtypes("number") - ref.select_dtypes("number")).abs().max().max() <= 1e-6


def test_paper_laws_table_and_constants(capsys):
    assert main(["paper-laws", "--dataset", "news", "--ranks", "8", "--steps", "100"]) == 0
    assert "2.085399" in capsys.readouterr().out
    assert main(["paper-laws", "--constants"]) == 0
    assert "7.6885" in capsys.readouterr().out


def test_predict_before_fit_is_one_line(capsys, sweep):
    _one_line_error(capsys, ["predict", str(sweep), "--rank", "8", "--steps", "100"], "forgetscale fit")


def test_missing_run_dir_is_one_line(capsys, tmp_path):
    for verb in (["fit"], ["predict", "--rank", "8", "--steps", "10"], ["report"]):
        argv = [verb[0], str(tmp_path / "nope"), *verb[1:]]
        _one_line_error(capsys, argv, "nope")


def test_report_without_laws_and_no_fit(capsys, sweep):
    _one_line_error(capsys, ["report", str(sweep), "--no-fit"], "not fitted")


def test_bad_option_is_one_line(capsys, sweep):
    _one_line_error(capsys, ["fit", str(sweep), "--bootstrap", "5"], "n_bootstrap must be")
    _one_line_error(capsys, ["fit", str(sweep), "--laws", "linaer"], "did you mean 'linear'")


def test_fit_then_predict(capsys, sweep):
    assert main(["fit", str(sweep), "--bootstrap", "30", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("power_joint", "95% interval", "held-out forecast", "of KL rise", "Eq. 4 given", "c_ft", "gauge (fixed)", "laws.json"):
        assert text in out
    doc = json.loads((sweep / "laws.json").read_text())
    assert doc["options"]["n_bootstrap"] == 30 and doc["options"]["seed"] == 1
    assert [g["label"] for g in doc["groups"]] == ["openorca / lora"]
    linear = doc["groups"][0]["laws"]["linear"]
    assert linear["min_step"] == 40 and sorted(linear["rows"]) and all(min(s) >= 40 for s in linear["rows"].values())

    assert main(["predict", str(sweep), "--rank", "32", "--steps", "100", "150"]) == 0
    cap = capsys.readouterr()
    assert "power, joint" in cap.out and "N = 150" in cap.out and cap.err == ""

    assert main(["predict", str(sweep), "--params", "5e9", "--steps", "1000"]) == 0
    err = capsys.readouterr().err
    assert "outside the fitted P range" in err and "outside the fitted step range" in err

    _one_line_error(capsys, ["predict", str(sweep), "--rank", "64", "--steps", "100"], "rank 64 was not run")


def test_fit_kl_target(capsys, sweep, tmp_path):
    assert main(["fit", str(sweep), "--target", "forget_kl", "--bootstrap", "20", "--laws", "linear,mult_f"]) == 0
    doc = json.loads((sweep / "laws.json").read_text())
    assert doc["options"]["target"] == "forget_kl" and set(doc["groups"][0]["laws"]) == {"linear", "mult_f"}


def test_fit_settings_are_declared_once():
    """get_params, FitOptions and the flags of `fit` are all read from Law.__init__'s signature."""
    import argparse
    import dataclasses
    import inspect

    from forgetscale.cli.fit import add_option_flags, options_from_args
    from forgetscale.laws import LinearLaw
    from forgetscale.laws.pipeline.fitall import FitOptions

    params = set(inspect.signature(LinearLaw.__init__).parameters) - {"self"}
    assert set(LinearLaw().get_params()) == params
    fields = {f.name for f in dataclasses.fields(FitOptions)}
    assert fields == (params - {"heldout"}) | {"max_step", "laws"}  # heldout is set per fit
    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    assert {a.dest for a in parser._actions} - {"help"} == fields - {"gauge_c_ft"}  # the gauge has no flag
    args = parser.parse_args(["--bootstrap", "30", "--min-step", "5", "--laws", "linear, power_ft",
                              "--include-unfinished", "--target", "forget_kl"])
    assert options_from_args(args) == FitOptions(n_bootstrap=30, min_step=5, laws=("linear", "power_ft"),
                                                 include_unfinished=True, target="forget_kl")
    assert options_from_args(parser.parse_args([])) == FitOptions()
