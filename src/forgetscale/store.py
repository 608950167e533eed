"""The results store: one SQLite file per sweep (`RUN_DIR/results.sqlite`), the source of truth.

Schema (version 1):

runs         one row per planned fine-tuning run
  run_id TEXT PK        stable hash of everything that defines the run (resume key)
  model, dataset        model name and fine-tuning dataset spec
  method TEXT           registered method name (lora, dora, ia3, top_layers, full, ...)
  method_config TEXT    JSON of the method's settings
  rank INTEGER          adapter rank (NULL for methods without one)
  trainable_params INT  P: exact count of trainable parameters
  seed INTEGER
  mitigation TEXT       'none' unless a mitigation arm is configured: the arm's name plus any setting
                        changed from its default ('kl', 'ewc:lam=0.0001'); config.mitigation holds all of
                        its settings (see forgetscale/mitigations/). Runs of the 'scale' arm are derived,
                        not trained: one per s, measured from the control run's saved weights, with
                        config.mitigation = {name: scale, s, source_run}, rows only at steps whose
                        weights were kept, wall_s = 0 and train_loss NULL;
                        likewise 'intruders' (one per mitigation_lambda)
  config TEXT           JSON of the full run config
  status TEXT           pending | running | finished | failed
  error TEXT            why a run failed
  created_at, updated_at REAL (unix time)

checkpoints  one row per (run, checkpoint step); PRIMARY KEY (run_id, step)
  ft_loss               held-out fine-tuning loss (nats/token)
  ft_loss_train         fine-tuning loss on a fixed sample of training blocks
  train_loss            mean training-batch loss since the previous checkpoint (NULL at step 0)
  forget_ce             soft forgetting CE against the base distribution (nats/token)
  forget_ce_hard        CE against the base model's argmax token
  base_entropy          H(p_base) on the forgetting set
  forget_kl             forget_ce - base_entropy = KL(p_base || p_tuned)
  ft_kl                 KL(p_base || p_tuned) on held-out fine-tuning tokens (cheap predictor)
  tokens_seen           training tokens consumed so far
  wall_s                training wall time so far (seconds, excludes evaluation)

eval_items   one row per (suite, evaluated model, protocol, item): what `forgetscale eval` saw and said
  suite, protocol       e.g. safety/greedy, choice/loglik, choice/generate, samples/greedy
  model_key             'base' or '<run_id>@<step>' (run_id NULL and step NULL for the base model)
  item_id, prompt       the item and the exact text the model was given
  output                the generation (choice/loglik: JSON of the option log-probabilities)
  prediction, gold      parsed answer and gold label (choice); NULL elsewhere
  correct, refused      0/1 (NULL where the suite has no such notion)
  extra                 JSON: category, refusal marker, ...
eval_summaries  one row per (suite, protocol, model_key, metric): k of n, value, 95% interval, and the
  paired difference to the base model on the same items (vs_base, vs_base_lo, vs_base_hi,
  within_noise = the interval contains 0); settings is the suite's settings JSON

meta         key/value: schema_version, sweep_config (JSON)
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from forgetscale.errors import ConfigError, StoreError

SCHEMA_VERSION = "1"
RESULTS_FILE = "results.sqlite"



@dataclass(frozen=True)
class RunRecord:
    """One planned or measured run, as every writer (sweep, `forgetscale measure`, the Trainer callback) stores
    it; the store adds created_at / updated_at. method_config and config are JSON-able dicts."""

    run_id: str
    model: str
    dataset: str
    method: str
    method_config: dict[str, Any]
    rank: int | None
    trainable_params: int | None
    seed: int
    config: dict[str, Any]
    mitigation: str = "none"
    status: str = "pending"
    error: str | None = None


@dataclass(frozen=True)
class CheckpointRow:
    """One run at one checkpoint step: the numbers the `checkpoints` table holds (see the schema above), as
    a sweep's loop, a derived run, `forgetscale measure` and the Trainer callback write them."""

    run_id: str
    step: int
    ft_loss: float | None = None
    ft_loss_train: float | None = None
    train_loss: float | None = None
    forget_ce: float | None = None
    forget_ce_hard: float | None = None
    base_entropy: float | None = None
    forget_kl: float | None = None
    ft_kl: float | None = None
    tokens_seen: int = 0
    wall_s: float = 0.0


RUN_COLUMNS = (*(f.name for f in fields(RunRecord)), "created_at", "updated_at")
CHECKPOINT_COLUMNS = tuple(f.name for f in fields(CheckpointRow))
# who holds a RUN_DIR, and the meta key its settings are stored under
CLAIMS = {"sweep": "sweep_config", "measure": "measure_settings"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    dataset TEXT NOT NULL,
    method TEXT NOT NULL,
    method_config TEXT NOT NULL,
    rank INTEGER,
    trainable_params INTEGER,
    seed INTEGER NOT NULL,
    mitigation TEXT NOT NULL DEFAULT 'none',
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'finished', 'failed')),
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    ft_loss REAL,
    ft_loss_train REAL,
    train_loss REAL,
    forget_ce REAL,
    forget_ce_hard REAL,
    base_entropy REAL,
    forget_kl REAL,
    ft_kl REAL,
    tokens_seen INTEGER NOT NULL,
    wall_s REAL NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS eval_items (
    suite TEXT NOT NULL,
    protocol TEXT NOT NULL,
    model_key TEXT NOT NULL,
    run_id TEXT,
    step INTEGER,
    item_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    output TEXT,
    prediction TEXT,
    gold TEXT,
    correct INTEGER,
    refused INTEGER,
    extra TEXT,
    PRIMARY KEY (suite, protocol, model_key, item_id)
);
CREATE TABLE IF NOT EXISTS eval_summaries (
    suite TEXT NOT NULL,
    protocol TEXT NOT NULL,
    model_key TEXT NOT NULL,
    metric TEXT NOT NULL,
    run_id TEXT,
    step INTEGER,
    k INTEGER,
    n INTEGER NOT NULL,
    value REAL,
    lo REAL,
    hi REAL,
    vs_base REAL,
    vs_base_lo REAL,
    vs_base_hi REAL,
    within_noise INTEGER,
    settings TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (suite, protocol, model_key, metric)
);
"""

EVAL_ITEM_COLUMNS = (
    "suite", "protocol", "model_key", "run_id", "step", "item_id", "prompt", "output", "prediction", "gold",
    "correct", "refused", "extra",
)
EVAL_SUMMARY_COLUMNS = (
    "suite", "protocol", "model_key", "metric", "run_id", "step", "k", "n", "value", "lo", "hi", "vs_base",
    "vs_base_lo", "vs_base_hi", "within_noise", "settings", "created_at",
)


class RunDirLock:
    """One writer per RUN_DIR: an exclusive lock on RUN_DIR/.lock, held while a sweep runs. The kernel drops
    it when the holder dies, so a killed sweep never leaves a stale lock; the file names the last holder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fh: Any = None

    def __enter__(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise StoreError(f"{self.path.parent}: in use by {holder}; wait for it to finish or stop it, then "
                             "re-run (a RUN_DIR takes one sweep process at a time)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _open_failure(path: Path, err: sqlite3.DatabaseError) -> str:
    """Why a store could not be opened: the machine (a full disk, a folder it may not write) or the file."""
    text = str(err)
    if "disk is full" in text:
        return f"{path}: the disk is full; free space and re-run (nothing stored is lost)"
    if "readonly" in text or "unable to open" in text or "disk I/O error" in text:
        reason = "read-only" if "readonly" in text else "cannot be opened for writing"
        return f"{path}: the folder or file is {reason} ({text}); choose a writable --out or fix its permissions"
    return f"{path}: not a forgetscale results store ({text})"


def _clean(value: Any) -> Any:
    """SQLite has no NaN: store non-finite floats as NULL."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Store:
    """A sweep's SQLite store. Every write commits at once, so a killed sweep loses nothing written."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        path = Path(path)
        if path.is_dir() or path.suffix != ".sqlite":
            path = path / RESULTS_FILE
        if not path.exists() and not create:
            raise StoreError(f"{path}: no results store here; run `forgetscale sweep CONFIG --out {path.parent}` first")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self.conn = sqlite3.connect(path, timeout=30.0)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            with self.conn:
                self.conn.executescript(_SCHEMA)
                self.conn.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
        except sqlite3.DatabaseError as err:
            raise StoreError(_open_failure(path, err)) from None
        version = self.get_meta("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{path}: schema version {version}; this forgetscale reads version {SCHEMA_VERSION}")

    # -- meta -------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row["value"]

    def set_meta(self, key: str, value: str) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- runs -------------------------------------------------------------------------------------
    def add_run(self, record: RunRecord) -> None:
        """Insert a planned run; a run already stored keeps its status and rows."""
        now = time.time()
        values = {**asdict(record), "created_at": now, "updated_at": now}
        for key in ("method_config", "config"):
            values[key] = json.dumps(values[key], sort_keys=True)
        cols = ", ".join(RUN_COLUMNS)
        marks = ", ".join(f":{c}" for c in RUN_COLUMNS)
        with self.conn:
            self.conn.execute(f"INSERT OR IGNORE INTO runs({cols}) VALUES ({marks})", values)

    def update_run(self, run_id: str, **fields: Any) -> None:
        unknown = set(fields) - set(RUN_COLUMNS)
        if unknown:
            raise StoreError(f"unknown run column(s): {', '.join(sorted(unknown))}")
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        with self.conn:
            self.conn.execute(f"UPDATE runs SET {sets} WHERE run_id = :run_id", {**fields, "run_id": run_id})

    def run(self, run_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else dict(row)

    def runs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY created_at, run_id")]

    # -- checkpoints ------------------------------------------------------------------------------
    def add_checkpoint(self, row: CheckpointRow) -> None:
        """Insert one checkpoint row; writing the same (run, step) again replaces it, never duplicates it."""
        values = {c: _clean(v) for c, v in asdict(row).items()}
        cols = ", ".join(CHECKPOINT_COLUMNS)
        marks = ", ".join(f":{c}" for c in CHECKPOINT_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in CHECKPOINT_COLUMNS[2:])
        with self.conn:
            self.conn.execute(
                f"INSERT INTO checkpoints({cols}) VALUES ({marks}) "
                f"ON CONFLICT(run_id, step) DO UPDATE SET {updates}",
                values,
            )

    def add_checkpoints(self, rows: Iterable[CheckpointRow]) -> None:
        for row in rows:
            self.add_checkpoint(row)

    def checkpoints(self, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            cur = self.conn.execute("SELECT * FROM checkpoints ORDER BY run_id, step")
        else:
            cur = self.conn.execute("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY step", (run_id,))
        return [dict(r) for r in cur]

    def delete_checkpoints_after(self, run_id: str, step: int) -> None:
        """Drop rows a crashed run wrote past its last saved state (they will be recomputed identically)."""
        with self.conn:
            self.conn.execute("DELETE FROM checkpoints WHERE run_id = ? AND step > ?", (run_id, step))

    def frame(self):
        """All checkpoints joined with their run's columns, as a pandas DataFrame (the laws' input)."""
        import pandas as pd

        query = (
            "SELECT r.run_id, r.model, r.dataset, r.method, r.method_config, r.rank, r.trainable_params, "
            "r.seed, r.mitigation, r.status, c.step, c.ft_loss, c.ft_loss_train, c.train_loss, c.forget_ce, "
            "c.forget_ce_hard, c.base_entropy, c.forget_kl, c.ft_kl, c.tokens_seen, c.wall_s "
            "FROM checkpoints c JOIN runs r USING (run_id) ORDER BY r.dataset, r.method, r.rank, r.seed, c.step"
        )
        return pd.read_sql_query(query, self.conn)

    # -- evals ------------------------------------------------------------------------------------
    def replace_eval_items(self, suite: str, model_key: str, rows: list[dict[str, Any]]) -> None:
        """Store one model's items for a suite, replacing what an earlier evaluation stored (one transaction)."""
        cols = ", ".join(EVAL_ITEM_COLUMNS)
        marks = ", ".join(f":{c}" for c in EVAL_ITEM_COLUMNS)
        values = []
        for row in rows:
            value = {c: _clean(row.get(c)) for c in EVAL_ITEM_COLUMNS}
            value["suite"], value["model_key"] = suite, model_key
            if value["extra"] is not None and not isinstance(value["extra"], str):
                value["extra"] = json.dumps(value["extra"], sort_keys=True)
            values.append(value)
        with self.conn:
            self.conn.execute("DELETE FROM eval_items WHERE suite = ? AND model_key = ?", (suite, model_key))
            self.conn.executemany(f"INSERT INTO eval_items({cols}) VALUES ({marks})", values)

    def eval_items(self, suite: str | None = None, model_key: str | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM eval_items WHERE 1=1", []
        if suite is not None:
            query, args = query + " AND suite = ?", [*args, suite]
        if model_key is not None:
            query, args = query + " AND model_key = ?", [*args, model_key]
        return [dict(r) for r in self.conn.execute(query + " ORDER BY suite, protocol, model_key, rowid", args)]

    def replace_eval_summaries(self, suite: str, rows: list[dict[str, Any]]) -> None:
        """Replace a suite's summaries for the models in `rows` (the others stay)."""
        cols = ", ".join(EVAL_SUMMARY_COLUMNS)
        marks = ", ".join(f":{c}" for c in EVAL_SUMMARY_COLUMNS)
        now = time.time()
        values = [{**{c: _clean(row.get(c)) for c in EVAL_SUMMARY_COLUMNS}, "suite": suite, "created_at": now}
                  for row in rows]
        keys = sorted({v["model_key"] for v in values})
        with self.conn:
            self.conn.executemany("DELETE FROM eval_summaries WHERE suite = ? AND model_key = ?",
                                  [(suite, k) for k in keys])
            self.conn.executemany(f"INSERT INTO eval_summaries({cols}) VALUES ({marks})", values)

    def eval_summaries(self, suite: str | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM eval_summaries", []
        if suite is not None:
            query, args = query + " WHERE suite = ?", [suite]
        return [dict(r) for r in self.conn.execute(query + " ORDER BY suite, protocol, model_key, metric", args)]

    # -- who holds the folder ---------------------------------------------------------------------
    def check_claim(self, kind: str, difference: Callable[[dict[str, Any]], str | None]) -> bool:
        """Refuse a RUN_DIR held by the other kind of writer, or by this kind with other settings (reads only);
        returns whether the folder is held.

        A folder is held once it stores a checkpoint row: a start that failed before measuring anything leaves
        it free. `difference(stored settings)` names the first key that differs (None: compatible)."""
        if self.conn.execute("SELECT 1 FROM checkpoints LIMIT 1").fetchone() is None:
            return False
        owner = next((k for k in ("measure", "sweep") if self.get_meta(CLAIMS[k]) is not None), kind)
        if owner != kind:  # measurements also record a sweep_config (for eval and report): measure_settings decides
            what = "a sweep" if owner == "sweep" else "measurements"
            raise StoreError(f"{self.path.parent}: holds {what}; {kind} into a new --out folder")
        stored = self.get_meta(CLAIMS[kind])
        key = None if stored is None else difference(json.loads(stored))
        if key is not None:
            what = "sweep" if kind == "sweep" else "measurements"
            raise ConfigError(f"{key}: differs from the {what} already stored in {self.path.parent}; "
                              f"use a new --out {'directory' if kind == 'sweep' else 'folder'}")
        return True

    def claim(self, kind: str, settings: dict[str, Any], difference: Callable[[dict[str, Any]], str | None]) -> None:
        """check_claim, then record `settings` as the folder's (once every input has been checked)."""
        if not self.check_claim(kind, difference):
            self.drop_runs_without_rows()  # nothing measured yet (a start that failed): the folder was not held
        self.set_meta(CLAIMS[kind], json.dumps(settings, sort_keys=True))

    def drop_runs_without_rows(self) -> int:
        """Forget planned runs that never stored a row (a start that failed before training); returns how many."""
        with self.conn:
            cur = self.conn.execute("DELETE FROM runs WHERE run_id NOT IN (SELECT DISTINCT run_id FROM checkpoints)")
        return cur.rowcount

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
