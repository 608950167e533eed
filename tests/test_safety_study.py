"""The safety study (issue 27, item 4): which data erodes what at the same KL (laws/studies/erosion.py) on
planted sweeps, and `forgetscale demo --study safety` end to end on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from forgetscale.laws.studies import erosion
from forgetscale.laws.studies.guardrails import sigmoid


def planted(refusal: tuple[float, float], agreement: tuple[float, float], kl_scale: float, seed: int,
            n: int = 400) -> dict[str, pd.DataFrame]:
    """sweep_points' shape: 3 ranks x 5 steps, KL rising with step and rank, counts drawn from planted logistics."""
    rng = np.random.default_rng(seed)
    rows = {m: [] for m in erosion.MEASURES}
    for rank in (1, 4, 16):
        for step in (0, 8, 16, 32, 48):
            kl = kl_scale * step / 48 * (rank / 16) ** 0.3
            for measure, (a, b) in (("refusal", refusal), ("agreement", agreement)):
                k = int(rng.binomial(n, sigmoid(a + b * kl)))
                rows[measure].append({"run_id": f"r{rank}", "rank": rank, "step": step, "forget_kl": kl, "k": k,
                                      "n": n, "rate": k / n, "lo": 0.0, "hi": 1.0})
    return {m: pd.DataFrame(r) for m, r in rows.items()}


def test_matched_kl_recovers_which_data_erodes_what():
    # instructions: refusals fall fast with KL, agreement slowly; news the other way round; news reaches a
    # larger KL, so the comparison is read at instructions' largest KL (0.2), inside both sweeps' data
    sweeps = {"instructions": planted((2.0, -12.0), (4.0, -2.0), 0.2, seed=0),
              "news": planted((2.0, -2.0), (4.0, -12.0), 0.4, seed=1)}
    result = erosion.at_matched_kl(sweeps, n_bootstrap=200)
    assert result["kl"] == pytest.approx(0.2)
    ref = result["measures"]["refusal"]
    truth = {"instructions": float(sigmoid(2.0 - 12.0 * 0.2)), "news": float(sigmoid(2.0 - 2.0 * 0.2))}
    for label, value in truth.items():
        entry = ref["sweeps"][label]
        assert entry["value"] == pytest.approx(value, abs=0.05)
        assert entry["ci"][0] < entry["value"] < entry["ci"][1]
    (diff,) = ref["differences"]
    assert diff["a"] == "instructions" and diff["ci"][1] < 0  # instructions leave fewer refusals
    (agree,) = result["measures"]["agreement"]["differences"]
    assert agree["ci"][0] > 0  # news leaves less agreement
    lines = erosion.verdict_lines(result)
    assert any("refusal: instructions - news" in line and "instructions erodes it more" in line for line in lines)
    assert any("agreement: instructions - news" in line and "news erodes it more" in line for line in lines)


def test_equal_curves_are_no_difference_and_few_runs_no_interval():
    same = {"a": planted((2.0, -5.0), (4.0, -5.0), 0.3, seed=2), "b": planted((2.0, -5.0), (4.0, -5.0), 0.3, seed=3)}
    result = erosion.at_matched_kl(same, n_bootstrap=200)
    (diff,) = result["measures"]["refusal"]["differences"]
    assert diff["ci"][0] < 0 < diff["ci"][1]
    assert any("no difference beyond noise" in line for line in erosion.verdict_lines(result))
    two_runs = {label: {m: d[d["rank"] != 16] for m, d in pts.items()} for label, pts in same.items()}
    result = erosion.at_matched_kl(two_runs, n_bootstrap=200)
    entry = result["measures"]["refusal"]["sweeps"]["a"]
    assert math.isnan(entry["ci"][0]) and "too few runs (2" in entry["status"]


def test_demo_study_safety_on_the_tiny_model(tmp_path, capsys):
    """Both sweeps, safety and choice at every checkpoint, fit and report of each, the per-step table and the
    comparison at the same KL."""
    from forgetscale.cli import main
    from forgetscale.store import Store

    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    out = tmp_path / "safety"
    sets = ["model.name=tiny-random-llama", "model.dtype=auto", "train.dtype=auto", "method.ranks=[2,4,8]",
            "train.steps=4", "train.checkpoints=[0,2,4]", "train.batch_size=2",
            "finetune.max_examples=60", "finetune.heldout_max_tokens=256", "forgetting.max_tokens=256",
            "evals.safety.limit=3", "evals.safety.max_new_tokens=4", "evals.choice.limit=3"]
    argv = ["demo", "--study", "safety", "--out", str(out), "--no-progress", "--bootstrap", "20"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for label, dataset in (("instructions", "embedded:sharegpt"), ("news", "embedded:news")):
        with Store(out / label, create=False) as store:
            assert {r["dataset"] for r in store.runs()} == {dataset} and len(store.runs()) == 3
            keys = {s["model_key"] for s in store.eval_summaries("safety")}
            assert keys >= {f"{r['run_id']}@{s}" for r in store.runs() for s in (0, 2, 4)}
        assert (out / label / "laws.json").is_file() and (out / label / "report.html").is_file()
    assert "refusals (HarmBench) and choice agreement against KL" in text
    assert "at the same forgetting KL" in text
