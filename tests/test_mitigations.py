"""Mitigation arms: config and run identity, the leakage guarantee, one tiny-model sweep in which every
arm shows its effect, the matched-loss comparison on simulated rows, the report section, and a short
real-model sweep (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from forgetscale.artefacts import load_weights
from forgetscale.cli import main
from forgetscale.config import load_config, parse_config
from forgetscale.data import load_records
from forgetscale.data.blocks import Blocks
from forgetscale.errors import ConfigError
from forgetscale.laws.pipeline.fitall import FitOptions
from forgetscale.laws.studies.mitigation import at_loss, compare, frontier, verdict
from forgetscale.methods.attach import attach
from forgetscale.mitigations import MITIGATIONS
from forgetscale.mitigations.inputs import WINDOW, ArmInputs, general_pool, generate_blocks
from forgetscale.mitigations.kl import kl_to_base
from forgetscale.mitigations.replay import POOL_SEED, ReplayHooks, pool_rows, replay_count
from forgetscale.models import load_model
from forgetscale.store import CheckpointRow, RunRecord, Store
from forgetscale.sweep import plan_runs, run_sweep
from tests.conftest import tiny_config

# run_ids of tiny_config() before mitigations existed (tests/test_sweep.py's sweep): they must not change
GOLDEN_TINY_IDS = ["eddcdcd7db7b", "e937964210c6"]


def _windows(ids: torch.Tensor) -> set[tuple[int, ...]]:
    """Every WINDOW-token run of each row, computed independently of the package's helper."""
    rows = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 1 else ids[None]
    out = set()
    for row in rows:
        if row.numel() >= WINDOW:
            out |= {tuple(w.tolist()) for w in row.unfold(0, WINDOW, 1)}
    return out


# -- config and run identity ----------------------------------------------------------------------

def test_mitigations_keep_old_run_ids_and_add_one_run_per_arm_and_seed():
    assert [p.run_id for p in plan_runs(parse_config(tiny_config()))] == GOLDEN_TINY_IDS
    cfg = parse_config(tiny_config(mitigation=["kl", {"name": "scale", "s": [0.0, 0.5]}], train={"seeds": [0, 1]}))
    plans = plan_runs(cfg)
    control = [p for p in plans if p.mitigation.name == "none" and p.seed == 0]
    assert [p.run_id for p in control] == GOLDEN_TINY_IDS  # the control arm is the plain sweep's run
    assert len(plans) == 2 * 2 * (1 + 1 + 2) and len({p.run_id for p in plans}) == len(plans)
    derived = [p for p in plans if p.source is not None]
    assert plans[-len(derived):] == derived  # derived runs come after the runs they read
    by_id = {p.run_id: p for p in plans}
    assert all(by_id[p.source].mitigation.name == "none" and by_id[p.source].seed == p.seed for p in derived)
    assert {p.label for p in derived} >= {"lora-r2-scale0-s0", "lora-r2-scale0.5-s1"}


def test_config_errors_name_the_entry_and_line(write_yaml):
    path = write_yaml(tiny_config(mitigation=["replay", {"name": "kll"}]))
    with pytest.raises(ConfigError, match=r"sweep\.yaml:\d+ mitigation\[1\]\.name: unknown mitigation 'kll'; "
                                          r"did you mean 'kl'\?"):
        load_config(path)
    path = write_yaml(tiny_config(mitigation={"name": "replay", "p": 1.5}))
    with pytest.raises(ConfigError, match=r"sweep\.yaml:\d+ mitigation\.p: input should be less than 1"):
        load_config(path)
    cfg = parse_config(tiny_config(method=[{"name": "full"}], mitigation=["replay", "kl"]))
    with pytest.raises(ConfigError, match=r"^mitigation\[1\] \(kl\): .*method 'full' has no adapter") as err:
        plan_runs(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"mitigation\[1\]: the same arm as mitigation\[0\]"):
        plan_runs(parse_config(tiny_config(mitigation=["kl", {"name": "kl", "lam": 1.0}])))
    assert set(MITIGATIONS.names()) >= {"none", "replay", "self_replay", "kl", "l2sp", "ewc", "freeze", "scale"}


# -- leakage: the general-text pool never overlaps the forgetting set -----------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny-random-llama").tokenizer


def test_replay_pool_is_disjoint_from_the_forgetting_set_by_document_and_block(tokenizer, tmp_path):
    cfg = parse_config(tiny_config(forgetting={"dataset": "embedded:wikipedia", "max_tokens": 2048}))
    forgetting = _forgetting(cfg, tokenizer)
    pool, info = general_pool(None, "train", cfg.forgetting, forgetting, tokenizer, 32, None)
    assert info["documents_removed"] >= 1 and len(pool) > 100
    # block level: no pool block shares a WINDOW-token run with the forgetting blocks
    assert not _windows(pool.input_ids) & _windows(forgetting.input_ids.reshape(-1))
    # document level: nothing of any forgetting-set document, even its parts past the token budget
    articles = [r["text"] for r in load_records("embedded:wikipedia")]
    used = articles[: info["documents_removed"]]
    doc_windows = set().union(*(_windows(torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"])) for t in used))
    assert not _windows(pool.input_ids) & doc_windows
    forgetting_windows = _windows(forgetting.input_ids.reshape(-1))
    assert len(forgetting_windows & doc_windows) > 0.9 * len(forgetting_windows)  # they are the right documents

    # a source that contains a forgetting document, and a document quoting one of its sentences
    quote = " ".join(used[0].split()[:60])
    other = [a for a in articles[info["documents_removed"]:][:20]]
    leaky = tmp_path / "leaky.jsonl"
    rows = [{"text": used[0]}, {"text": "A new page. " + quote + " The end."}, *({"text": t} for t in other)]
    leaky.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pool, info = general_pool(str(leaky), "train", cfg.forgetting, forgetting, tokenizer, 32, None)
    assert info["documents_removed"] == 1 and info["blocks_dropped"] >= 1
    assert not _windows(pool.input_ids) & _windows(forgetting.input_ids.reshape(-1))


def _forgetting(cfg, tokenizer) -> Blocks:
    from forgetscale.data import build_forgetting_blocks

    return build_forgetting_blocks(cfg.forgetting, tokenizer, cfg.train.context_length, None)


def test_replay_mixes_exactly_p_of_the_rows_from_the_pool():
    assert sum(replay_count(s, 4, 0.3) for s in range(10)) == round(0.3 * 4 * 10)
    ids = torch.arange(8 * 4).view(8, 4)
    pool = Blocks(-ids - 1, -ids - 1, torch.ones_like(ids))
    batch = Blocks(ids[:4], ids[:4], torch.ones(4, 4, dtype=torch.long))
    hooks = ReplayHooks(pool, 0.5, seed=0)
    mixed = [hooks.mix(s, batch) for s in range(6)]
    assert all(torch.equal(m.input_ids[:2], ids[:2]) and (m.input_ids[2:] < 0).all() for m in mixed)
    assert torch.equal(mixed[3].input_ids, ReplayHooks(pool, 0.5, seed=0).mix(3, batch).input_ids)  # pure in (seed, step)
    drawn = torch.cat([m.input_ids[2:, 0] for m in mixed[:4]])
    assert len(set(drawn.tolist())) == 8  # one epoch of the pool visits every block once


# -- one tiny sweep with every arm ---------------------------------------------------------------

ARMS = [{"name": "replay", "p": 0.5}, {"name": "self_replay", "p": 0.5, "samples": 8},
        {"name": "kl", "lam": 1000.0, "rows": 2}, {"name": "kl", "lam": 1000.0, "rows": 2, "source": "finetune"},
        {"name": "l2sp", "lam": 100.0},
        {"name": "ewc", "lam": 100.0, "fisher_samples": 4}, {"name": "freeze", "layers": 1},
        {"name": "scale", "s": [0.0, 0.5, 1.0]},
        {"name": "intruders", "mitigation_lambda": [0.0, 1.0], "threshold_epsilon": 1.0, "top_k": 4}]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("mitigations")
    cfg = parse_config(tiny_config(method={"name": "lora", "ranks": [2]}, mitigation=ARMS,
                                   train={"checkpoints": [0, 4]}))
    store = run_sweep(cfg, out, progress=False)
    runs = {_key(r): r for r in store.runs()}
    rows = {k: store.checkpoints(r["run_id"]) for k, r in runs.items()}
    return cfg, out, store, runs, rows


def _key(run):
    """A run's arm tag, plus '@<grid value>' for a derived run (scale@0.5, intruders:...@0.0)."""
    arm = json.loads(run["config"])["mitigation"]
    value = arm.get("s", arm.get("mitigation_lambda"))
    return run["mitigation"] + ("" if value is None else f"@{value}")


def _last_kl(rows, key):
    return rows[key][-1]["forget_kl"]


def test_every_arm_runs_and_stores_its_tag(swept):
    _, out, _, runs, rows = swept
    assert all(r["status"] == "finished" for r in runs.values()), {k: r["error"] for k, r in runs.items()}
    assert {k.split(":")[0].split("@")[0] for k in runs} == {a["name"] for a in ARMS} | {"none"}
    for key, r in runs.items():
        cfg = json.loads(r["config"])["mitigation"]
        assert cfg["name"] == key.split(":")[0].split("@")[0]
    info = json.loads((out / "mitigation_inputs.json").read_text())
    assert any(k.startswith("general:") for k in info) and any(k.startswith("fisher:") for k in info)


def test_eval_labels_are_the_sweeps_run_labels(swept):
    from forgetscale.evals.labels import run_labels

    cfg, _, store, _, _ = swept
    assert set(run_labels(store).values()) == {p.label for p in plan_runs(cfg)}  # scale runs apart by their s
    assert "lora-r2-intruders:top_k=4,threshold_epsilon=1.0,mitigation_lambda=0" in run_labels(store).values()
    assert "lora-r2-scale0.5" in run_labels(store).values()


def test_scale_zero_is_the_base_and_one_is_the_control(swept):
    _, _, _, runs, rows = swept
    control = rows["none"]
    s0, s1, half = rows["scale@0.0"][-1], rows["scale@1.0"][-1], rows["scale@0.5"][-1]
    assert s0["step"] == s1["step"] == control[-1]["step"]
    assert s0["forget_kl"] == 0.0 and s0["ft_loss"] == control[0]["ft_loss"]
    for col in ("ft_loss", "ft_loss_train", "forget_ce", "forget_kl"):
        assert s1[col] == control[-1][col]
    assert 0.0 < half["forget_kl"] < s1["forget_kl"]
    assert s1["tokens_seen"] == control[-1]["tokens_seen"] and s1["wall_s"] == 0.0
    assert runs["scale@0.5"]["trainable_params"] == runs["none"]["trainable_params"]


INTRUDERS = "intruders:top_k=4,threshold_epsilon=1.0"


def test_intruders_arm_is_peft_reduce_intruder_dimension_on_the_control_adapter(swept):
    """The derived run's adapter is exactly what peft's own function makes of the control's adapter."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from safetensors.torch import load_file

    from forgetscale.artefacts import PEFT_WEIGHTS, RunFolder

    cfg, out, _, runs, rows = swept
    control = RunFolder(out, runs["none"]["run_id"]).adapter(4)
    model = attach(load_model("tiny-random-llama").model, cfg.method[0], 2)
    load_weights(model, control)
    reduce_intruder_dimension(model, top_k=4, threshold_epsilon=1.0, mitigation_lambda=0.0, logging_sink=None)
    direct = {n.replace(".intruder_reduced", ""): p for n, p in model.named_parameters() if ".intruder_reduced." in n}
    arm = load_file(RunFolder(out, runs[f"{INTRUDERS}@0.0"]["run_id"]).adapter(4) / PEFT_WEIGHTS)
    trained = load_file(control / PEFT_WEIGHTS)
    assert direct and set(direct) == set(arm)
    assert all(torch.equal(direct[n], arm[n]) for n in arm)
    assert any(not torch.equal(arm[n], trained[n]) for n in arm)  # epsilon 1: intruders found and removed
    removed, kept, none = rows[f"{INTRUDERS}@0.0"][-1], rows[f"{INTRUDERS}@1.0"][-1], rows["none"][-1]
    assert removed["forget_kl"] != none["forget_kl"] and removed["wall_s"] == 0.0
    assert kept["forget_kl"] == pytest.approx(none["forget_kl"], rel=1e-3)  # lambda 1: the control (refitted)
    assert kept["ft_loss"] == pytest.approx(none["ft_loss"], rel=1e-5)


def test_intruders_curve_is_in_the_matched_table_and_the_line_table(swept):
    from forgetscale.report.mitigations import line_rows
    from forgetscale.report.mitigations import rows as table_rows

    _, out, store, runs, rows = swept
    cell = compare(store.frame(), store.runs(), FitOptions(n_bootstrap=20, min_step=1))[0]
    arm = {a["arm"]: a for a in cell["arms"]}[INTRUDERS]
    assert arm["cost"]["ratio"] == 1.0 and arm["cost"]["note"] and arm["seeds"] == [0]
    assert arm["matched_ft"] == pytest.approx(rows["none"][-1]["ft_loss"], rel=1e-5)  # lambda 1 ends the curve
    assert any(r[0] == INTRUDERS for r in table_rows(cell)) and any(r[0] == INTRUDERS for r in line_rows(cell))


def test_intruders_settings_are_checked():
    with pytest.raises(ConfigError, match="mitigation"):
        parse_config(tiny_config(mitigation={"name": "intruders", "mitigation_lambda": [1.5]}))
    with pytest.raises(ConfigError, match="threshold_epsilon"):
        parse_config(tiny_config(mitigation={"name": "intruders", "threshold_epsilon": 0}))
    with pytest.raises(ConfigError, match=r"intruders.*LoRA adapters only"):
        plan_runs(parse_config(tiny_config(mitigation="intruders", method={"name": "dora"})))


def test_penalties_hold_the_model_near_the_base(swept):
    _, _, _, _, rows = swept
    control = _last_kl(rows, "none")
    assert _last_kl(rows, "l2sp:lam=100.0") < 0.1 * control
    assert _last_kl(rows, "ewc:lam=100.0,fisher_samples=4") < 0.5 * control


def test_kl_arm_lowers_kl_on_the_text_it_trains_on(swept, tokenizer):
    cfg, out, _, runs, _ = swept
    pool, _ = general_pool(None, "train", cfg.forgetting, _forgetting(cfg, tokenizer), tokenizer,
                           cfg.train.context_length, None)
    part = pool.select(pool_rows(0, 8, len(pool), 0 + 2 * POOL_SEED))  # the rows its 4 steps trained on
    kl = {}
    for key in ("none", "kl:lam=1000.0,rows=2"):
        model = attach(load_model("tiny-random-llama").model, cfg.methods[0], 2)
        load_weights(model, out / "runs" / runs[key]["run_id"] / "adapter-step4")
        with torch.no_grad():
            kl[key] = float(kl_to_base(model, part.input_ids, part.attention_mask))
    assert kl["kl:lam=1000.0,rows=2"] < 0.5 * kl["none"]


def test_anchored_kl_holds_the_model_near_the_base_on_its_own_text(swept):
    _, _, _, _, rows = swept
    anchored, general, control = (rows[k][-1] for k in ("kl:lam=1000.0,rows=2,source=finetune",
                                                         "kl:lam=1000.0,rows=2", "none"))
    assert anchored["ft_kl"] < 0.5 * control["ft_kl"]  # KL on held-out fine-tuning tokens: what it anchors
    assert anchored["ft_loss"] != general["ft_loss"]


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_anchored_kl_penalty_is_the_kl_on_the_batch_loss_positions(direction):
    """AnchorHooks' penalty = lam * mean over the step's loss positions of the KL in the named direction,
    computed here with torch's own kl_div."""
    from forgetscale.data.blocks import IGNORE
    from forgetscale.mitigations.kl import AnchorHooks

    cfg = parse_config(tiny_config())
    model = attach(load_model("tiny-random-llama").model, cfg.method[0], 2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE  # a prompt: no loss there
    labels[1, 9:] = IGNORE
    blocks = Blocks(ids, labels, torch.ones_like(ids))
    hooks = AnchorHooks(lam=2.0, rows=2, device=torch.device("cpu"), direction=direction)
    assert hooks.mix(0, blocks) is blocks
    penalty = hooks.penalty(model, 0)
    with torch.no_grad():
        tuned = torch.log_softmax(model(input_ids=ids[:2]).logits[:, :-1], -1)
        with model.disable_adapter():
            base = torch.log_softmax(model(input_ids=ids[:2]).logits[:, :-1], -1)
    p, q = (base, tuned) if direction == "forward" else (tuned, base)
    per_token = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    keep = labels[:2, 1:] != IGNORE
    assert int(keep.sum()) == 7 + 4  # labels 5..11 and 5..8, predicted from one position earlier
    assert float(penalty.detach()) == pytest.approx(2.0 * float(per_token[keep].mean()), rel=1e-5)
    assert penalty.requires_grad and float(penalty.detach()) > 0


def test_kl_direction_default_keeps_old_run_ids():
    from forgetscale.mitigations import KLSpec

    assert "direction" not in KLSpec().identity()
    assert KLSpec(direction="reverse").identity()["direction"] == "reverse"
    assert KLSpec(direction="reverse").tag() == "kl:direction=reverse"


def test_freeze_leaves_the_lower_layers_untouched(swept):
    from safetensors.torch import load_file

    _, out, _, runs, _ = swept
    assert runs["freeze:layers=1"]["trainable_params"] == runs["none"]["trainable_params"] // 2
    weights = load_file(out / "runs" / runs["freeze:layers=1"]["run_id"] / "adapter-step4" / "adapter_model.safetensors")
    lower = [v for k, v in weights.items() if ".layers.0." in k and "lora_B" in k]
    upper = [v for k, v in weights.items() if ".layers.1." in k and "lora_B" in k]
    assert lower and all(torch.count_nonzero(v) == 0 for v in lower)
    assert all(torch.count_nonzero(v) > 0 for v in upper)


def test_replay_arms_change_training_and_self_text_is_cached(swept, tokenizer):
    cfg, out, store, runs, rows = swept
    for key in ("replay:p=0.5", "self_replay:p=0.5,samples=8"):
        assert rows[key][-1]["ft_loss"] != rows["none"][-1]["ft_loss"]
        assert rows[key][-1]["tokens_seen"] == rows["none"][-1]["tokens_seen"]  # same batch size, full blocks
    cached = list((out / "selfgen").glob("*.pt"))
    assert len(cached) == 1
    # a later build reads the cache: it has no model to generate with, and gets the same blocks
    later = ArmInputs(cfg, None, tokenizer, _forgetting(cfg, tokenizer), cfg.train.context_length, None, out)
    assert len(later.generated(8, 1.0)) == 8
    model = load_model("tiny-random-llama").model
    again = generate_blocks(model, tokenizer, 8, cfg.train.context_length, 1.0, 0, torch.device("cpu"))
    assert torch.equal(again.input_ids, torch.load(cached[0], weights_only=False)["input_ids"])  # seeded


# -- the matched-loss comparison on simulated rows -------------------------------------------------

H = 3.0  # base entropy of the simulated forgetting set


def _simulated_rows(seeds=(0, 1, 2)) -> tuple[list[dict], list[dict]]:
    """Runs whose KL is a known function of L_ft: the control's KL = 0.5 (4 - L_ft); 'halved' has half of it
    at every L_ft (a moved line); 'short' follows the control's line but stops at L_ft 3.4; 'stiff' barely
    fine-tunes; scale runs sit on the control's line at s * (its gain); intruders runs below it near its end."""
    runs, rows = [], []
    rng = np.random.default_rng(0)
    arms = {"none": (0.5, 3.0), "halved": (0.25, 3.0), "short": (0.5, 3.4), "stiff": (0.1, 3.95)}
    for arm, (k, end) in arms.items():
        for seed in seeds:
            run_id = f"{arm}-{seed}"
            cfg = {"mitigation": {"name": arm}}
            runs.append({"run_id": run_id, "config": json.dumps(cfg), "arm": arm, "seed": seed})
            for step, ft in zip(range(0, 50, 8), np.linspace(4.0, end + 0.01 * seed, 7), strict=True):
                kl = k * (4.0 - ft) + (rng.normal(0, 1e-3) if step else 0.0)
                rows.append({"run_id": run_id, "step": step, "ft_loss": ft, "forget_kl": kl, "forget_ce": H + kl,
                             "wall_s": step * (1.3 if arm == "halved" else 1.0)})
        if arm == "none":
            for seed in seeds:
                for s in (0.25, 0.5, 0.75):
                    run_id = f"scale{s}-{seed}"
                    ft = 4.0 - s * (1.0 - 0.01 * seed)
                    runs.append({"run_id": run_id, "arm": "scale", "seed": seed, "config": json.dumps(
                        {"mitigation": {"name": "scale", "s": s, "source_run": f"none-{seed}"}})})
                    rows.append({"run_id": run_id, "step": 48, "ft_loss": ft, "forget_kl": 0.5 * (4.0 - ft),
                                 "forget_ce": H + 0.5 * (4.0 - ft), "wall_s": 0.0})
                for lam in (0.0, 0.5):  # intruders: a short curve above the control's end, 0.1 (1 - lam) below its line
                    run_id = f"intruders{lam}-{seed}"
                    ft = end + 0.01 * seed + 0.2 * (1.0 - lam)
                    kl = 0.5 * (4.0 - ft) - 0.1 * (1.0 - lam)
                    runs.append({"run_id": run_id, "arm": "intruders", "seed": seed, "config": json.dumps(
                        {"mitigation": {"name": "intruders", "mitigation_lambda": lam, "source_run": f"none-{seed}"}})})
                    rows.append({"run_id": run_id, "step": 48, "ft_loss": ft, "forget_kl": kl, "forget_ce": H + kl,
                                 "wall_s": 0.0})
    return runs, rows


def _store(path: Path) -> Store:
    runs, rows = _simulated_rows()
    store = Store(path)
    for r in runs:
        store.add_run(RunRecord(run_id=r["run_id"], model="sim", dataset="sim", method="lora",
                                method_config={"name": "lora"}, rank=8, trainable_params=1000, seed=r["seed"],
                                mitigation=r["arm"], config=json.loads(r["config"]), status="finished"))
    for row in rows:
        store.add_checkpoint(CheckpointRow(**{**row, "ft_loss_train": row["ft_loss"], "base_entropy": H,
                                              "tokens_seen": row["step"]}))
    return store


def test_frontier_and_interpolation_are_exact_on_a_line():
    import pandas as pd

    points = pd.DataFrame({"ft": [4.0, 3.5, 3.6, 3.0, 3.2], "kl": [0.0, 0.25, 9.0, 0.5, 9.0]})
    kept = frontier(points)
    assert kept["ft"].tolist() == [4.0, 3.5, 3.0]  # points that do not set a new lowest L_ft are dominated
    assert at_loss(kept, 3.25, "kl") == pytest.approx(0.375)
    assert math.isnan(at_loss(kept, 2.9, "kl")) and at_loss(kept, 4.0, "kl") == 0.0


def test_comparison_tells_a_moved_line_from_a_slide(tmp_path):
    store = _store(tmp_path / "sim")
    cells = compare(store.frame(), store.runs(), FitOptions(n_bootstrap=200))
    assert len(cells) == 1
    arms = {a["arm"]: a for a in cells[0]["arms"]}
    halved = arms["halved"]
    assert halved["verdict"] == "moved the line down" and halved["status"] == "compared"
    for p in halved["matched"]:
        assert p["reduction"] == pytest.approx(0.5, abs=0.01)
        assert p["reduction_ci"][0] > 0.45 and p["reduction_ci"][1] < 0.55
        assert p["f_diff"] == pytest.approx(p["kl_diff"])  # L_f and KL differ by the same base entropy
    assert halved["cost"]["ratio"] == pytest.approx(1.3)
    assert halved["line"]["f"]["slope"] == pytest.approx(-0.25, abs=0.01)
    short = arms["short"]
    assert short["verdict"] == "slid along the line"
    assert short["depth"] == pytest.approx((4.0 - 3.42) / 0.99)
    assert abs(short["matched"][-1]["reduction"]) < 0.05
    assert arms["stiff"]["verdict"].startswith("not comparable")
    scale = arms["scale"]
    assert scale["verdict"] == "slid along the line" and scale["cost"]["ratio"] == 1.0
    assert scale["cost"]["note"]
    intruders = arms["intruders"]  # its curve: lambda 0, 0.5, then the control's own row as lambda 1
    assert intruders["cost"]["ratio"] == 1.0 and intruders["matched_ft"] == pytest.approx(3.02)
    assert math.isnan(intruders["matched"][0]["reduction"])  # 25% of the way: above the curve's start
    assert intruders["matched"][-1]["reduction"] > 0.0


def test_no_verdict_on_the_line_when_either_line_is_not_identified():
    gap, ok = {"value": -0.3, "ci": [-0.4, -0.2], "at": 3.0}, {"status": "converged", "r2": 0.9}
    assert verdict(gap, 0.9, 0.5, {"control": ok, "arm": ok}) == "moved the line down"
    flat = {"status": "not identifiable: c_f_ft interval spans 40x", "r2": 0.12, "min_step": 10}
    said = verdict(gap, 0.9, 0.5, {"control": flat, "arm": ok})
    assert said.startswith("no verdict: the control's Eq. 4 line is not identified (R^2 0.12) on steps >= 10")
    assert said.endswith("(or refit from an earlier step: fit --min-step)")
    assert verdict(gap, 0.1, 0.5, {"control": flat, "arm": ok}).startswith("not comparable")  # depth first


def test_fit_and_report_show_the_matched_comparison(tmp_path):
    run_dir = tmp_path / "sim"
    _store(run_dir).close()
    assert main(["fit", str(run_dir), "--bootstrap", "50"]) == 0
    doc = json.loads((run_dir / "laws.json").read_text())
    assert {a["arm"] for a in doc["mitigation"][0]["arms"]} == {"halved", "short", "stiff", "scale", "intruders"}
    from forgetscale.report import build_report

    path, _ = build_report(run_dir)
    page = path.read_text()
    assert "Mitigation: does an arm move the trade-off line?" in page
    assert "moved the line down" in page and "slid along the line" in page and "<td>intruders</td>" in page
    assert (run_dir / "figures" / "sim-lora-r8_mitigation.png").stat().st_size > 10_000


# -- the real embedded model ---------------------------------------------------------------------

@pytest.mark.slow
def test_real_model_runs_kl_and_scale(tmp_path):
    cfg = parse_config({
        "finetune": {"dataset": "embedded:news", "heldout_max_tokens": 128},
        "forgetting": {"dataset": "embedded:wikipedia", "max_tokens": 128},
        "method": {"name": "lora", "ranks": [4]},
        "train": {"steps": 2, "checkpoints": [0, 2], "batch_size": 2, "context_length": 32, "lr": 0.003},
        "mitigation": [{"name": "kl", "lam": 1.0}, {"name": "scale", "s": [0.0, 1.0]}],
    })
    store = run_sweep(cfg, tmp_path, progress=False)
    runs = {(r["mitigation"], json.loads(r["config"])["mitigation"].get("s")): r for r in store.runs()}
    assert all(r["status"] == "finished" for r in runs.values())
    control = store.checkpoints(runs[("none", None)]["run_id"])
    kl = store.checkpoints(runs[("kl", None)]["run_id"])
    assert kl[0]["forget_kl"] == 0.0 and kl[-1]["forget_kl"] > 0 and kl[-1]["ft_loss"] != control[-1]["ft_loss"]
    s0 = store.checkpoints(runs[("scale", 0.0)]["run_id"])[-1]
    s1 = store.checkpoints(runs[("scale", 1.0)]["run_id"])[-1]
    assert s0["forget_kl"] == 0.0 and s0["ft_loss"] == control[0]["ft_loss"]
    assert s1["forget_kl"] == control[-1]["forget_kl"] and s1["ft_loss"] == control[-1]["ft_loss"]
