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
  mitigation TEXT       'none' unless a mitigation arm is configured
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

meta         key/value: schema_version, sweep_config (JSON)
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from forgetscale.errors import StoreError

SCHEMA_VERSION = "1"
RESULTS_FILE = "results.sqlite"

RUN_COLUMNS = (
    "run_id", "model", "dataset", "method", "method_config", "rank", "trainable_params", "seed",
    "mitigation", "config", "status", "error", "created_at", "updated_at",
)
CHECKPOINT_COLUMNS = (
    "run_id", "step", "ft_loss", "ft_loss_train", "train_loss", "forget_ce", "forget_ce_hard",
    "base_entropy", "forget_kl", "ft_kl", "tokens_seen", "wall_s",
)

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
"""


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
            raise StoreError(f"{path}: not a forgetscale results store ({err})") from None
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
    def add_run(self, row: dict[str, Any]) -> None:
        """Insert a planned run; a run already stored keeps its status and rows."""
        now = time.time()
        values = {"status": "pending", "error": None, "mitigation": "none", **row, "created_at": now, "updated_at": now}
        for key in ("method_config", "config"):
            if not isinstance(values[key], str):
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
    def add_checkpoint(self, row: dict[str, Any]) -> None:
        """Insert one checkpoint row; writing the same (run, step) again replaces it, never duplicates it."""
        values = {c: _clean(row.get(c)) for c in CHECKPOINT_COLUMNS}
        cols = ", ".join(CHECKPOINT_COLUMNS)
        marks = ", ".join(f":{c}" for c in CHECKPOINT_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in CHECKPOINT_COLUMNS[2:])
        with self.conn:
            self.conn.execute(
                f"INSERT INTO checkpoints({cols}) VALUES ({marks}) "
                f"ON CONFLICT(run_id, step) DO UPDATE SET {updates}",
                values,
            )

    def add_checkpoints(self, rows: Iterable[dict[str, Any]]) -> None:
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

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
