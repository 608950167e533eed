"""Guardrails lost (issue 27, item 3): the refusal law recovers planted constants from simulated binomial
curves, says "too few points" / "too few runs" where it must, is written to laws.json and printed by fit,
and the report's "Guardrails lost" section appears with its figures only when safety summaries exist.
The tiny-model check (every checkpoint evaluated and stored with evals.steps: checkpoints) is at the end."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from forgetscale.laws.studies import guardrails

PLANTED = {"a": 2.0, "b": -3.0}  # refusal 88% at KL 0, 50% at KL 2/3, 12% at KL 4/3


def simulated(ranks=(2, 4, 8, 16), steps=(0, 4, 8, 16, 32, 64), n=400, seed=0, planted=PLANTED, runs_per_rank=1,
              x="forget_kl"):
    """Checkpoint rows (KL rising with rank and step, L_ft falling) and safety summaries with refusals drawn
    from the planted logistic in x: the store's two tables as fit reads them."""
    rng = np.random.default_rng(seed)
    frame, summaries = [], []
    for rank in ranks:
        for copy in range(runs_per_rank):
            run_id = f"r{rank}s{copy}"
            for step in steps:
                kl = 0.0 if step == 0 else 0.02 * step ** 0.8 * (rank / 4) ** 0.3 * (1 + 0.05 * copy)
                ft = 3.0 - 0.8 * (1 - math.exp(-step / 20)) - 0.01 * rank
                frame.append({"run_id": run_id, "model": "m", "dataset": "d", "method": "lora",
                              "method_config": json.dumps({"name": "lora", "rank": rank}), "rank": rank,
                              "trainable_params": 1000 * rank, "seed": copy, "mitigation": "none",
                              "status": "finished", "step": step, "ft_loss": ft, "forget_kl": kl})
                k = int(rng.binomial(n, guardrails.sigmoid(planted["a"] + planted["b"] * (kl if x == "forget_kl" else ft))))
                summaries.append({"suite": "safety", "protocol": "greedy", "model_key": f"{run_id}@{step}",
                                  "metric": "refusal_rate", "k": k, "n": n, "value": k / n, "run_id": run_id,
                                  "step": step})
    return pd.DataFrame(frame), summaries


def test_logistic_mle_recovers_planted_constants_exactly_without_noise():
    x = np.linspace(0, 1.5, 8)
    n = np.full(8, 10 ** 6)
    k = np.round(n * guardrails.sigmoid(PLANTED["a"] + PLANTED["b"] * x))
    a, b, status = guardrails.fit_logistic(x, k, n)
    assert status == "converged"
    assert a == pytest.approx(PLANTED["a"], abs=2e-3) and b == pytest.approx(PLANTED["b"], abs=2e-3)


def test_refusal_law_recovers_planted_parameters_from_simulated_curves():
    frame, summaries = simulated()
    block = guardrails.compare(frame, summaries, None)
    (group,) = block["groups"]
    assert group["n_points"] == 4 * 6 and group["n_runs"] == 4
    assert group["x"] == "forget_kl" and group["chosen_by"] == "held-out log loss"  # the planted x wins held out
    kl = group["candidates"]["forget_kl"]
    assert kl["status"] == "converged"
    for name, value in PLANTED.items():
        assert kl["params"][name] == pytest.approx(value, abs=0.25)
        lo, hi = kl["ci"][name]
        assert lo < value < hi  # the bootstrap interval over runs covers the planted constant
    ft = group["candidates"]["ft_loss"]["heldout"]
    assert kl["heldout"]["rows"] == 3 and kl["heldout"]["log_loss"] < ft["log_loss"] and kl["heldout"]["mae"] < ft["mae"]


def test_the_choice_follows_the_planted_x():
    """Refusals planted as a logistic in L_ft: the held-out log loss picks L_ft and recovers its constants."""
    planted = {"a": -10.0, "b": 4.0}
    frame, summaries = simulated(planted=planted, x="ft_loss")
    (group,) = guardrails.compare(frame, summaries, None)["groups"]
    assert group["x"] == "ft_loss" and group["chosen_by"] == "held-out log loss"
    ft = group["candidates"]["ft_loss"]
    assert ft["params"]["a"] == pytest.approx(planted["a"], abs=1.0)
    assert ft["params"]["b"] == pytest.approx(planted["b"], abs=0.4)


def test_recovery_holds_over_seeds():
    """Not one lucky draw: the planted slope is inside the interval for most seeds and the estimate is unbiased."""
    est, covered = [], 0
    for seed in range(8):
        frame, summaries = simulated(seed=seed, n=200)
        kl = guardrails.compare(frame, summaries, None)["groups"][0]["candidates"]["forget_kl"]
        est.append(kl["params"]["b"])
        covered += kl["ci"]["b"][0] < PLANTED["b"] < kl["ci"]["b"][1]
    assert np.mean(est) == pytest.approx(PLANTED["b"], abs=0.15)
    assert covered >= 6


def test_too_few_runs_gives_no_interval_and_says_so():
    frame, summaries = simulated(ranks=(2, 4))
    (group,) = guardrails.compare(frame, summaries, None)["groups"]
    kl = group["candidates"]["forget_kl"]
    assert kl["params"]["b"] == pytest.approx(PLANTED["b"], abs=0.4)  # still fitted ...
    assert all(math.isnan(v) for v in kl["ci"]["b"])  # ... but no interval
    assert "no intervals: too few runs (2; intervals need >= 3)" in kl["status"]
    assert group["chosen_by"].startswith("in-sample log loss (no held-out test")  # 2 ranks: no held-out split


def test_too_few_points_is_not_fitted():
    frame, summaries = simulated(ranks=(2,), steps=(0, 8))
    (group,) = guardrails.compare(frame, summaries, None)["groups"]
    assert group["x"] is None and "params" not in group["candidates"]["forget_kl"]
    assert group["status"] == "not fitted: too few points (2 evaluated checkpoints; needs >= 3)"
    assert guardrails.summary_lines({"groups": [group]}) == [f"d / lora: {group['status']}"]


def test_perfect_separation_is_not_a_fit():
    a, b, status = guardrails.fit_logistic(np.array([0.0, 0.1, 0.2, 0.3]), np.array([10, 10, 0, 0]),
                                           np.array([10, 10, 10, 10]))
    assert math.isnan(b) and "separate perfectly" in status
    a, b, status = guardrails.fit_logistic(np.array([0.0, 0.1, 0.2]), np.zeros(3), np.full(3, 10))
    assert math.isnan(a) and status == "the refusal rate is 0% at every point (no curve to fit)"


def test_base_refusal_stands_for_an_unevaluated_step_zero_and_unfinished_runs_are_left_out():
    frame, summaries = simulated(ranks=(2, 4, 8))
    summaries = [s for s in summaries if not s["model_key"].endswith("@0")]
    summaries.append({"suite": "safety", "protocol": "greedy", "model_key": "base", "metric": "refusal_rate",
                      "k": 9, "n": 10, "value": 0.9, "run_id": None, "step": None})
    frame.loc[frame["run_id"] == "r8s0", "status"] = "running"
    rows = guardrails.points(frame, summaries)
    assert set(rows["run_id"]) == {"r2s0", "r4s0"}
    assert (rows[rows["step"] == 0]["model_key"] == "base").all() and len(rows) == 2 * 6
    assert len(guardrails.points(frame, summaries, include_unfinished=True, max_step=8)) == 3 * 3


def test_no_safety_summaries_no_block():
    frame, _ = simulated()
    assert guardrails.compare(frame, [], None) is None


# -- laws.json, fit's table and the report section on a planted store ----------------------------------

def _planted_store(path, with_safety=True, **simulation):
    """A store holding the simulated sweep's rows, the base's and each checkpoint's safety refusals and
    choice agreements (what `forgetscale sweep` + `forgetscale eval --steps checkpoints` leave)."""
    from forgetscale.evals.stats import wilson
    from forgetscale.store import CheckpointRow, RunRecord, Store

    frame, summaries = simulated(**simulation)
    store = Store(path)
    store.set_meta("sweep_config", json.dumps({"name": "sim"}))
    for run_id, run in frame.groupby("run_id"):
        first = run.iloc[0]
        store.add_run(RunRecord(run_id=run_id, model="m", dataset="d", method="lora",
                                method_config={"name": "lora", "rank": int(first["rank"])}, rank=int(first["rank"]),
                                trainable_params=int(first["trainable_params"]), seed=0,
                                config={"train": {"steps": 64}}, status="finished"))
        for r in run.itertuples():
            store.add_checkpoint(CheckpointRow(run_id=run_id, step=int(r.step), ft_loss=r.ft_loss,
                                               ft_loss_train=r.ft_loss, forget_ce=2.0 + r.forget_kl,
                                               base_entropy=2.0, forget_kl=r.forget_kl, tokens_seen=int(r.step)))
    for suite, metric, rows in (("safety", "refusal_rate", summaries),
                                ("choice", "agreement_with_base", [{**s, "suite": "choice", "protocol": "loglik",
                                                                    "k": s["n"] - s["k"] // 4} for s in summaries])):
        if suite == "safety" and not with_safety:
            continue
        out = [{**s, "metric": metric, "value": s["k"] / s["n"], "settings": "{}",
                **dict(zip(("lo", "hi"), wilson(s["k"], s["n"]), strict=True))} for s in rows]
        if suite == "safety":
            out.append({"protocol": "greedy", "model_key": "base", "metric": metric, "k": 360, "n": 400,
                        "value": 0.9, "lo": 0.87, "hi": 0.92, "settings": "{}", "run_id": None, "step": None})
        store.replace_eval_summaries(suite, out)
    store.close()


def test_fit_writes_the_guardrails_block_and_prints_its_table(tmp_path, capsys):
    from forgetscale.cli import main

    run_dir = tmp_path / "sim"
    _planted_store(run_dir)
    assert main(["fit", str(run_dir), "--bootstrap", "50", "--laws", "linear"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((run_dir / "laws.json").read_text())
    block = doc["guardrails"]
    (group,) = block["groups"]
    assert group["x"] == "forget_kl" and group["candidates"]["forget_kl"]["bootstrap"]["n"] == 50
    assert block["base"]["k"] == 360 and len(group["rows"]) == 24
    assert "Guardrails lost" in printed and "KL (chosen)" in printed and "held-out log loss" in printed


def test_report_shows_guardrails_lost_with_its_figures(tmp_path):
    from forgetscale.cli import main
    from forgetscale.report import build_report

    run_dir = tmp_path / "sim"
    _planted_store(run_dir)
    assert main(["fit", str(run_dir), "--bootstrap", "50", "--laws", "linear"]) == 0
    page, _notes = build_report(run_dir)
    text = page.read_text()
    assert ">Guardrails lost</h2>" in text and 'data-figure="guardrails"' in text
    assert (run_dir / "figures" / "guardrails.png").stat().st_size > 10_000
    assert "refusal against KL" in text or "(chosen)" in text
    assert "changed since laws.json" not in text
    # a later eval changes the stored refusals: the section says the law is out of date
    from forgetscale.store import Store

    with Store(run_dir) as store:
        rows = store.eval_summaries("safety")
        store.replace_eval_summaries("safety", [{**rows[-1], "k": rows[-1]["k"] - 1}])
    assert "changed since laws.json was written" in build_report(run_dir)[0].read_text()


def test_report_shows_the_ft_loss_fit_when_the_law_chose_it(tmp_path):
    from forgetscale.cli import main
    from forgetscale.report import build_report

    run_dir = tmp_path / "sim"
    _planted_store(run_dir, planted={"a": -10.0, "b": 4.0}, x="ft_loss")
    assert main(["fit", str(run_dir), "--bootstrap", "50", "--laws", "linear"]) == 0
    assert json.loads((run_dir / "laws.json").read_text())["guardrails"]["groups"][0]["x"] == "ft_loss"
    text = build_report(run_dir)[0].read_text()
    assert 'data-figure="guardrails_ft"' in text and "L_ft (chosen)" in text


def test_fit_and_report_of_the_guardrails_run_without_torch(tmp_path):
    from tests.test_architecture import _python

    run_dir = tmp_path / "sim"
    _planted_store(run_dir)
    done = _python("import sys\nfrom forgetscale.cli import main\n"
                   f"assert main(['fit', {str(run_dir)!r}, '--bootstrap', '20', '--laws', 'linear']) == 0\n"
                   f"sys.exit(main(['report', {str(run_dir)!r}]))", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "guardrails" in json.loads((run_dir / "laws.json").read_text())
    assert (run_dir / "figures" / "guardrails.png").is_file()


def test_no_guardrails_section_without_safety_data(tmp_path):
    from forgetscale.cli import main
    from forgetscale.report import build_report

    run_dir = tmp_path / "sim"
    _planted_store(run_dir, with_safety=False)
    assert main(["fit", str(run_dir), "--bootstrap", "50", "--laws", "linear"]) == 0
    assert "guardrails" not in json.loads((run_dir / "laws.json").read_text())
    page, _notes = build_report(run_dir)
    assert "Guardrails lost" not in page.read_text() and not (run_dir / "figures" / "guardrails.png").exists()


# -- evals.steps: checkpoints ------------------------------------------------------------------------

def test_steps_checkpoints_is_validated_and_keeps_every_checkpoint_adapter():
    from forgetscale.config import parse_config
    from forgetscale.config.evals import EvalsConfig
    from forgetscale.errors import ConfigError
    from tests.conftest import tiny_config

    assert EvalsConfig.model_validate({"steps": "checkpoints"}).steps == "checkpoints"
    with pytest.raises(Exception, match="checkpoints"):
        EvalsConfig.model_validate({"steps": "every"})
    cfg = parse_config(tiny_config(train={"steps": 8, "checkpoints": [0, 2, 5, 8]}, evals={"steps": "checkpoints"}))
    assert cfg.evals.adapter_steps(cfg.train.checkpoint_steps, cfg.train.steps) == {0, 2, 5, 8}
    assert cfg.evals.adapter_steps([0, 8], 8) == {0, 8}
    last = parse_config(tiny_config(train={"steps": 8, "checkpoints": [0, 2, 5, 8]}))
    assert last.evals.adapter_steps(last.train.checkpoint_steps, last.train.steps) == {8}
    with pytest.raises(ConfigError, match="--steps"):
        from forgetscale.cli.eval import _steps

        _steps("every")


def test_sweep_with_steps_checkpoints_evaluates_and_stores_every_checkpoint(tmp_path, monkeypatch):
    """Every listed checkpoint of every run is evaluated by both suites and stored; fit and report read it.
    Step 0 (LoRA's B is zero: KL exactly 0) is the base's own function: its items are the base's, stored
    under its key, and no prompt is generated for it."""
    import yaml

    from forgetscale.cli import main
    from forgetscale.report import build_report
    from forgetscale.store import Store
    from tests.conftest import tiny_config

    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    data = tiny_config(train={"steps": 4, "checkpoints": [0, 1, 2, 4], "batch_size": 2, "context_length": 32,
                              "lr": 0.01, "eval_batch_size": 8},
                       evals={"suites": ["safety", "choice"], "steps": "checkpoints", "batch_size": 4,
                              "safety": {"limit": 3, "max_new_tokens": 4},
                              "choice": {"limit": 3, "protocols": ["loglik"]}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    store = Store(out)
    runs = [r["run_id"] for r in store.runs()]
    assert len(runs) == 2
    wanted = {"base"} | {f"{r}@{s}" for r in runs for s in (0, 1, 2, 4)}
    for run_id in runs:  # every checkpoint's adapter was saved without the user listing the steps
        assert sorted(p.name for p in (out / "runs" / run_id).glob("adapter-step*")) == [
            f"adapter-step{s}" for s in (0, 1, 2, 4)]
    for suite, metric, n in (("safety", "refusal_rate", 3), ("choice", "agreement_with_base", 3)):
        summaries = [s for s in store.eval_summaries(suite) if s["metric"] == metric]
        assert {s["model_key"] for s in summaries} >= wanted - ({"base"} if metric == "agreement_with_base" else set())
        assert all(s["n"] == n and s["lo"] <= s["value"] <= s["hi"] for s in summaries)
        assert {s["model_key"] for s in store.eval_summaries(suite)} == wanted
        assert {r["model_key"] for r in store.eval_items(suite)} == wanted

    def answers(suite, key):
        return [(r["item_id"], r["protocol"], r["output"], r["prediction"], r["refused"], r["correct"])
                for r in store.eval_items(suite, key)]

    for run_id in runs:
        assert [c["forget_kl"] for c in store.checkpoints(run_id) if c["step"] == 0] == [0.0]
        for suite in ("safety", "choice"):
            assert answers(suite, f"{run_id}@0") == answers(suite, "base")
            assert {(r["run_id"], r["step"]) for r in store.eval_items(suite, f"{run_id}@0")} == {(run_id, 0)}
    store.close()
    from forgetscale.config import parse_config
    from forgetscale.evals import runner

    generated = []
    real_target = runner.Target
    monkeypatch.setattr(runner, "Target", lambda key, *a: generated.append(key) or real_target(key, *a))
    runner.run_evals(out, parse_config(data).evals, force=True, progress=False)
    assert sorted(generated) == sorted(wanted - {f"{r}@0" for r in runs})
    assert main(["fit", str(out), "--bootstrap", "20", "--laws", "linear"]) == 0
    block = json.loads((out / "laws.json").read_text())["guardrails"]
    (group,) = block["groups"]
    assert group["n_points"] == 8 and group["n_runs"] == 2  # every (run, step) evaluated is a point
    # a random tiny model refuses by chance or not at all: either no curve, or one with no intervals (2 runs)
    assert group["status"].startswith("not fitted:") or "no intervals: too few runs (2" in group["status"]
    page, _ = build_report(out)
    assert ">Guardrails lost</h2>" in page.read_text()
