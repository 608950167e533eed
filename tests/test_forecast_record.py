"""The form `plan` and `predict` use comes from the forecasting benchmark's record (issue 32), on planted
records and planted stores: the rule, the 'not reliable' statement and the pilot compute it needs."""

from __future__ import annotations

import json

import pytest

from forgetscale.cli import main
from forgetscale.laws.pipeline import plan, record
from forgetscale.laws.studies import paper, synthetic


def _entry(err: float, cov: float, n: int = 16) -> dict:
    return {"n": n, "median_abs_kl": err, "coverage_kl": cov}


PLANTED = {
    "source": "planted",
    "budgets": [
        {"label": "10%", "budget": 0.10, "forms": {"multiplicative": _entry(0.30, 0.9),
                                                    "power, separate": _entry(0.50, 0.9)}},
        {"label": "25%", "budget": 0.25, "forms": {"multiplicative": _entry(0.08, 0.9),
                                                    "power, separate": _entry(0.04, 0.5),  # narrow but wrong
                                                    "linear of power_ft": _entry(0.09, 0.85)}},
    ],
}
USABLE = ["power, separate", "linear of power_ft", "multiplicative"]


def test_reliable_form_with_the_smallest_error_wins_at_the_budget_reached():
    choice = record.select(PLANTED, USABLE, pilot=30, target_steps=100)  # a 30% pilot reaches the 25% budget
    assert choice.form == "multiplicative" and choice.reliable and choice.budget == 0.25
    assert "8.0%" in choice.reason and "over 16 forecasts" in choice.reason and "covered 90% of them" in choice.reason
    # power, separate has the smallest error but its intervals covered 50%: not reliable, not chosen
    without = record.select(PLANTED, ["power, separate", "linear of power_ft"], pilot=30, target_steps=100)
    assert without.form == "linear of power_ft" and without.reliable
    # a form whose fits sometimes gave no finite forecast is not reliable, however small its error
    broken = json.loads(json.dumps(PLANTED))
    broken["budgets"][1]["forms"]["power, joint"] = {**_entry(0.01, 1.0), "missing": 1}
    assert record.select(broken, [*USABLE, "power, joint"], pilot=30, target_steps=100).form == "multiplicative"


def test_below_a_reliable_budget_it_says_so_and_how_much_more_pilot_is_needed():
    choice = record.select(PLANTED, USABLE, pilot=12, target_steps=100)  # 12%: the 10% budget, none reliable
    assert not choice.reliable and choice.budget == 0.10
    assert choice.form == "multiplicative"  # still the best at that budget, named
    assert choice.needed_share == 0.25 and choice.more_steps == pytest.approx(13)
    assert choice.reason.startswith("NOT RELIABLE") and "25% pilot" in choice.reason and "13 more" in choice.reason
    tiny = record.select(PLANTED, USABLE, pilot=5, target_steps=100)  # below every benchmarked budget
    assert not tiny.reliable and tiny.budget is None and tiny.more_steps == pytest.approx(20)
    assert "below the smallest benchmarked budget (10%)" in tiny.reason


def test_no_reliable_form_at_any_budget_is_stated():
    choice = record.select(PLANTED, ["power, separate"], pilot=50, target_steps=100)
    assert not choice.reliable and choice.needed_share is None
    assert "50.0% of the run's compute (larger pilots were not benchmarked)" in choice.reason
    assert "no benchmarked budget (up to 25%) gave a reliable form" in choice.reason


def test_a_reliable_form_from_a_pilot_beyond_every_budget_says_that_budget_was_not_benchmarked():
    choice = record.select(PLANTED, USABLE, pilot=50, target_steps=100)  # 50%: the 25% record decides
    assert choice.reliable and choice.budget == 0.25
    assert "50.0% of the run's compute (larger pilots were not benchmarked) (rule:" in choice.reason
    assert "(larger pilots" not in record.select(PLANTED, USABLE, pilot=25, target_steps=100).reason


@pytest.fixture
def fitted(tmp_path):
    frame = synthetic.simulate_frame(paper.in_gauge("openorca", 0.002), ranks=(8, 16, 32, 64), seeds=(0,),
                                     steps=range(20, 101, 20), noise=0.002)
    synthetic.write_store(tmp_path, frame)
    assert main(["fit", str(tmp_path), "--bootstrap", "20", "--laws", "linear,power_ft,power_f,mult_ft,mult_f"]) == 0
    return tmp_path


def test_pilot_compute_is_the_fitted_runs_last_steps(fitted):
    group = json.loads((fitted / "laws.json").read_text())["groups"][0]
    assert record.pilot_steps(group) == 4 * 100


def test_plan_and_predict_state_the_form_and_why(fitted, monkeypatch, capsys):
    monkeypatch.setattr(record, "load", lambda path=None: PLANTED)
    capsys.readouterr()
    # the pilot: 4 runs x 100 steps; the longest option is at most 4 x 100 steps, so the share is >= 100%
    assert main(["plan", str(fitted), "--ft-goal", "0.75", "--ranks", "16", "64"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(form: multiplicative;" in out and "form: multiplicative: on the forecasting benchmark" in out
    assert "at a 25% pilot budget its median KL-rise error was 8.0%" in out
    assert main(["predict", str(fitted), "--rank", "64", "--steps", "4000"]) == 0  # 400 / 4000 = 10%
    out = " ".join(capsys.readouterr().out.split())
    assert "form for N = 4000: NOT RELIABLE" in out and "about 600 more pilot steps" in out
    assert "rule's" in out  # the chosen form's row is marked (the note column may wrap)


def test_plan_without_a_record_falls_back_to_the_pilots_held_out_check(fitted, monkeypatch):
    monkeypatch.setattr(record, "load", lambda path=None: None)
    group = json.loads((fitted / "laws.json").read_text())["groups"][0]
    _, choice, _ = plan.plan(group, plan.Goal(ft=0.75), ranks=[16])
    assert choice.form == plan.best_form(group) and "own held-out split" in choice.reason


def test_the_shipped_record_is_the_benchmarks_and_names_known_forms():
    shipped = record.load()
    assert shipped is not None
    assert {(r["model"], r["dataset"]) for r in shipped} == {("smollm2-135m-instruct", "embedded:news"),
                                                             ("smollm2-135m-instruct", "embedded:sharegpt"),
                                                             ("gemma3-270m", "embedded:news")}
    for rec in shipped:
        assert "forecast_bench.py" in rec["source"]
        assert [b["label"] for b in rec["budgets"]] == ["10%", "20%"]
        for b in rec["budgets"]:
            assert set(b["forms"]) <= set(plan.FORMS) and b["forms"]
            for e in b["forms"].values():
                assert e["n"] >= 1 and 0 <= e["median_abs_kl"]
                assert e["coverage_kl"] is None or 0 <= e["coverage_kl"] <= 1


def _design(name: str, dataset: str, model: str, mult: tuple[float, float], power: tuple[float, float]) -> dict:
    rec = json.loads(json.dumps(PLANTED))
    rec.update(design=name, dataset=dataset, model=model, source=name)
    rec["budgets"][1]["forms"] = {"multiplicative": _entry(*mult), "power, separate": _entry(*power)}
    return rec


NEWS = _design("small-news", "embedded:news", "small", mult=(0.08, 0.9), power=(0.20, 0.9))
CHAT = _design("small-chat", "embedded:chat", "small", mult=(0.40, 0.0), power=(0.06, 0.95))
BIG_NEWS = _design("big-news", "embedded:news", "big", mult=(0.30, 0.9), power=(0.05, 0.9))


def test_the_record_of_the_sweeps_own_data_and_model_is_used():
    rec, note = record.for_data([NEWS, CHAT, BIG_NEWS], "embedded:chat", ["small"])
    assert rec is CHAT and note == "record of design small-chat: same data, same model"
    assert record.select(rec, USABLE, pilot=30, target_steps=100).form == "power, separate"
    rec, note = record.for_data([NEWS, CHAT, BIG_NEWS], "embedded:news", ["big"])
    assert rec is BIG_NEWS and "same model" in note
    rec, note = record.for_data([NEWS, CHAT], "embedded:news", ["other"])  # same data, another model
    assert rec is NEWS and "model small" in note
    # two designs on this data, neither with this model: held to the worse of the two
    rec, note = record.for_data([NEWS, CHAT, BIG_NEWS], "embedded:news", ["other"])
    assert "no benchmark ran on this model on embedded:news" in note and "small-news, big-news" in note
    assert rec["budgets"][1]["forms"]["multiplicative"]["median_abs_kl"] == 0.30
    assert record.for_data(PLANTED, "anything", []) == (PLANTED, "")  # a record without a design applies anywhere


def test_on_data_no_design_ran_every_form_is_held_to_its_worst_record():
    rec, note = record.for_data([NEWS, CHAT], "my-own.jsonl", ["small"])
    assert "no benchmark ran on my-own.jsonl" in note and "small-news, small-chat" in note
    at25 = rec["budgets"][1]["forms"]
    assert at25["multiplicative"]["median_abs_kl"] == 0.40 and at25["multiplicative"]["coverage_kl"] == 0.0
    assert at25["power, separate"]["median_abs_kl"] == 0.20 and at25["power, separate"]["n"] == 32
    # reliable on each dataset alone, but no form is reliable on both: NOT RELIABLE, the least bad named
    choice = record.select(rec, USABLE, pilot=30, target_steps=100)
    assert not choice.reliable and choice.form == "power, separate"


def test_plan_uses_the_record_of_the_fitted_data(fitted, monkeypatch):
    group = json.loads((fitted / "laws.json").read_text())["groups"][0]
    chat = {**CHAT, "dataset": group["key"]["dataset"]}
    monkeypatch.setattr(record, "load", lambda path=None: [NEWS, chat])
    _, choice, _ = plan.plan(group, plan.Goal(ft=0.75), ranks=[16])
    assert choice.form == "power, separate" and "(record of design small-chat: same data, model small)" in choice.reason


def test_the_benchmark_installs_a_design_by_replacing_its_old_record(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "forecast_bench.py"
    spec = importlib.util.spec_from_file_location("forecast_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shipped = tmp_path / "forecast_record.json"
    bench.install([NEWS, CHAT], shipped)
    again = {**NEWS, "source": "rerun"}
    bench.install([again], shipped)
    assert [(r["design"], r["source"]) for r in record.load(shipped)] == [("small-news", "rerun"),
                                                                          ("small-chat", "small-chat")]
