"""One attempt at one run, inside a Ray worker: it trains with `train_run` exactly as the local executor
does, but writes no SQLite. Every store write becomes a message streamed back to the driver (the one
writer) as it happens, so an interrupted or killed attempt loses only what it had not yet reported.

Messages (tuples, in order): ("hello", info), ("update_run", fields), ("delete_after", step),
("checkpoint", row), ("progress", step), ("file", relative path, bytes, last chunk?), ("done", seconds).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forgetscale.artefacts import STATE_FILE, RunFolder
from forgetscale.executors.local import execute_plan
from forgetscale.host_memory import apply_allocator
from forgetscale.metric.references import MemoryReference
from forgetscale.models import compute_dtype, measuring_dtype, resolve_device, weights_dtype
from forgetscale.runs import RunPlan
from forgetscale.store import CheckpointRow

FILE_CHUNK = 32 << 20  # bytes per streamed artefact message: large adapters never sit whole in one object
_PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class Fault:
    """A deliberate failure (FORGETSCALE_FAULT), to rehearse retries: `raise` or `kill` the worker after
    update step `step` of the run labelled `label`, in its first `attempts` attempts (0: every attempt)."""

    kind: str
    label: str
    step: int
    attempts: int = 0

    def fires(self, label: str, step: int, attempt: int) -> bool:
        return label == self.label and step == self.step and (self.attempts == 0 or attempt <= self.attempts)


@dataclass
class Attempt:
    """What the driver sends with one attempt: small, so a retry costs nothing to ship."""

    plan: RunPlan
    attempt: int
    known_steps: list[int]  # checkpoint steps the driver's store already holds for this run
    artefacts: str  # auto | shared | stream
    driver_node: str
    threads: int
    gpus: float  # GPUs Ray gave the task; 0: train on CPU even where CUDA is visible
    faults: list[Fault] = field(default_factory=list)


def ship(ctx: Any) -> tuple[Any, dict[str, tuple[np.ndarray, ...]]]:
    """The shared context for the object store: base predictions as numpy arrays (Ray maps those into every
    worker of a node without a copy; torch tensors would be copied per worker) and an absolute RUN_DIR."""
    # in-memory references only: the bounded kinds (forgetscale.metric.references) are small or a path, and pickle as they are
    names = [n for n in ("forgetting_ref", "heldout_ref") if isinstance(getattr(ctx, n), MemoryReference)]
    refs = {name: tuple(getattr(getattr(ctx, name), k).numpy() for k in ("probs", "neg_entropy", "argmax"))
            for name in names}
    bare = dataclasses.replace(ctx, **{n: None for n in names}, out_dir=Path(ctx.out_dir).resolve())
    return bare, refs


def _unship(shipped: tuple[Any, dict[str, tuple[np.ndarray, ...]]], out_dir: Path, gpus: float) -> Any:
    """The context as this worker needs it: its own device (Ray set CUDA_VISIBLE_DEVICES for a GPU task, but
    leaves it alone for a task without GPUs, which must not use the node's GPUs behind the scheduler's back)."""
    bare, refs = shipped
    wanted = bare.config.train.device
    device = torch.device("cpu") if gpus == 0 and wanted == "auto" else resolve_device(wanted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only shared memory: measure() only reads it
        restored = {name: MemoryReference(*(torch.from_numpy(a) for a in arrays)) for name, arrays in refs.items()}
    cfg = bare.config
    return dataclasses.replace(bare, device=device, dtype=compute_dtype(cfg, device), out_dir=out_dir, **restored,
                               measure_dtype=measuring_dtype(weights_dtype(cfg.model.dtype, device), cfg.forgetting.dtype,
                                                             device))


class RowStream:
    """A RowSink (forgetscale.train) whose writes become messages to the driver; keeps the run's checkpoint
    steps so that train_run's resume logic sees what the driver's store holds."""

    def __init__(self, put: Any, known_steps: list[int]) -> None:
        self._put, self._steps = put, set(known_steps)

    def update_run(self, run_id: str, **fields: Any) -> None:
        self._put(("update_run", fields))

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        return [{"step": s} for s in sorted(self._steps)]

    def delete_checkpoints_after(self, run_id: str, step: int) -> None:
        self._steps = {s for s in self._steps if s <= step}
        self._put(("delete_after", step))

    def add_checkpoint(self, row: CheckpointRow) -> None:
        self._steps.add(row.step)
        self._put(("checkpoint", row))


def _usable_state(folder: RunFolder, checkpoints: list[int], known: list[int]) -> int | None:
    """The step of a saved state that the driver's rows cover; a state whose rows never reached the store
    (the driver stopped first) is deleted, so the run restarts rather than skipping those rows."""
    state = folder.load_state(mmap=True)
    if state is None:
        return None
    step = state["step"]
    if {c for c in checkpoints if c <= step} <= set(known):
        return step
    folder.clear_state()
    return None


def _artefacts(run_dir: Path) -> Iterator[tuple]:
    """Every file a run left (adapters), in chunks; the resume state is not one (a finished run deletes it)."""
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != STATE_FILE):
        rel = path.relative_to(run_dir).as_posix()
        with path.open("rb") as fh:
            chunk = fh.read(FILE_CHUNK)
            while True:
                following = fh.read(FILE_CHUNK)
                yield ("file", rel, chunk, not following)
                if not following:
                    break
                chunk = following


def run_attempt(shipped: tuple[Any, dict], spec: Attempt) -> Iterator[tuple]:
    """A Ray generator task: train one run in a thread and yield its messages as they come."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    direct = spec.artefacts == "shared" or (spec.artefacts == "auto" and node == spec.driver_node)
    out_dir = shipped[0].out_dir if direct else Path(tempfile.mkdtemp(prefix="forgetscale-"))
    ctx = _unship(shipped, out_dir, spec.gpus)
    torch.set_num_threads(spec.threads)
    apply_allocator(ctx.config.train.allocator, ctx.device)  # a worker is its own process
    plan, tcfg = spec.plan, ctx.config.train
    folder = RunFolder(out_dir, plan.run_id)
    run_dir = folder.path
    resume = _usable_state(folder, tcfg.checkpoint_steps, spec.known_steps) if direct else None
    yield ("hello", {"host": socket.gethostname(), "pid": os.getpid(), "device": str(ctx.device),
                     "dtype": str(ctx.dtype or "off (float32)"), "threads": torch.get_num_threads(),
                     "artefacts": "shared RUN_DIR" if direct else "streamed", "resume_step": resume})

    messages: queue.Queue = queue.Queue()
    last_report = [0.0]

    def on_step(step: int, loss: float) -> None:
        for fault in spec.faults:
            if fault.fires(plan.label, step, spec.attempt):
                if fault.kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected fault (FORGETSCALE_FAULT) after step {step}")
        now = time.monotonic()
        if now - last_report[0] >= _PROGRESS_EVERY_S:
            last_report[0] = now
            messages.put(("progress", step))

    def work() -> None:
        try:
            execute_plan(plan, ctx, RowStream(messages.put, spec.known_steps), on_step)
            messages.put(("_end", None))
        except BaseException as err:  # noqa: BLE001 - re-raised in the task's thread below
            messages.put(("_error", err))

    started = time.perf_counter()
    thread = threading.Thread(target=work, name=f"forgetscale-{plan.label}", daemon=True)
    thread.start()
    try:
        while True:
            message = messages.get()
            if message[0] == "_error":
                raise message[1]
            if message[0] == "_end":
                break
            yield message
        thread.join()
        if not direct:
            yield from _artefacts(run_dir)
        yield ("done", time.perf_counter() - started)
    finally:
        if not direct:
            shutil.rmtree(out_dir, ignore_errors=True)
