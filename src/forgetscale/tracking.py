"""The MLflow sink (`--log mlflow[:URI]` on sweep, measure and eval): the store, mirrored into MLflow.

One MLflow run per forgetscale run (nested under one run for the RUN_DIR): the run's config and method
as params, every checkpoint row as metrics at its step, its eval summaries at the evaluated step; the
parent holds the sweep config, the base model's eval summaries, laws.json, report.html and figures.

The store stays the source of truth: `sync` reads it and logs only what MLflow lacks (a checkpoint metric
already logged at a step is never logged again; an eval summary is logged again only when its value
changed), so a killed and resumed sweep, or the same command run twice, logs every row once. During a
sweep a background thread syncs every few seconds; each command syncs once more at its end.
The default URI is a SQLite store inside RUN_DIR (MLflow 3 refuses a bare file store). The extra is
`forgetscale[mlflow]`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forgetscale.errors import ConfigError, StoreError
from forgetscale.evals.labels import run_labels
from forgetscale.store import CHECKPOINT_COLUMNS, Store

LOG_HELP = ("mlflow: also log to MLflow, a SQLite store RUN_DIR/mlflow.db; mlflow:URI: that tracking server "
            "(extra [mlflow]; docs/integrations.md)")
EXTRA = "--log mlflow needs MLflow: pip install 'forgetscale[mlflow]'"
DEFAULT_DB = "mlflow.db"
ARTIFACTS = "mlartifacts"
SYNC_EVERY_S = 2.0
METRICS = tuple(c for c in CHECKPOINT_COLUMNS if c not in ("run_id", "step"))
FILES = ("laws.json", "report.html")
TAG_DIR, TAG_RUN = "forgetscale.run_dir", "forgetscale.run_id"


def tracking_uri(spec: str, run_dir: str | Path) -> str:
    """`mlflow` -> a SQLite store in RUN_DIR; `mlflow:URI` -> URI."""
    kind, sep, uri = spec.partition(":")
    if kind != "mlflow" or (sep and not uri.strip()):
        raise ConfigError(f"--log: must be mlflow or mlflow:URI (e.g. mlflow:http://host:5000); got {spec!r}")
    if uri.strip():
        return uri.strip()
    return f"sqlite:///{(Path(run_dir).resolve() / DEFAULT_DB).as_posix()}"


def _name(text: str) -> str:
    return re.sub(r"[^/\w.\- ]", "_", text)  # MLflow's portable metric and param names


def _flat(data: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    value = data if isinstance(data, str) else json.dumps(data, sort_keys=True)
    return {_name(prefix.rstrip(".")): value[:6000]}


@contextlib.contextmanager
def _no_retries() -> Iterator[None]:
    """One short try: an unreachable server is reported at once instead of after MLflow's minutes of retries."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


class MlflowSink:
    """The MLflow side of one RUN_DIR. Opening it checks the extra and that the URI answers, before
    anything else runs (a bad URI stores nothing)."""

    def __init__(self, spec: str, run_dir: str | Path, experiment: str) -> None:
        try:
            import mlflow  # noqa: F401
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError(EXTRA) from None
        import logging

        for name in ("mlflow", "alembic"):  # their notices on creating a store are not ours to print
            logging.getLogger(name).setLevel(logging.WARNING)
        self.run_dir = Path(run_dir).resolve()
        self.uri = tracking_uri(spec, run_dir)
        local = self.uri.startswith("sqlite:///") and self.uri.endswith(f"/{DEFAULT_DB}")
        if local:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.lock = threading.Lock()
        try:
            with _no_retries():
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    location = (self.run_dir / ARTIFACTS).as_uri() if local else None
                    self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
                else:
                    self.experiment_id = found.experiment_id
        except Exception as err:  # connection refused, DNS, auth, a database that is not MLflow's
            raise ConfigError(f"--log: cannot reach the MLflow tracking URI {self.uri} ({_first_line(err)}); "
                              "start the server or give another URI") from None
        self._ids: dict[str, str] = {}
        # what this process knows MLflow holds (read once per MLflow run, then kept up to date), so a sync
        # every few seconds costs one read of the store, not a query per metric
        self._params_seen: dict[str, set[str]] = {}
        self._logged: dict[tuple[str, str], dict[int, float]] = {}
        self._status: dict[str, str] = {}
        self._files: dict[str, tuple[float, int]] = {}

    # -- runs -------------------------------------------------------------------------------------
    def _run(self, key: str, name: str, parent: str | None) -> str:
        """The MLflow run of one forgetscale run (key = run_id) or of the RUN_DIR (key = ''), created once."""
        if key in self._ids:
            return self._ids[key]
        query = f"tags.`{TAG_DIR}` = '{self.run_dir.as_posix()}' and tags.`{TAG_RUN}` = '{key or 'sweep'}'"
        hits = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        if hits:
            run_id = hits[0].info.run_id
        else:
            tags = {TAG_DIR: self.run_dir.as_posix(), TAG_RUN: key or "sweep"}
            if parent:
                tags["mlflow.parentRunId"] = parent
            run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
        self._ids[key] = run_id
        return run_id

    def _params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        if run_id not in self._params_seen:
            self._params_seen[run_id] = set(self.client.get_run(run_id).data.params)
        have = self._params_seen[run_id]
        new = [Param(k, v) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i:i + 100])
        have.update(p.key for p in new)

    def _terminate(self, run_id: str, status: str) -> None:
        if run_id not in self._status:
            self._status[run_id] = self.client.get_run(run_id).info.status
        if self._status[run_id] != status:
            self.client.set_terminated(run_id, status)
            self._status[run_id] = status

    def _artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        """Upload a file when it is new or changed since this process last uploaded it."""
        stat = path.stat()
        if self._files.get(str(path)) != (stat.st_mtime, stat.st_size):
            self.client.log_artifact(run_id, str(path), folder)
            self._files[str(path)] = (stat.st_mtime, stat.st_size)

    def _metrics(self, run_id: str, values: list[tuple[str, int, float]], *, update: bool) -> int:
        """Log (key, step, value) MLflow lacks; `update`: also a value that differs from the one logged."""
        import time

        from mlflow.entities import Metric

        for key in {k for k, _, _ in values}:
            if (run_id, key) not in self._logged:
                history = sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
                self._logged[(run_id, key)] = {m.step: m.value for m in history}  # the latest entry per step
        now = int(time.time() * 1000)
        new = []
        for k, step, v in values:
            seen = self._logged[(run_id, k)]
            if step not in seen or (update and abs(seen[step] - v) > 1e-12):
                new.append(Metric(k, v, now, step))
        for i in range(0, len(new), 1000):
            self.client.log_batch(run_id, metrics=new[i:i + 1000])
        for m in new:
            self._logged[(run_id, m.key)][m.step] = m.value
        return len(new)

    def sync(self) -> int:
        """Mirror the store into MLflow; returns the number of metric values logged."""
        with self.lock:
            try:
                store = Store(self.run_dir, create=False)
            except StoreError:
                return 0  # nothing stored yet
            try:
                return self._sync(store)
            finally:
                store.close()

    def _sync(self, store: Store) -> int:
        stored = store.get_meta("sweep_config")
        parent = self._run("", self.run_dir.name, None)
        if stored:
            self._params(parent, _flat(json.loads(stored)))
        labels = run_labels(store)
        summaries = store.eval_summaries()
        logged = self._metrics(parent, _eval_values([s for s in summaries if s["model_key"] == "base"]), update=True)
        for run in store.runs():
            run_id = self._run(run["run_id"], labels[run["run_id"]], parent)
            config = json.loads(run["config"])
            self._params(run_id, {**_flat(config), "forgetscale.run_id": run["run_id"],
                                  "forgetscale.method": run["method"], "forgetscale.rank": str(run["rank"]),
                                  "forgetscale.mitigation": run["mitigation"],
                                  "forgetscale.method_config": run["method_config"][:6000]})
            rows = store.checkpoints(run["run_id"])
            values = [(m, row["step"], float(row[m])) for row in rows for m in METRICS if row[m] is not None]
            logged += self._metrics(run_id, values, update=False)
            mine = [s for s in summaries if s["run_id"] == run["run_id"]]
            logged += self._metrics(run_id, _eval_values(mine), update=True)
            status = {"finished": "FINISHED", "failed": "FAILED"}.get(run["status"])
            if status:
                self._terminate(run_id, status)
        statuses = {r["status"] for r in store.runs()}
        done = "FINISHED" if statuses == {"finished"} else "FAILED" if statuses == {"finished", "failed"} else None
        if done:
            self._terminate(parent, done)
        for name in FILES:
            if (self.run_dir / name).is_file():
                self._artifact(parent, self.run_dir / name)
        for figure in sorted((self.run_dir / "figures").glob("*.png")):
            self._artifact(parent, figure, "figures")
        return logged

    # -- during a command -------------------------------------------------------------------------
    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        """Sync every SYNC_EVERY_S while the body runs (a sweep writing rows), and once at its end, also
        after an interrupt (what was stored is in MLflow too)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(SYNC_EVERY_S):
                try:
                    self.sync()
                except Exception as err:  # the server went away: the store has everything; the end sync retries
                    print(f"forgetscale: --log: MLflow sync failed ({_first_line(err)}); retrying", file=sys.stderr)

        thread = threading.Thread(target=loop, name="forgetscale-mlflow", daemon=True)
        thread.start()
        try:
            yield
        except BaseException:  # interrupted or failed: log what was stored, then let the error speak
            stop.set()
            thread.join()
            with contextlib.suppress(Exception):
                self.sync()
            raise
        stop.set()
        thread.join()
        self.finish()

    def finish(self) -> None:
        try:
            self.sync()
        except Exception as err:
            raise ConfigError(f"--log: could not log to {self.uri} ({_first_line(err)}); every row is in "
                              f"{self.run_dir / 'results.sqlite'}: re-run the command with --log to sync") from None


def _eval_values(summaries: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    out = []
    for s in summaries:
        key = _name(f"eval/{s['suite']}/{s['protocol']}/{s['metric']}")
        step = int(s["step"] or 0)
        if s["value"] is not None:
            out.append((key, step, float(s["value"])))
        if s.get("vs_base") is not None:
            out.append((f"{key}/vs_base", step, float(s["vs_base"])))
    return out


def open_sink(spec: str | None, run_dir: str | Path, experiment: str) -> MlflowSink | None:
    """The sink `--log` asks for (None without --log)."""
    return None if spec is None else MlflowSink(spec, run_dir, experiment)
