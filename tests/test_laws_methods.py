"""Laws across fine-tuning methods: method settings as groups, and the distance of every method from the
LoRA-fitted laws (the paper's appendix question), on rows where the answer is known."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from forgetscale.cli import main
from forgetscale.errors import DataError, ForgetscaleError
from forgetscale.laws.estimators.groups import DEFAULTS, GROUP, add_groups, labels, method_key
from forgetscale.laws.estimators.select import groups, select_rows
from forgetscale.laws.fit import fit_frame, fit_run_dir
from forgetscale.laws.pipeline import forecast
from forgetscale.laws.pipeline.fitall import FitOptions
from forgetscale.laws.studies import crossmethod, paper, synthetic

OFFSET = 1.05  # the shifted method's forgetting is 5% above what the LoRA law predicts
KW = {"steps": range(20, 201, 20), "seeds": (0, 1)}


def _labels(*configs: tuple[str, dict]) -> list[str]:
    keys = [method_key(m, json.dumps(c)) for m, c in configs]
    got = labels(keys)
    return [got[k] for k in keys]


def test_group_labels_name_only_what_tells_methods_apart():
    lora = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "scaling": "rslora", "alpha": 16.0, "dropout": 0.0, "layers": None, "lr": None, "name": "lora"}
    attn = {**lora, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    # the lead's configs/methods.yaml, as the store holds it
    assert _labels(("lora", lora), ("lora", attn), ("ia3", {**DEFAULTS["ia3"], "lr": 0.01}),
                   ("top_layers", {"k": 3, "lr": 0.0002}), ("full", {"lr": 0.0001})) == [
        "lora", "lora[attn]", "ia3", "top_layers[k=3]", "full"]
    assert _labels(("lora", lora)) == ["lora"]  # a single-method sweep keeps its plain name
    assert _labels(("lora", lora), ("lora", {**lora, "lr": 0.001})) == ["lora", "lora[lr=0.001]"]
    assert _labels(("lora", {**lora, "scaling": "standard", "layers": "last:4"})) == ["lora[last:4,standard]"]
    assert _labels(("lora", {**attn, "target_modules": ["v_proj", "q_proj"]})) == ["lora[q+v]"]
    assert _labels(("dora", {**lora, "target_modules": ["gate_proj", "up_proj", "down_proj"]})) == ["dora[mlp]"]


def test_group_defaults_mirror_the_registered_methods():
    from forgetscale.laws.estimators import groups as method_groups
    from forgetscale.methods import ALL_LINEAR, ATTENTION, METHODS

    assert method_groups.ALL_LINEAR == ALL_LINEAR and method_groups.ATTENTION == ATTENTION
    for name in METHODS.names():
        spec = METHODS.get(name)()
        assert {k: v for k, v in spec.identity().items() if k != "name"} == DEFAULTS[name], name


def _frame() -> pd.DataFrame:
    """LoRA (3 ranks x 2 seeds), a method drawn from the same law, one shifted by OFFSET, LoRA on attention."""
    c = paper.in_gauge("openorca", 0.002)
    lora = synthetic.simulate_frame(c, ranks=(8, 32, 128), **KW)
    same = synthetic.simulate_frame(c, method="ia3", ranks=(4,), seed=1, **KW)
    shifted = synthetic.simulate_frame(c, method="top_layers", ranks=(64,), seed=2, **KW)
    shifted["method_config"] = json.dumps({"k": 3})
    shifted.loc[shifted["step"] > 0, "forget_ce"] *= OFFSET
    attn = synthetic.simulate_frame(c, ranks=(16,), seed=3, **KW)
    attn["run_id"] = attn["run_id"] + "-attn"
    attn["method_config"] = json.dumps({"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    return pd.concat([lora, same, shifted, attn], ignore_index=True)


@pytest.fixture(scope="module")
def doc():
    return fit_frame(_frame(), FitOptions(n_bootstrap=50))


def test_groups_split_lora_by_its_settings():
    frame = _frame()
    assert [k["variant"] for k, _ in groups(frame)] == ["ia3", "lora", "lora[attn]", "top_layers[k=3]"]
    lora = frame[frame["method"] == "lora"]
    with pytest.raises(DataError, match=r"got 2: openorca / lora; openorca / lora\[attn\]"):
        select_rows(lora, law="linear", columns=("ft_loss", "forget_ce"))
    only = add_groups(lora)
    assert select_rows(only[only[GROUP] == "lora"], law="linear", columns=("forget_ce",)).rows["rank"].nunique() == 3


def test_a_method_from_the_lora_law_sits_on_it_and_a_shifted_one_shows_its_offset(doc):
    block = doc["cross_method"][0]
    assert block["status"] == "compared" and block["reference"] == "lora"
    v = block["variants"]
    truth = 1 / OFFSET - 1  # (predicted - observed) / observed when observed = OFFSET * predicted
    for law in ("linear", "power_f", "power_joint", "mult_f"):
        shifted = v["top_layers[k=3]"]["errors"][law]
        assert shifted["signed"] == pytest.approx(truth, abs=0.004), law
        assert shifted["bias"] == "under" and shifted["signed_ci"][1] < 0
        assert shifted["mean"] == pytest.approx(-truth, abs=0.004)
        for same in ("ia3", "lora[attn]"):
            e = v[same]["errors"][law]
            assert abs(e["signed"]) < 0.01 and e["bias"] != "under", (same, law)  # noise: 0.4% a point
            assert e["mean"] < 0.25 * shifted["mean"]
        assert abs(v["lora"]["errors"][law]["signed"]) < 0.002  # in-sample: the fit is centred on its rows
    assert v["ia3"]["outside"] == ["P down to 0.5x the smallest LoRA P"]
    assert [r["P"] for r in v["lora"]["runs"]] == [paper.P_PER_RANK * r for r in (8, 8, 32, 32, 128, 128)]
    lines = crossmethod.verdict(block)
    assert any(line.startswith("Eq. 4 (linear in L_ft): underestimates L_f for top_layers[k=3] (-4.7") for line in lines)


def test_own_pooled_and_lora_fits_forecast_later_steps(doc):
    ho = doc["cross_method"][0]["heldout"]
    assert ho["n_cut"] == 120.0
    shifted = ho["by_variant"]["top_layers[k=3]"]
    # the shifted method's own line forecasts it; the LoRA line misses by about the offset
    assert shifted["own"]["linear"] < 0.015 < 0.04 < shifted["lora"]["linear"]
    assert shifted["own"].keys() == {"linear"}  # one P: no power law of its own
    assert ho["summary"]["linear"]["paired_n"] == 4
    pooled = doc["cross_method"][0]["pooled"]
    assert pooled["label"] == "openorca / pooled (4 methods)"
    assert pooled["laws"]["linear"]["n_rows"] == 12 * 9  # every run of every method, steps >= 40
    assert pooled["laws"]["mult_f"]["r2"]["f"] > 0.8


def test_single_method_sweeps_have_no_comparison(tmp_path, capsys):
    synthetic.simulate_sweep(tmp_path, ranks=(8, 32), seeds=(0, 1), steps=range(20, 101, 20))
    doc, _ = fit_run_dir(tmp_path, FitOptions(n_bootstrap=20))
    assert doc["cross_method"] == [] and [g["label"] for g in doc["groups"]] == ["openorca / lora"]
    assert main(["report", str(tmp_path)]) == 0
    assert "Methods compared" not in (tmp_path / "report.html").read_text()


def test_no_all_linear_lora_means_no_comparison():
    frame = _frame()
    frame = frame[(frame["method"] != "lora") | frame["run_id"].str.endswith("-attn")]
    block = fit_frame(frame, FitOptions(n_bootstrap=20))["cross_method"][0]
    assert block["status"].startswith("not compared: no all-linear LoRA variant with >= 2 finished ranks")
    assert block["reference"] is None and set(block["variants"]) == {"ia3", "lora[attn]", "top_layers[k=3]"}


def test_predict_chooses_a_group(doc):
    assert forecast.choose_group(doc, method="lora")["label"] == "openorca / lora"
    assert forecast.choose_group(doc, method="lora[attn]")["label"] == "openorca / lora[attn]"
    assert forecast.choose_group(doc, method="top_layers")["label"] == "openorca / top_layers[k=3]"
    # without filters: the one group whose laws could be fitted (methods with one run have none)
    only_lora = {"groups": [g if g["key"]["variant"] == "lora" else {**g, "laws": {"linear": {"status": "not fitted"}}}
                            for g in doc["groups"]]}
    assert forecast.choose_group(only_lora)["label"] == "openorca / lora"
    with pytest.raises(DataError, match="holds 4 groups"):
        forecast.choose_group(doc)
    with pytest.raises(ForgetscaleError, match="did you mean 'lora\\[attn\\]'"):
        forecast.choose_group(doc, method="lora[atn]")


def test_fit_prints_and_report_shows_the_comparison(tmp_path, capsys):
    synthetic.write_store(tmp_path, _frame())
    assert main(["fit", str(tmp_path), "--bootstrap", "20", "--laws", "linear,mult_f"]) == 0
    out = capsys.readouterr().out
    for text in ("methods against the laws fitted on LoRA (lora)", "top_layers[k=3]", "underestimates",
                 "forecast of later steps", "pooled", "lora[attn]"):
        assert text in out, text
    assert json.loads((tmp_path / "laws.json").read_text())["cross_method"][0]["status"] == "compared"
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.index("Methods compared") < page.index("Losses against steps")
    for name in ("openorca_methods_tradeoff", "openorca_methods_parity"):  # parity: mult_f
        assert f'data-figure="{name}"' in page and (tmp_path / "figures" / f"{name}.png").stat().st_size > 10_000
    assert "underestimates" in page and "top_layers[k=3]" in page


def test_tiny_multi_method_sweep_end_to_end(tmp_path, tiny_cfg, capsys):
    from forgetscale.config import parse_config
    from forgetscale.store import Store
    from forgetscale.sweep import run_sweep

    cfg = tiny_cfg(method=[{"name": "lora", "ranks": [2, 4]}, {"name": "ia3"}, {"name": "top_layers", "k": 1},
                           {"name": "full"}],
                   train={"steps": 4, "checkpoints": [0, 1, 2, 3, 4]})
    run_sweep(parse_config(cfg), tmp_path, progress=False)
    assert main(["fit", str(tmp_path), "--min-step", "1", "--bootstrap", "20", "--laws", "linear,mult_f"]) == 0
    capsys.readouterr()
    doc = json.loads((tmp_path / "laws.json").read_text())
    block = doc["cross_method"][0]
    assert set(block["variants"]) == {"lora", "ia3", "top_layers[k=1]", "full"}
    with Store(tmp_path, create=False) as store:
        stored = {r["run_id"]: r["trainable_params"] for r in store.runs()}
    assert sorted(r["run_id"] for info in block["variants"].values() for r in info["runs"]) == sorted(stored)
    for info in block["variants"].values():
        for run in info["runs"]:
            assert run["P"] == stored[run["run_id"]]  # the exact P each run recorded
    assert block["status"] == "compared" and block["reference"] == "lora"
    full = block["variants"]["full"]
    assert full["n_rows"] == 4 and np.isfinite(full["errors"]["linear"]["signed"])
    assert set(block["heldout"]["by_variant"]) == set(block["variants"])  # step 4 forecast from steps 1-3
