import math

import pytest

from forgetscale.errors import StoreError
from forgetscale.store import CheckpointRow, RunRecord, Store


def _run(run_id="r1", **kw):
    return RunRecord(**{"run_id": run_id, "model": "m", "dataset": "d", "method": "lora", "method_config": {"r": 1},
                        "rank": 8, "trainable_params": 100, "seed": 0, "config": {}, **kw})


def test_store_round_trip_and_no_duplicates(tmp_path):
    store = Store(tmp_path)
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.add_run(_run())
    store.add_run(_run(status="finished"))  # a run already stored keeps its status
    assert store.run("r1")["status"] == "pending"
    store.add_checkpoint(CheckpointRow(run_id="r1", step=0, forget_ce=1.0, tokens_seen=0, wall_s=0.0))
    store.add_checkpoint(CheckpointRow(run_id="r1", step=0, forget_ce=2.0, tokens_seen=0, wall_s=0.0))
    store.add_checkpoint(CheckpointRow(run_id="r1", step=5, ft_loss=math.nan, tokens_seen=10, wall_s=1.0))
    rows = store.checkpoints("r1")
    assert [r["step"] for r in rows] == [0, 5]
    assert rows[0]["forget_ce"] == 2.0 and rows[1]["ft_loss"] is None
    store.delete_checkpoints_after("r1", 0)
    assert [r["step"] for r in store.checkpoints("r1")] == [0]
    frame = store.frame()
    assert list(frame["trainable_params"]) == [100] and "forget_kl" in frame.columns


def test_missing_or_foreign_store(tmp_path):
    with pytest.raises(StoreError, match="no results store"):
        Store(tmp_path / "nothing", create=False)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.sqlite").write_text("not a database at all" * 100)
    with pytest.raises(StoreError, match="not a forgetscale results store"):
        Store(tmp_path / "x")
