"""The Ray executor: each run of a sweep is a Ray task with the resources the config asks for; the driver
(this process) is the only writer of RUN_DIR/results.sqlite.

- The shared context (data blocks and the base model's predictions, computed once here) is put in Ray's
  object store once; every task reads it from there.
- Each attempt is a Ray generator task that streams its store writes back (executors/worker.py); the driver
  applies them as they arrive, so what was reported survives a driver stop.
- Retries are the driver's, not Ray's: a worker that dies or a run that raises gets up to
  `resources.max_retries` more attempts, then the run is recorded failed and the sweep goes on. A retried
  run continues from its saved state when the worker can reach RUN_DIR, and restarts otherwise.
- Ctrl-C cancels the tasks in flight and marks their runs pending; re-running the command resumes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forgetscale.errors import ConfigError, RunFailed
from forgetscale.executors.local import LocalExecutor, RunLog, failure_reason
from forgetscale.executors.worker import Attempt, Fault, run_attempt, ship
from forgetscale.runs import RunPlan
from forgetscale.store import Store

FAULT_ENV = "FORGETSCALE_FAULT"
_WAIT_S = 0.5  # the driver wakes at least this often, so Ctrl-C is never held up by a quiet cluster


@contextlib.contextmanager
def _signals_as_flag() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set an event instead of raising wherever the main thread happens to be."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stopped.set())
    try:
        yield stopped
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def parse_faults(text: str) -> list[Fault]:
    """FORGETSCALE_FAULT: comma-separated `KIND:LABEL:STEP[:ATTEMPTS]`, KIND raise or kill."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        ok = len(parts) in (3, 4) and parts[0] in ("raise", "kill") and all(p.isdigit() for p in parts[2:])
        if not ok:
            raise ConfigError(f"{FAULT_ENV}: must be KIND:LABEL:STEP[:ATTEMPTS] with KIND raise or kill; got {item!r}")
        faults.append(Fault(parts[0], parts[1], int(parts[2]), int(parts[3]) if len(parts) == 4 else 0))
    return faults


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray: Ray is not installed; run `pip install 'forgetscale[ray]'`") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail in seconds on a HOST:PORT where nothing listens (Ray itself keeps retrying for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return  # auto, local, ray://...: Ray resolves these itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise ConfigError(f"--address: nothing answers at {address} ({err.strerror or err}); start the cluster "
                          "with `ray start --head` or check the address") from None


class _Flight:
    """One attempt in flight."""

    def __init__(self, plan: RunPlan, attempt: int, log: RunLog) -> None:
        self.plan, self.attempt, self.log = plan, attempt, log
        self.step, self.started = 0, time.perf_counter()
        self.files: dict[str, Path] = {}


class RayExecutor:
    """Joins `address` (or RAY_ADDRESS), or starts a local Ray instance; a Ray already initialised in this
    process (a notebook, a test) is used as it is and left running."""

    def __init__(self, cfg: Any, *, address: str | None = None) -> None:
        self.ray = ray = _import_ray()
        self.cfg, self.res = cfg, cfg.resources
        self.faults = parse_faults(os.environ.get(FAULT_ENV, ""))
        self.owns_ray = not ray.is_initialized()
        target = address or os.environ.get("RAY_ADDRESS") or "local"
        if self.owns_ray:
            _check_reachable(target)
            try:
                ray.init(address=target, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ConfigError(f"--address: cannot join the Ray cluster at {target} ({failure_reason(err)})") from None
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        self.gpus = self.res.gpus_per_run if self.res.gpus_per_run is not None else (1.0 if cluster_gpus else 0.0)
        device = cfg.train.device
        if self.gpus == 0 and device.startswith("cuda"):
            self.close()
            raise ConfigError(f"resources.gpus_per_run: must be > 0 when train.device is {device}; got 0")
        index = device.partition(":")[2]
        if device.startswith("cuda:") and index.isdigit() and int(index) >= max(1, int(self.gpus)):
            self.close()
            raise ConfigError(f"train.device: a Ray task sees only the GPUs it was given (cuda:0 up); use auto or "
                              f"cuda; got {device}")
        if target == "local" and self.owns_ray:
            self._check_fits()

    def _check_fits(self) -> None:
        """A local instance cannot grow: a run it could never schedule is an error now, not a hang later."""
        total = self.ray.cluster_resources()
        need = {"CPU": self.res.cpus_per_run, "GPU": self.gpus}
        short = [f"{k} {v:g} > {total.get(k, 0):g}" for k, v in need.items() if v > total.get(k, 0)]
        if short:
            self.close()
            raise ConfigError(f"resources: one run needs more than this machine has ({', '.join(short)})")

    # -- driver loop ------------------------------------------------------------------------------
    def execute(self, plans: list[RunPlan], ctx: Any, store: Store, *, progress: bool = True) -> None:
        """Trained runs on the cluster; runs derived from another run's saved weights (they train nothing and
        must wait for it) afterwards on the driver, which sees RUN_DIR whatever the artefacts mode."""
        derived = [p for p in plans if getattr(p, "source", None) is not None]
        trained = [p for p in plans if getattr(p, "source", None) is None]
        if trained:
            self._execute_remote(trained, ctx, store, progress)
        if derived:
            LocalExecutor(self.cfg).execute(derived, ctx, store, progress=progress)

    def _execute_remote(self, plans: list[RunPlan], ctx: Any, store: Store, progress: bool) -> None:
        from tqdm.auto import tqdm

        ray, res, steps = self.ray, self.res, self.cfg.train.steps
        shared = ray.put(ship(ctx))
        if ctx.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()  # the base model is gone: give its cached memory back to the tasks
        # retries are ours (below); a GPU task gets a fresh process (max_calls=1): CUDA fixes its visible devices
        # when first used, and a reused worker would keep its last run's GPU and cached memory
        options: dict[str, Any] = {"num_cpus": res.cpus_per_run, "num_gpus": self.gpus, "max_retries": 0,
                                   "max_calls": 1 if self.gpus else 0}
        if res.memory_gb_per_run:
            options["memory"] = int(res.memory_gb_per_run * 2**30)
        task = ray.remote(**options)(run_attempt)
        driver_node = ray.get_runtime_context().get_node_id()
        threads = self.cfg.train.threads or max(1, int(res.cpus_per_run))
        limit = res.max_parallel or len(plans)
        queue: deque[tuple[RunPlan, int]] = deque((plan, 1) for plan in plans)
        flights: dict[Any, _Flight] = {}
        out_dir = Path(ctx.out_dir)
        bar = tqdm(total=len(plans) * steps, desc=f"sweep on ray ({len(plans)} runs)", unit="step",
                   disable=not progress, dynamic_ncols=True)
        with _signals_as_flag() as stopped:
            self._drive(ray, task, shared, queue, flights, limit, res, driver_node, threads, out_dir, store, bar,
                        stopped)

    def _drive(self, ray, task, shared, queue, flights, limit, res, driver_node, threads, out_dir, store, bar,
               stopped) -> None:
        """The driver loop. Ctrl-C / SIGTERM only set `stopped` (see _signals_as_flag); the loop turns it into
        KeyboardInterrupt at a safe point, so a signal landing inside ray.get cannot be taken by Ray for a
        task cancellation (which the loop would retry, finishing the sweep as if nothing was asked)."""
        try:
            while queue or flights:
                if stopped.is_set():
                    raise KeyboardInterrupt
                while queue and len(flights) < limit:
                    plan, attempt = queue.popleft()
                    known = [row["step"] for row in store.checkpoints(plan.run_id)]
                    spec = Attempt(plan, attempt, known, res.artefacts, driver_node, threads, self.gpus, self.faults)
                    flights[task.remote(shared, spec)] = _Flight(plan, attempt, RunLog(out_dir, plan.run_id))
                ready, _ = ray.wait(list(flights), num_returns=1, timeout=_WAIT_S)
                for gen in ready:
                    flight = flights[gen]
                    try:
                        message = ray.get(next(gen))
                    except StopIteration:
                        message = ("_lost", None)  # a generator ends only after "done": treat as a failure
                    except Exception as err:  # noqa: BLE001 - every failure kind is recorded, none stops the sweep
                        message = ("_failed", err)
                    if self._apply(message, flight, store, out_dir, bar):
                        del flights[gen]
                        retry = self._settle(message, flight, store, bar)
                        if retry:
                            queue.append((flight.plan, flight.attempt + 1))
        except KeyboardInterrupt:
            for gen, flight in flights.items():
                try:
                    ray.cancel(gen, force=True)
                except Exception:  # noqa: BLE001, S110 - the task may have ended meanwhile
                    pass
                store.update_run(flight.plan.run_id, status="pending", error=None)
                flight.log.write(f"attempt {flight.attempt} stopped: the driver was interrupted")
            raise
        finally:
            bar.close()

    def _apply(self, message: tuple, flight: _Flight, store: Store, out_dir: Path, bar: Any) -> bool:
        """Write one message into the store (or RUN_DIR); True when the attempt is over."""
        kind, run_id = message[0], flight.plan.run_id
        if kind == "hello":
            info = message[1]
            resumed = f", resuming from step {info['resume_step']}" if info["resume_step"] is not None else ""
            flight.log.write(f"{flight.plan.label}: attempt {flight.attempt} on {info['host']} (pid {info['pid']}), "
                             f"device {info['device']}, autocast {info['dtype']}, torch threads {info['threads']}, "
                             f"artefacts {info['artefacts']}{resumed}")
        elif kind == "update_run":
            store.update_run(run_id, **message[1])
        elif kind == "delete_after":
            store.delete_checkpoints_after(run_id, message[1])
        elif kind == "checkpoint":
            store.add_checkpoint(message[1])
            flight.log.checkpoint(message[1])
            self._advance(flight, message[1].step, bar)
        elif kind == "progress":
            self._advance(flight, message[1], bar)
        elif kind == "file":
            _, rel, data, last = message
            target = out_dir / "runs" / run_id / rel
            part = flight.files.get(rel)
            if part is None:
                target.parent.mkdir(parents=True, exist_ok=True)
                part = flight.files[rel] = target.with_name(target.name + ".part")
                part.unlink(missing_ok=True)
            with part.open("ab") as fh:
                fh.write(data)
            if last:
                part.replace(target)
        return kind in ("done", "_failed", "_lost")

    def _advance(self, flight: _Flight, step: int, bar: Any) -> None:
        if step > flight.step:
            bar.update(step - flight.step)
            flight.step = step

    def _settle(self, message: tuple, flight: _Flight, store: Store, bar: Any) -> bool:
        """Record how an attempt ended; True when the run gets another attempt."""
        plan, run_id, steps = flight.plan, flight.plan.run_id, self.cfg.train.steps
        if message[0] == "done":
            store.update_run(run_id, status="finished", error=None)
            flight.log.write(f"finished in {message[1]:.1f} s")
            bar.update(steps - flight.step)
            bar.write(f"run {plan.label} finished in {message[1]:.0f} s")
            return False
        err = message[1]
        cause = getattr(err, "cause", None) or err
        if isinstance(err, self.ray.exceptions.RayTaskError) and cause is not err:
            reason = f"{type(cause).__name__}: {failure_reason(cause)}"
        elif err is None:
            reason = "the task ended without finishing its run"
        else:
            reason = f"worker lost ({type(err).__name__}: {failure_reason(err)})"
        for part in flight.files.values():
            part.unlink(missing_ok=True)
        bar.update(-flight.step)
        if isinstance(cause, RunFailed) or flight.attempt > self.res.max_retries:
            tries = "" if isinstance(cause, RunFailed) else f" (after {flight.attempt} attempts)"
            store.update_run(run_id, status="failed", error=f"{reason}{tries}")
            flight.log.write(f"attempt {flight.attempt} failed: {reason}; run failed")
            bar.update(steps)
            bar.write(f"run {plan.label} failed: {reason}{tries}")
            return False
        store.update_run(run_id, status="pending", error=f"attempt {flight.attempt} failed: {reason}; retrying")
        flight.log.write(f"attempt {flight.attempt} failed: {reason}; retrying")
        bar.write(f"run {plan.label}: attempt {flight.attempt} failed ({reason}); retrying")
        return True

    def close(self) -> None:
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
