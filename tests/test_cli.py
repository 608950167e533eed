"""The CLI: one-line errors with exit code 2, export, and the demo config."""

import json

import pandas as pd
import pytest
import yaml

from forgetscale.cli import main
from forgetscale.cli.demo import demo_config_path
from forgetscale.config import load_config
from forgetscale.laws.studies import paper
from forgetscale.store import Store


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"model": "no-such-org/no-such-model-xyz"}, "model 'no-such-org/no-such-model-xyz': "),
        ({"model": "/nonexistent/dir"}, "model '/nonexistent/dir': no such file or directory"),
        ({"finetune": {"dataset": "/nonexistent/data.jsonl"}}, "/nonexistent/data.jsonl: file not found"),
        ({"method": {"name": "lora", "ranks": [0]}}, "method.ranks: each rank must be >= 1"),
        ({"train": {"steps": 0}}, "train.steps: input should be greater than 0"),
        ({"train": {"steps": 4, "checkpoints": [0, 9]}}, "checkpoints: each must be between 0 and train.steps=4"),
        ({"train": {"context_length": 4096}}, "train.context_length: must be <= the model's 2048 positions"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, tiny_cfg, write_yaml, patch, expected, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_yaml(tiny_cfg(**patch))
    code, out, err = _run(["sweep", str(config), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.startswith("forgetscale: ") and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_malformed_jsonl_names_its_line(tmp_path, capsys, tiny_cfg, write_yaml):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "ok"}\n{"text": "ok"}\n{oops}\n')
    code, _, err = _run(["sweep", str(write_yaml(tiny_cfg(finetune={"dataset": str(data)}))), "--out",
                         str(tmp_path / "o")], capsys)
    assert code == 2 and f"{data}:3: malformed JSON" in err


def test_empty_dataset(tmp_path, capsys, tiny_cfg, write_yaml):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    code, _, err = _run(["sweep", str(write_yaml(tiny_cfg(finetune={"dataset": str(data)}))), "--out",
                         str(tmp_path / "o")], capsys)
    assert code == 2 and "dataset is empty" in err


def test_bad_set_override(tmp_path, capsys, tiny_cfg, write_yaml):
    code, _, err = _run(["sweep", str(write_yaml(tiny_cfg())), "--out", str(tmp_path), "--set", "train.steps"], capsys)
    assert code == 2 and "--set: must be KEY=VALUE" in err


def test_chat_sweep_and_export(tmp_path, capsys, tiny_cfg, write_yaml, chat_file):
    cfg = tiny_cfg(finetune={"dataset": str(chat_file), "max_examples": None}, method={"name": "lora", "ranks": [2]},
                   train={"context_length": 48})
    out = tmp_path / "run"
    code, stdout, _ = _run(["sweep", str(write_yaml(cfg)), "--out", str(out), "--no-progress"], capsys)
    assert code == 0 and "forget CE" in stdout and "results.sqlite" in stdout
    code, stdout, _ = _run(["export", str(out), "--format", "csv"], capsys)
    assert code == 0
    frame = pd.read_csv(out / "checkpoints.csv")
    assert len(frame) == 3 and set(frame["method"]) == {"lora"} and frame["trainable_params"].iloc[0] == 2 * 2240
    code, _, _ = _run(["export", str(out), "--format", "parquet", "-o", str(tmp_path / "x.parquet")], capsys)
    assert code == 0
    _assert_export_matches_store(pd.read_parquet(tmp_path / "x.parquet"), out / "results.sqlite")


def _same(a, b) -> bool:
    """Equal values, with SQLite's NULL and pandas' NaN/None/NA all meaning 'missing'."""
    missing_a, missing_b = a is None or bool(pd.isna(a)), b is None or bool(pd.isna(b))
    return missing_a == missing_b and (missing_a or a == b)


def _assert_export_matches_store(exported, db):
    """The export holds exactly the store's rows: every checkpoint column and every run column it carries,
    value by value, read from the SQLite tables directly (not through Store, which the export itself uses)."""
    import sqlite3

    from forgetscale.store import CHECKPOINT_COLUMNS, RUN_COLUMNS

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    checkpoints = {(r["run_id"], r["step"]): dict(r) for r in conn.execute("SELECT * FROM checkpoints")}
    runs = {r["run_id"]: dict(r) for r in conn.execute("SELECT * FROM runs")}
    conn.close()
    columns = list(exported.columns)
    assert len(columns) == len(set(columns)), f"duplicate columns: {columns}"
    missing = [c for c in CHECKPOINT_COLUMNS if c not in columns]
    assert not missing, f"export lacks checkpoint column(s) {missing}"
    unknown = [c for c in columns if c not in CHECKPOINT_COLUMNS and c not in RUN_COLUMNS]
    assert not unknown, f"export has column(s) in neither table: {unknown}"
    assert len(exported) == len(checkpoints) > 0
    keys = [(r, int(s)) for r, s in zip(exported["run_id"], exported["step"], strict=True)]
    assert sorted(keys) == sorted(checkpoints), "exported (run_id, step) pairs differ from the store's"
    for column in columns:
        table = checkpoints if column in CHECKPOINT_COLUMNS else None
        for key, value in zip(keys, exported[column], strict=True):
            stored = table[key][column] if table is not None else runs[key[0]][column]
            assert _same(value, stored), f"column {column!r}, row {key}: exported {value!r}, stored {stored!r}"
    # the order the laws read: the store's own frame, columns and rows as they are
    pd.testing.assert_frame_equal(exported, Store(db).frame(), check_dtype=False)


def test_export_without_store(tmp_path, capsys):
    code, _, err = _run(["export", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no results store here" in err


def test_demo_config_meets_the_issue():
    cfg = load_config(demo_config_path())
    ranks = cfg.methods[0].ranks
    assert max(ranks) / min(ranks) >= 16 and len(ranks) >= 3
    assert len(cfg.train.checkpoint_steps) >= 6
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.finetune.dataset == "embedded:news"
    assert yaml.safe_load(demo_config_path().read_text())["forgetting"]["dataset"] == "embedded:wikipedia"


def test_demo_ends_with_fit_report_and_a_verdict(tmp_path, capsys):
    """`forgetscale demo` = sweep, then `fit` and `report` with their defaults, then a verdict of a few lines;
    `--verbose` adds fit's tables and the laws beside Table 1."""
    out = tmp_path / "demo"
    tiny = ["model.name=tiny-random-llama", "method.ranks=[1,2,4]", "train.steps=4", "train.checkpoints=[0,2,3,4]",
            "train.batch_size=2", "train.context_length=32", "train.threads=1", "train.dtype=float32",
            "finetune.heldout_max_tokens=256", "finetune.max_examples=60", "forgetting.max_tokens=256"]
    argv = ["demo", "--out", str(out), "--no-progress", "--bootstrap", "20"]
    code, stdout, err = _run(argv + [x for kv in tiny for x in ("--set", kv)], capsys)
    assert code == 0, err
    assert (out / "report.html").is_file() and list((out / "figures").glob("*.png"))
    laws = json.loads((out / "laws.json").read_text())
    # fit's defaults, not a demo-specific fit (only the resample count was asked for)
    assert laws["options"]["target"] == "forget_ce" and laws["options"]["ft_column"] == "ft_loss"
    assert laws["options"]["min_step"] == "auto" and laws["options"]["n_bootstrap"] == 20
    assert {r["status"] for r in Store(out / "results.sqlite").runs()} == {"finished"}
    linear = laws["groups"][0]["laws"]["linear"]
    verdict = stdout[stdout.index("verdict for"):].strip().splitlines()
    assert len(verdict) <= 8, stdout  # a verdict, not ~100 lines of constants
    assert f"forgetting rises {linear['params']['c_f_ft']:.4g}" in stdout  # the fitted Eq. 4 slope
    assert "laws identified:" in stdout and "held-out forecast" in stdout
    assert verdict[-2].startswith(f"report: {out / 'report.html'}") and "fitted laws beside the paper's" not in stdout
    code, stdout, err = _run(argv + ["--verbose"] + [x for kv in tiny for x in ("--set", kv)], capsys)  # resumes
    assert code == 0, err
    assert "fitted laws beside the paper's" in stdout and "paper: news" in stdout
    assert f"{linear['params']['c_f_ft']:.4g}" in stdout  # the fitted Eq. 4 slope is what the table shows
    assert f"{paper.CONSTANTS['news']['c_f_ft']:.4g}" in stdout  # the paper's news slope beside it
