"""The MLflow sink (`--log mlflow[:URI]`): the store read back through mlflow.MlflowClient holds every
checkpoint row once, also after a sweep killed mid-run and resumed, plus eval summaries and measured runs;
bad input (an unreachable URI, a bad --log value, MLflow missing) is one line, exit 2, nothing stored lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forgetscale.cli import main
from forgetscale.store import Store
from forgetscale.tracking import METRICS
from tests.conftest import tiny_config

mlflow = pytest.importorskip("mlflow")

STEPS = 24
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _client(run_dir: Path):
    return mlflow.MlflowClient(f"sqlite:///{(run_dir.resolve() / 'mlflow.db').as_posix()}")


def _children(run_dir: Path) -> dict[str, object]:
    """forgetscale run_id -> its MLflow run."""
    client = _client(run_dir)
    exp = client.get_experiment_by_name("forgetscale/tiny")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return {r.data.tags["forgetscale.run_id"]: r for r in runs}


def _logged_rows(run_dir: Path) -> dict[tuple[str, str], list[int]]:
    """(forgetscale run_id, metric) -> every step MLflow holds for it, duplicates included."""
    client = _client(run_dir)
    out = {}
    for run_id, run in _children(run_dir).items():
        if run_id == "sweep":
            continue
        for metric in METRICS:
            out[(run_id, metric)] = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
    return out


def _expected(run_dir: Path) -> dict[tuple[str, str], list[int]]:
    store = Store(run_dir)
    return {(r["run_id"], m): sorted(c["step"] for c in store.checkpoints(r["run_id"]) if c[m] is not None)
            for r in store.runs() for m in METRICS}


def _metric_count(db: Path) -> int:
    """Metric values in MLflow's SQLite file, read without an MLflow client (a client would migrate the
    schema too, racing the sweep's own)."""
    import sqlite3

    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM metrics").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A sweep with --log mlflow killed (SIGKILL: no clean-up at all) once MLflow holds some of its rows, then
    the same command again."""
    tmp = tmp_path_factory.mktemp("tracking")
    path = tmp / "sweep.yaml"
    data = tiny_config(method={"name": "lora", "ranks": [2, 4]},
                       train={"steps": STEPS, "checkpoints": list(range(0, STEPS + 1, 2)), "threads": 1})
    path.write_text(yaml.safe_dump(data))
    out = tmp / "run"
    argv = ["sweep", str(path), "--out", str(out), "--no-progress", "--log", "mlflow"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "forgetscale", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if _metric_count(out / "mlflow.db"):
                break
        assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {k: v for k, v in _logged_rows(out).items()}
    stored_before = sum(len(Store(out).checkpoints(r["run_id"])) for r in Store(out).runs())
    assert main(argv) == 0  # resumes the killed run, then the one not started
    return out, before, stored_before


def test_killed_and_resumed_sweep_logs_every_row_once(killed_and_resumed):
    out, before, stored_before = killed_and_resumed
    total = 2 * (STEPS // 2 + 1)
    assert 0 < stored_before < total  # killed mid-sweep
    assert 0 < sum(map(len, before.values()))  # and MLflow already held some rows
    logged, expected = _logged_rows(out), _expected(out)
    assert sum(len(v) for k, v in expected.items() if k[1] == "forget_kl") == total
    assert logged == expected  # every stored row once: no step logged twice, none missing
    client = _client(out)
    store = Store(out)
    children = _children(out)
    for run in store.runs():
        mlrun = children[run["run_id"]]
        assert mlrun.info.status == "FINISHED" and mlrun.data.params["forgetscale.method"] == run["method"]
        assert mlrun.data.tags["mlflow.parentRunId"] == children["sweep"].info.run_id
        last = {c["step"]: c for c in store.checkpoints(run["run_id"])}[STEPS]
        assert mlrun.data.metrics["forget_kl"] == pytest.approx(last["forget_kl"], rel=1e-12)
        assert client.get_metric_history(mlrun.info.run_id, "ft_loss")[0].value is not None
    assert children["sweep"].data.params["name"] == "tiny"


def test_eval_and_fit_artefacts_are_logged_once(killed_and_resumed):
    out, _, _ = killed_and_resumed
    argv = ["eval", str(out), "--suite", "choice", "--set", "choice.limit=4", "--set", "choice.protocols=[loglik]",
            "--no-progress", "--log", "mlflow"]
    assert main(["fit", str(out)]) == 0
    assert main(argv) == 0
    assert main(argv) == 0  # nothing new: nothing logged twice
    client = _client(out)
    children = _children(out)
    parent = children.pop("sweep")
    key = "eval/choice/loglik/accuracy"
    base = client.get_metric_history(parent.info.run_id, key)
    assert len(base) == 1 and base[0].step == 0
    assert base[0].value == pytest.approx(next(s["value"] for s in Store(out).eval_summaries("choice")
                                               if s["model_key"] == "base" and s["metric"] == "accuracy"))
    for run in children.values():
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [STEPS]
        assert len(client.get_metric_history(run.info.run_id, "eval/choice/loglik/agreement_with_base")) == 1
    names = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "laws.json" in names
    assert _logged_rows(out) == _expected(out)


def test_measure_logs_its_rows(killed_and_resumed, tmp_path):
    out, _, _ = killed_and_resumed
    run_id = Store(out).runs()[0]["run_id"]
    target = tmp_path / "measured"
    assert main(["measure", "--base", "tiny-random-llama", "--adapter", str(out / "runs" / run_id / f"adapter-step{STEPS}"),
                 "--out", str(target), "--no-progress", "--set", "forgetting.max_tokens=256",
                 "--set", "train.context_length=32", "--log", "mlflow"]) == 0
    client = mlflow.MlflowClient(f"sqlite:///{(target.resolve() / 'mlflow.db').as_posix()}")
    exp = client.get_experiment_by_name("forgetscale/sweep")
    runs = {r.data.tags["forgetscale.run_id"]: r for r in client.search_runs([exp.experiment_id])}
    stored = Store(target).checkpoints()
    assert len(runs) == 2 and len(stored) == 2  # the parent and the measured adapter (steps 0 and 1)
    mine = next(r for k, r in runs.items() if k != "sweep")
    assert sorted(m.step for m in client.get_metric_history(mine.info.run_id, "forget_kl")) == [0, STEPS]


def test_bad_tracking_input_is_one_line_exit_2(killed_and_resumed, tmp_path, write_yaml, tiny_cfg, capsys):
    out, _, _ = killed_and_resumed
    store = Store(out)
    before = (sorted(map(str, store.checkpoints())), sorted(map(str, store.eval_summaries())))
    started = time.time()
    assert main(["eval", str(out), "--suite", "choice", "--no-progress", "--log", "mlflow:http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the MLflow tracking URI http://127.0.0.1:9" in err
    assert time.time() - started < 60  # one short try, not MLflow's minutes of retries
    new = tmp_path / "new"
    assert main(["sweep", str(write_yaml(tiny_cfg())), "--out", str(new), "--log", "mlflow:http://127.0.0.1:9"]) == 2
    assert "cannot reach" in capsys.readouterr().err and not (new / "results.sqlite").exists()
    assert main(["eval", str(out), "--suite", "choice", "--log", "wandb"]) == 2
    assert "--log: must be mlflow or mlflow:URI" in capsys.readouterr().err
    store = Store(out)
    assert (sorted(map(str, store.checkpoints())), sorted(map(str, store.eval_summaries()))) == before


def test_missing_mlflow_is_one_line_naming_the_extra(killed_and_resumed):
    out, _, _ = killed_and_resumed
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'mlflow' or name.startswith('mlflow.'):\n"
            "            raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from forgetscale.cli import main\n"
            f"sys.exit(main(['eval', {str(out)!r}, '--suite', 'choice', '--no-progress', '--log', 'mlflow']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "pip install 'forgetscale[mlflow]'" in done.stderr
