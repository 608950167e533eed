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


def _one_line(capsys, argv, match, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("forgetscale: ") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("swept")
    run_sweep(parse_config(tiny_config(method={"name": "lora", "ranks": [2]}, train={"threads": 1})), run_dir,
              progress=False)
    return run_dir


def test_export_refuses_to_write_over_the_store(capsys, swept):
    before = Store(swept, create=False).checkpoints()
    _one_line(capsys, ["export", str(swept), "--format", "csv", "-o", str(swept / "results.sqlite")], "results.sqlite")
    _one_line(capsys, ["export", str(swept), "-o", str(swept / "results.sqlite-wal")], "keeps in")
    assert Store(swept, create=False).checkpoints() == before and len(before) == 3


def test_export_into_a_missing_folder_is_one_line(capsys, swept, tmp_path):
    _one_line(capsys, ["export", str(swept), "-o", str(tmp_path / "nope" / "rows.csv")], "does not exist")


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
    from forgetscale.plan import plan_runs

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
def test_bad_overrides_are_one_line(capsys, tmp_path, write_yaml, setting, match):
    path = write_yaml(tiny_config())
    _one_line(capsys, ["sweep", str(path), "--out", str(tmp_path / "o"), "--set", setting], match)


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
    _one_line(capsys, ["eval", str(swept), "--suite", "safety", "--set", setting], match)
