"""The Ray executor across nodes: a cluster of a head and two worker nodes on this machine
(`ray.cluster_utils.Cluster`, Ray's own multi-node test harness), one worker node removed while its run is
in flight; the sweep finishes with every row once, equal to the local executor's."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time

import pytest

from forgetscale.config import parse_config
from forgetscale.store import Store
from forgetscale.sweep import run_sweep
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow

COLUMNS = ("ft_loss", "train_loss", "forget_ce", "forget_ce_hard", "base_entropy", "forget_kl", "ft_kl", "tokens_seen")


def _config():
    # two runs long enough that a node can be removed while they train; one torch thread, as the local rows
    return parse_config(tiny_config(method={"name": "lora", "ranks": [1, 2]},
                                    train={"threads": 1, "steps": 40, "checkpoints": [0, 10, 20, 30, 40]},
                                    resources={"cpus_per_run": 1, "max_retries": 2}))


def _rows(store: Store) -> dict[tuple[str, int], tuple]:
    return {(r["run_id"], r["step"]): tuple(r[c] for c in COLUMNS) for r in store.checkpoints()}


def _stored_steps(out) -> set[int]:
    path = out / "results.sqlite"
    if not path.exists():
        return set()
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as conn:
        try:
            return {step for (step,) in conn.execute("SELECT step FROM checkpoints")}
        except sqlite3.OperationalError:
            return set()


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    head = Cluster(initialize_head=True, connect=True,
                   head_node_args={"num_cpus": 0, "include_dashboard": False})  # runs go to the workers
    workers = [head.add_node(num_cpus=1) for _ in range(2)]
    head.wait_for_nodes()
    yield head, workers
    ray.shutdown()
    head.shutdown()


def test_a_worker_node_removed_mid_run_and_the_sweep_finishes_equal_to_local(cluster, tmp_path):
    head, workers = cluster
    local = _rows(run_sweep(_config(), tmp_path / "local", progress=False))
    out = tmp_path / "ray"
    removed = threading.Event()

    def remove_a_node_once_training() -> None:
        deadline = time.monotonic() + 900  # a loaded machine: the first step can take minutes
        while time.monotonic() < deadline:
            if any(step > 0 for step in _stored_steps(out)):  # both runs are in flight (one per worker node)
                head.remove_node(workers[1])
                removed.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=remove_a_node_once_training, daemon=True)
    watcher.start()
    store = run_sweep(_config(), out, progress=False, executor="ray")
    watcher.join(timeout=5)
    assert removed.is_set()
    runs = store.runs()
    assert [r["status"] for r in runs] == ["finished", "finished"]
    logs = "".join((out / "runs" / r["run_id"] / "log.txt").read_text() for r in runs)
    assert "attempt 1 failed" in logs and "attempt 2 on" in logs  # the run on the removed node ran again
    got = _rows(store)
    assert sorted(got) == sorted(local)  # every row once
    for key, row in got.items():
        for a, b, column in zip(row, local[key], COLUMNS, strict=True):
            assert (a is None) == (b is None), (key, column)
            assert a is None or abs(a - b) <= 1e-6 * max(abs(b), 1e-8), (key, column, a, b)
