"""A RUN_DIR is never lost or hijacked: exports cannot overwrite the store, one sweep process at a time,
finished runs are verified before they are skipped, a failed start does not claim the folder, a crafted
resume state runs no code, and a sweep whose runs failed says so in its exit code."""

from __future__ import annotations

import sqlite3

import pytest
import yaml

from forgetscale.cli import main
from forgetscale.config import parse_config
from forgetscale.errors import StoreError
from forgetscale.store import RunDirLock, Store
from forgetscale.sweep import run_sweep
from tests.conftest import tiny_config


def _digest(run_dir):
    import hashlib

    return hashlib.sha256((run_dir / "results.sqlite").read_bytes()).hexdigest()


def _one_line(capsys, argv, match, code=2, store=None):
    """The command fails with one `forgetscale:` line naming `match`; a given store is byte-identical after."""
    before = _digest(store) if store is not None else None
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("forgetscale: ") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    if store is not None:
        assert _digest(store) == before, f"{argv} changed {store}/results.sqlite"
    return err


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("swept")
    run_sweep(parse_config(tiny_config(method={"name": "lora", "ranks": [2]}, train={"threads": 1})), run_dir,
              progress=False)
    return run_dir


def test_export_refuses_to_write_over_the_store(capsys, swept):
    before = Store(swept, create=False).checkpoints()
    _one_line(capsys, ["export", str(swept), "--format", "csv", "-o", str(swept / "results.sqlite")], "results.sqlite",
              store=swept)
    _one_line(capsys, ["export", str(swept), "-o", str(swept / "results.sqlite-wal")], "keeps in", store=swept)
    assert Store(swept, create=False).checkpoints() == before and len(before) == 3


def test_export_into_a_missing_folder_is_one_line(capsys, swept, tmp_path):
    _one_line(capsys, ["export", str(swept), "-o", str(tmp_path / "nope" / "rows.csv")], "does not exist", store=swept)


def test_a_second_sweep_process_is_refused_naming_the_holder(tmp_path):
    cfg = parse_config(tiny_config(train={"threads": 1}))
    with RunDirLock(tmp_path), pytest.raises(StoreError, match=r"in use by pid \d+ on "):
        run_sweep(cfg, tmp_path, progress=False)
    assert not (tmp_path / "results.sqlite").exists()  # refused before the store was touched


def test_a_finished_run_missing_rows_is_run_again(tmp_path):
    cfg = parse_config(tiny_config(method={"name": "lora", "ranks": [2]}, train={"threads": 1}))
    store = run_sweep(cfg, tmp_path, progress=False)
    reference = [(r["step"], r["forget_kl"]) for r in store.checkpoints()]
    with sqlite3.connect(tmp_path / "results.sqlite") as conn:
        conn.execute("DELETE FROM checkpoints WHERE step = 4")
    again = run_sweep(cfg, tmp_path, progress=False)
    assert [(r["step"], r["forget_kl"]) for r in again.checkpoints()] == reference
    assert again.runs()[0]["status"] == "finished"


def test_a_failed_start_does_not_claim_the_folder(capsys, tmp_path, write_yaml):
    out = tmp_path / "out"
    bad = write_yaml(tiny_config(finetune={"dataset": str(tmp_path / "missing.jsonl")}), "bad.yaml")
    assert main(["sweep", str(bad), "--out", str(out), "--no-progress"]) == 2
    capsys.readouterr()
    good = write_yaml(tiny_config(method={"name": "lora", "ranks": [2]}, train={"threads": 1}), "good.yaml")
    assert main(["sweep", str(good), "--out", str(out), "--no-progress"]) == 0
    runs = Store(out, create=False).runs()
    assert [r["status"] for r in runs] == ["finished"]


def test_a_crafted_resume_state_runs_no_code(capsys, tmp_path, write_yaml):
    import pickle

    cfg = tiny_config(method={"name": "lora", "ranks": [2]}, train={"threads": 1})
    path = write_yaml(cfg)
    out = tmp_path / "out"
    from forgetscale.runs import plan_runs

    run_id = plan_runs(parse_config(cfg))[0].run_id
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = out / "runs" / run_id / "state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(pickle.dumps(Payload()))
    _one_line(capsys, ["sweep", str(path), "--out", str(out), "--no-progress"], "not a resume state")
    assert not marker.exists()


def test_a_sweep_whose_runs_fail_exits_non_zero(capsys, tmp_path, write_yaml):
    path = write_yaml(tiny_config(method={"name": "lora", "ranks": [2]},
                                  train={"threads": 1, "lr": 1e30, "max_grad_norm": None}))
    out = tmp_path / "out"
    for _ in range(2):  # the re-run retries the failed run, which fails again
        assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 1
        assert "1 of 1 runs failed" in capsys.readouterr().err


@pytest.mark.parametrize("setting, match", [
    ("train.steps=[1,", "train.steps: the value is not valid YAML"),
    ("train.steps.x=1", "'train.steps' is a value, not a section"),
])
def test_bad_overrides_are_one_line(capsys, swept, write_yaml, setting, match):
    path = write_yaml(tiny_config(method={"name": "lora", "ranks": [2]}, train={"threads": 1}))
    _one_line(capsys, ["sweep", str(path), "--out", str(swept), "--set", setting], match, store=swept)


def test_an_override_through_the_model_shorthand_sets_the_name(tmp_path):
    from forgetscale.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny-random-llama"}))
    assert load_config(path, {"model.revision": "main"}).model.name == "tiny-random-llama"
    assert load_config(path, {"model.name": "other"}).model.name == "other"


@pytest.mark.parametrize("name, content, match", [
    ("d.jsonl", None, "is a directory"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2: not UTF-8"),
    ("bad.txt", b"one line\nsecond \xff line\n", "bad.txt:2: not UTF-8"),
])
def test_unreadable_dataset_files_are_one_line(capsys, tmp_path, write_yaml, name, content, match):
    target = tmp_path / name
    if content is None:
        target.mkdir()
    else:
        target.write_bytes(content)
    path = write_yaml(tiny_config(finetune={"dataset": str(target)}))
    _one_line(capsys, ["sweep", str(path), "--out", str(tmp_path / "o"), "--no-progress"], match)


@pytest.mark.parametrize("raised, match", [
    (sqlite3.OperationalError("database or disk is full"), "the disk is full"),
    (OSError(28, "No space left on device"), "the disk is full"),
    (OSError(30, "Read-only file system", "/mnt/ro/out"), "cannot write /mnt/ro/out"),
])
def test_a_full_disk_or_read_only_folder_is_one_line(capsys, tmp_path, write_yaml, monkeypatch, raised, match):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(Store, "add_run", fail)
    path = write_yaml(tiny_config())
    _one_line(capsys, ["sweep", str(path), "--out", str(tmp_path / "o"), "--no-progress"], match)


def test_an_unreachable_hub_fails_in_seconds_with_one_line(capsys, tmp_path, write_yaml, monkeypatch):
    from forgetscale.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    try:
        path = write_yaml(tiny_config(model="someorg/no-such-model"))
        _one_line(capsys, ["sweep", str(path), "--out", str(tmp_path / "o"), "--no-progress"],
                  "the hub cannot be reached from this machine")
    finally:
        hub_reachable.cache_clear()


@pytest.mark.parametrize("setting, match", [
    ("safety.limit=[1,", "safety.limit: the value is not valid YAML"),
    ("safety.limit.x=1", "is a value, not a section"),
    ("safety.limit=0", "--set evals"),
])
def test_bad_eval_overrides_are_one_line(capsys, swept, setting, match):
    _one_line(capsys, ["eval", str(swept), "--suite", "safety", "--set", setting], match, store=swept)


@pytest.mark.parametrize("text, match", [
    ("train:\n  steps: 4\ntrain:\n  lr: 0.1\n", "c.yaml:3: not valid YAML (key 'train' appears twice (also on line 1)"),
    ("train:\n  steps: true\n", "train.steps: must be a number, not true/false"),
    ("train:\n  lr: .inf\n", "train.lr: input should be a finite number"),
    ("method: []\n", "method: must list at least one method"),
    ("method:\n  name: lora\n  alpha: .nan\n", "method.alpha: input should be a finite number"),
])
def test_values_yaml_would_accept_silently_are_refused(capsys, tmp_path, swept, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = _one_line(capsys, ["sweep", str(path), "--out", str(tmp_path / "o")], match)
    assert not (tmp_path / "o").exists(), err
    _one_line(capsys, ["sweep", str(path), "--out", str(swept)], match, store=swept)  # a stored sweep: untouched


@pytest.mark.parametrize("argv, match", [
    (["--params", "nan", "--steps", "10"], "--params must be finite"),
    (["--params", "inf", "--steps", "10"], "--params must be finite"),
    (["--params", "1e6", "--steps", "1.5"], "--steps must be whole numbers"),
])
def test_predict_refuses_non_numbers(capsys, tmp_path, argv, match):
    from forgetscale.laws.studies.synthetic import simulate_sweep

    run_dir = tmp_path / "sim"
    simulate_sweep(run_dir, ranks=(8, 32, 128), steps=range(20, 201, 20))
    assert main(["fit", str(run_dir), "--bootstrap", "0"]) == 0
    capsys.readouterr()
    _one_line(capsys, ["predict", str(run_dir), *argv], match)


@pytest.mark.parametrize("argv, match", [
    (["sweep"], "the following arguments are required"),
    (["export", "x", "--format", "xml"], "invalid choice"),
    (["nosuchverb"], "invalid choice"),
])
def test_usage_errors_are_one_line(capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("forgetscale: ") and "\n" not in err and match in err, err


def test_sigterm_stops_a_sweep_like_ctrl_c(tmp_path, write_yaml):
    import os
    import signal
    import subprocess
    import sys
    import time

    path = write_yaml(tiny_config(method={"name": "lora", "ranks": [2]}, train={"threads": 1, "steps": 400,
                                                                             "checkpoints": [0, 1, 400]}))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "forgetscale", "sweep", str(path), "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first stored row, then stop it
        if (out / "results.sqlite").exists() and Store(out, create=False).checkpoints():
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("forgetscale: interrupted"), err
    run = Store(out, create=False).runs()[0]
    assert run["status"] == "pending" and Store(out, create=False).checkpoints()


# -- item 17: messages that point at the right place ------------------------------------------------
@pytest.mark.parametrize("text, match, not_in", [
    ("train:\n  steps: 4\n  checkpoints: [0, 8]\n", "c.yaml:3 train.checkpoints: each must be between 0 and "
     "train.steps=4; got 8", "got dict"),
    ("train:\n  steps: 4\n  lr:\n    a: 1\n", 'c.yaml:3 train.lr: input should be a valid number; got a mapping '
     '{"a": 1}', "got dict"),
    ("evals:\n  steps:\n    x: 1\n", "c.yaml:2 evals.steps: input should be a valid list", "list[int]"),
])
def test_yaml_type_errors_point_at_the_key_line(capsys, tmp_path, swept, text, match, not_in):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = _one_line(capsys, ["sweep", str(path), "--out", str(swept)], match, store=swept)
    assert not_in not in err and not err.endswith("got dict"), err


def test_a_malformed_json_line_names_line_and_column(capsys, tmp_path, write_yaml):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n{"text": broken}\n')
    path = write_yaml(tiny_config(finetune={"dataset": str(data)}))
    err = _one_line(capsys, ["sweep", str(path), "--out", str(tmp_path / "o"), "--no-progress"],
                    "d.jsonl:2: malformed JSON at column 10 (expecting value)")
    assert not err.rstrip(")").endswith(" at"), err


def test_csv_records_are_numbered_by_data_row_not_by_training_split(capsys, tmp_path, write_yaml):
    import pandas as pd

    rows = [{"question": f"What is {i} plus {i}?", "response": f"{2 * i}."} for i in range(1, 21)]
    rows[10]["response"] = ""  # data row 11 (line 12 of the file, after the header)
    data = tmp_path / "chat.csv"
    pd.DataFrame(rows).to_csv(data, index=False)
    path = write_yaml(tiny_config(finetune={"dataset": str(data), "heldout_fraction": 0.3},
                                  train={"context_length": 128}))
    _one_line(capsys, ["sweep", str(path), "--out", str(tmp_path / "o"), "--no-progress"],
              "chat.csv record 11: missing or empty 'response'")


@pytest.mark.parametrize("message, match", [
    ("database or disk is full", "the disk is full"),
    ("attempt to write a readonly database", "is read-only"),
    ("unable to open database file", "cannot be opened for writing"),
])
def test_storage_errors_are_not_called_a_foreign_store(capsys, swept, monkeypatch, message, match):
    def fail(*args, **kwargs):
        raise sqlite3.OperationalError(message)

    monkeypatch.setattr(sqlite3, "connect", fail)  # what sqlite says on a full disk or a read-only mount
    err = _one_line(capsys, ["export", str(swept), "--format", "csv", "-o", "/dev/null"], match)
    assert "not a forgetscale results store" not in err, err
