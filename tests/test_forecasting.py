"""Forecasts a user can bet on (issue 13): honest intervals, errors in the units that matter, `plan`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from forgetscale.cli import main
from forgetscale.laws.estimators import forms
from forgetscale.laws.pipeline import plan
from forgetscale.laws.pipeline.fitall import FitOptions, fit_group
from forgetscale.laws.studies import coverage, paper, synthetic


def _sim(ranks=(8, 32, 128), seeds=(0,), noise=0.004, **kw) -> pd.DataFrame:
    return synthetic.simulate_frame(paper.in_gauge("openorca", 0.002), ranks=ranks, seeds=seeds,
                                    steps=range(20, 261, 20), noise=noise, **kw)


@pytest.mark.parametrize("ranks, seeds, why", [
    ((8, 32), (0,), "too few runs (2; intervals need >= 3)"),
    ((8, 32, 128), (0,), "too few distinct resamples (7 of 200 from 3 runs"),
])
def test_small_sweeps_give_no_interval_rather_than_a_false_one(ranks, seeds, why):
    fitted, failed = fit_group(_sim(ranks, seeds), FitOptions(n_bootstrap=200, laws=("linear", "power_ft", "mult_f")))
    assert not failed
    for law in fitted.values():
        assert f"no intervals: {why}" in law.status_, law.status_
        assert all(np.isnan(lo) and np.isnan(hi) for lo, hi in law.ci_.values())
        lo, hi = law.predict_interval([2.5e7] if law.name == "linear" else 2e7, 100, kind="new_run")
        assert np.isnan(lo).all() and np.isnan(hi).all()
    # four runs: intervals again, of non-zero width
    law = fit_group(_sim((8, 16, 32, 128)), FitOptions(n_bootstrap=200, laws=("mult_f",)))[0]["mult_f"]
    assert "no intervals" not in law.status_ and law.bootstrap_["distinct"] >= 10
    lo, hi = law.predict_interval(4e7, 100)
    assert hi[0] > lo[0]


def test_new_run_interval_is_wider_than_the_mean_curves_and_both_are_stored(tmp_path):
    synthetic.write_store(tmp_path, _sim((8, 16, 32, 64, 128), seeds=(0, 1)))
    assert main(["fit", str(tmp_path), "--bootstrap", "200", "--laws", "linear,power_ft,mult_f"]) == 0
    doc = json.loads((tmp_path / "laws.json").read_text())
    law = doc["groups"][0]["laws"]["mult_f"]
    assert law["noise"]["f"]["sd"] > 0 and law["noise"]["f"]["space"] == "log"
    assert doc["groups"][0]["laws"]["linear"]["noise"]["f"]["space"] == "nats"
    from forgetscale.laws.pipeline import forecast

    table = forecast.forecast(doc["groups"][0], 8e7, 150)
    assert ((table["pi_hi"] - table["pi_lo"]) > (table["hi"] - table["lo"])).all()


def test_heldout_errors_are_in_nats_and_relative_to_the_kl_rise(tmp_path):
    frame = _sim((8, 16, 32, 64, 128), seeds=(0,))
    frame["forget_ce"] += 3.0  # a base entropy of 3.2 nats, as on real text; the KL rise is unchanged
    synthetic.write_store(tmp_path, frame)
    assert main(["fit", str(tmp_path), "--bootstrap", "0", "--laws", "linear,power_ft,power_f,mult_ft,mult_f"]) == 0
    check = json.loads((tmp_path / "laws.json").read_text())["groups"][0]["forecast_check"]
    by_form = {(r["form"], r["output"]): r for r in check["forms"]}
    given = by_form[("Eq. 4 given measured L_ft", "f")]
    assert given["given_ft"] and not by_form[("linear of power_ft", "f")]["given_ft"]
    assert ("baseline: nearest fitted checkpoint", "f") in by_form
    test = frame[(frame["rank"] == 128) & (frame["step"] > 160)]  # the held-out split of this design
    kl = float((test["forget_ce"] - 3.2).mean())
    for r in check["forms"]:
        if r["output"] == "f":
            assert r["rise"] == pytest.approx(r["mae"] / kl, rel=1e-9)
            # the base entropy (3 nats) makes the error relative to L_f look ~an order of magnitude smaller
            assert r["mare"] < r["rise"] / 3


def test_hard_ce_can_be_fitted(tmp_path, capsys):
    synthetic.write_store(tmp_path, _sim((8, 16, 32, 64)))
    assert main(["fit", str(tmp_path), "--target", "forget_ce_hard", "--bootstrap", "50", "--laws", "linear"]) == 0
    doc = json.loads((tmp_path / "laws.json").read_text())
    assert doc["options"]["target"] == "forget_ce_hard"
    assert doc["groups"][0]["laws"]["linear"]["settings"]["target"] == "forget_ce_hard"


def test_plan_on_the_paper_constants_is_the_frontier_paper_laws_implies():
    p = paper.constants("openorca")
    goal = plan.Goal(ft=0.70)
    table = plan.options(lambda P, N: forms.power_ft(P, N, p), lambda P, N: forms.power_f(P, N, p),
                             [(r, float(paper.P_PER_RANK * r)) for r in paper.RANKS], goal,
                             min_step=paper.MIN_STEP, max_steps=2000)
    assert table["feasible"].all()
    grid = paper.predictions(["openorca"], paper.RANKS, sorted(set(table["N"]) | set(table["N"] - 1)))
    for r in table.itertuples():
        at = grid[(grid["rank"] == r.rank) & (grid["step"] == r.N)].iloc[0]
        before = grid[(grid["rank"] == r.rank) & (grid["step"] == r.N - 1)].iloc[0]
        assert at["ft_loss_eq5"] <= 0.70 < before["ft_loss_eq5"]  # the fewest steps that reach the goal
        assert r.f == pytest.approx(at["forgetting_eq6"], abs=1e-12)
    # larger ranks need fewer steps, and at matched L_ft forgetting hardly differs (the paper's point)
    assert list(table["N"]) == sorted(table["N"], reverse=True)
    assert np.ptp(table["f"]) < 0.002
    # with a budget below every option's forgetting, nothing is feasible
    tight = plan.options(lambda P, N: forms.power_ft(P, N, p), lambda P, N: forms.power_f(P, N, p),
                             [(8, 8.0 * paper.P_PER_RANK)], plan.Goal(ft=0.70, forget=0.5), min_step=50,
                             max_steps=2000)
    assert not tight["feasible"].any()


def test_plan_on_a_fitted_sweep_recovers_the_paper_plan(tmp_path, capsys):
    synthetic.write_store(tmp_path, synthetic.simulate_frame(
        paper.in_gauge("openorca", 0.002), ranks=paper.RANKS, seeds=(0, 1), steps=range(50, 261, 10),
        noise=0.0005, run_noise=0.0))
    assert main(["fit", str(tmp_path), "--bootstrap", "100", "--laws", "power_ft,power_f"]) == 0
    doc = json.loads((tmp_path / "laws.json").read_text())
    table, choice, warnings = plan.plan(doc["groups"][0], plan.Goal(ft=0.70), form="power, separate",
                                          ranks=[16, 64, 256])
    p = paper.constants("openorca")
    want = plan.options(lambda P, N: forms.power_ft(P, N, p), lambda P, N: forms.power_f(P, N, p),
                            [(r, float(paper.P_PER_RANK * r)) for r in (16, 64, 256)], plan.Goal(ft=0.70),
                            min_step=50, max_steps=1040)
    np.testing.assert_allclose(table["N"], want["N"], rtol=0.05)
    np.testing.assert_allclose(table["f"], want["f"], atol=0.005)
    assert (table["f_lo"] <= table["f"]).all() and (table["f"] <= table["f_hi"]).all()
    capsys.readouterr()
    assert main(["plan", str(tmp_path), "--ft-goal", "0.70", "--forget-budget", "0.9", "--ranks", "16", "64"]) == 0
    out = capsys.readouterr().out
    assert "frontier" in out and "new run" in out


@pytest.mark.parametrize("argv, match", [
    (["plan", "--paper", "openorca"], "give --ft-goal, --forget-budget or both"),
    (["plan", "--paper", "openorca", "--ft-goal", "-1"], "--ft-goal must be a finite number of nats > 0"),
    (["plan"], "give RUN_DIR or --paper DATASET"),
])
def test_plan_bad_input_is_one_line(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("forgetscale: ") and "\n" not in err and match in err, err


def test_new_run_intervals_cover_fresh_runs_near_nominal():
    """Stated tolerance: over 40 simulated 3-seed sweeps, the 95% new-run interval of an in-range
    forecast holds a fresh run's value at least 85% of the time (binomial sd at 95% is 3.4 points)."""
    design = dataclasses.replace(coverage.DESIGNS["3 seeds, in range"], ranks=(8, 32, 128), pilot_ranks=(8, 32, 128),
                                 steps=tuple(range(20, 261, 40)), target=(32, 180), laws=("mult_ft", "mult_f"))
    runs = pd.concat([coverage.replicate(design, s, n_bootstrap=100) for s in range(40)])
    got = runs.groupby("output")["new_run_covered"].mean()
    assert (got >= 0.85).all(), got


def test_pilot_fit_then_score_against_a_later_run(tmp_path, capsys):
    """The forecasting workflow: fit a pilot's first steps (--max-step), forecast a run made later, score it."""
    truth = paper.in_gauge("openorca", 0.002)
    pilot, target = tmp_path / "pilot", tmp_path / "target"
    synthetic.write_store(pilot, synthetic.simulate_frame(truth, ranks=(8, 16, 32, 64), seeds=(0,),
                                                          steps=range(10, 261, 10), noise=0.004, seed=1))
    synthetic.write_store(target, synthetic.simulate_frame(truth, ranks=(128,), seeds=(9,), steps=(150, 260),
                                                           noise=0.004, seed=2))
    assert main(["fit", str(pilot), "--max-step", "100", "--bootstrap", "100", "--laws", "linear,power_ft,mult_ft,mult_f"]) == 0
    doc = json.loads((pilot / "laws.json").read_text())
    assert doc["options"]["max_step"] == 100
    assert all(max(s) <= 100 for s in doc["groups"][0]["laws"]["linear"]["rows"].values())
    capsys.readouterr()
    assert main(["predict", str(pilot), "--against", str(target)]) == 0
    cap = capsys.readouterr()
    assert "results.sqlite changed" not in cap.err  # rows beyond --max-step do not make the fit stale
    assert "P=3.198e+08 is outside the fitted P range" in cap.err
    assert "multiplicative" in cap.out and "covered" in cap.out
    from forgetscale.laws.pipeline import forecast
    from forgetscale.store import Store

    with Store(target, create=False) as store:
        scored = forecast.against(doc["groups"][0], store.frame())
    f = scored[(scored["form"] == "multiplicative") & (scored["output"] == "f")]
    assert list(f["N"]) == [150.0, 260.0]
    rise = f["measured"] - 0.2  # the simulated base entropy
    np.testing.assert_allclose(f["share_of_change"], f["error"] / rise, rtol=1e-9)
