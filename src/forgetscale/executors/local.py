"""The local executor: every run in this process, one after another (the default, and the reference that the
Ray executor's rows are tested against). Also what both executors do with one plan (`execute_plan`: train
it, or derive it when it is a derived run) and the per-run log they write."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from forgetscale.artefacts import RunFolder
from forgetscale.errors import ConfigError, RunFailed
from forgetscale.runs import RunPlan
from forgetscale.store import CheckpointRow, Store
from forgetscale.train import RowSink, RunContext, train_run


def execute_plan(plan: RunPlan, ctx: RunContext, sink: RowSink,
                 on_step: Callable[[int, float], None] | None = None,
                 on_phase: Callable[[str], None] | None = None) -> CheckpointRow | None:
    """One plan: a derived run (scale) is measured from its source run's weights; any other is trained,
    with its arm's hooks. Returns the last row; raises RunFailed."""
    from forgetscale.mitigations.runtime import derive_run, hook_setup

    if plan.source is not None:
        return derive_run(plan, ctx, sink)
    return train_run(plan, ctx, sink, hook_setup(plan, ctx), on_step, on_phase)


def resumed_steps(plan: RunPlan, ctx: RunContext, store: Store) -> int:
    """Update steps a run has behind it: where it resumes (its last stored checkpoint, when a resume state
    exists), so a resumed sweep's bar starts there and not at 0."""
    if plan.source is not None or not RunFolder(ctx.out_dir, plan.run_id).state_path.is_file():
        return 0
    stored = [r["step"] for r in store.checkpoints(plan.run_id)]
    return min(max(stored, default=0), ctx.config.train.steps)


class RunLog:
    """RUN_DIR/runs/<run_id>/log.txt: what happened to a run, attempt by attempt, in the driver's words."""

    def __init__(self, out_dir: Path, run_id: str) -> None:
        self.folder = RunFolder(out_dir, run_id)
        self.path = self.folder.log_path

    def write(self, text: str) -> None:
        self.folder.log(text)

    def checkpoint(self, row: CheckpointRow) -> None:
        self.write(f"step {row.step}: ft_loss {row.ft_loss:.5f} forget_ce {row.forget_ce:.5f} "
                   f"forget_kl {row.forget_kl:.5f}")


class LoggedSink:
    """The store as a RowSink, with each checkpoint row also written to the run's log."""

    def __init__(self, store: Store, log: RunLog) -> None:
        self._store, self._log = store, log

    def update_run(self, run_id: str, **fields: Any) -> None:
        self._store.update_run(run_id, **fields)

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        return self._store.checkpoints(run_id)

    def delete_checkpoints_after(self, run_id: str, step: int) -> None:
        self._store.delete_checkpoints_after(run_id, step)

    def add_checkpoint(self, row: CheckpointRow) -> None:
        self._store.add_checkpoint(row)
        self._log.checkpoint(row)


def failure_reason(err: BaseException) -> str:
    """The first line of an error, or its type when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class LocalExecutor:
    """Today's in-process loop: a run that fails (non-finite loss, GPU out of memory) is recorded and skipped."""

    def __init__(self, cfg: Any, *, address: str | None = None) -> None:
        if address is not None:
            raise ConfigError(f"--address: only the ray executor joins a cluster; add --executor ray; got {address!r}")
        self.cfg = cfg

    def execute(self, plans: list[RunPlan], ctx: RunContext, store: Store, *, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        steps = self.cfg.train.steps
        done = {plan.run_id: resumed_steps(plan, ctx, store) for plan in plans}
        # the bar counts the sweep's update steps; the run and what it is doing are the postfix; its rate (and
        # ETA) counts training time only: loading and measuring pause it
        with tqdm(total=len(plans) * steps, initial=sum(done.values()), desc=f"sweep: {len(plans)} runs",
                  unit="step", disable=not progress, dynamic_ncols=True) as bar:
            for plan in plans:
                label = plan.label

                def on_phase(what: str, label: str = label) -> None:
                    if what == "training":
                        bar.unpause()  # the time spent loading or measuring is not counted in the rate
                    bar.set_postfix_str(f"{label}: {what}")

                def on_step(step: int, loss: float, label: str = label) -> None:
                    bar.update(1)
                    bar.set_postfix_str(f"{label}: training, loss {loss:.3f}", refresh=False)

                log = RunLog(ctx.out_dir, plan.run_id)
                log.write(f"{plan.label}: local, device {ctx.device}, autocast {ctx.dtype or 'off (float32)'}, "
                          f"torch threads {torch.get_num_threads()}")
                started, bar_start = time.perf_counter(), bar.n - done[plan.run_id]
                try:
                    execute_plan(plan, ctx, LoggedSink(store, log), on_step, on_phase)
                except KeyboardInterrupt:
                    store.update_run(plan.run_id, status="pending", error="interrupted; re-run to resume")
                    log.write("interrupted")
                    raise
                except (RunFailed, torch.cuda.OutOfMemoryError) as err:
                    reason = failure_reason(err)
                    store.update_run(plan.run_id, status="failed", error=reason)
                    log.write(f"failed: {reason}")
                    bar.write(f"run {plan.label} failed: {reason}")
                else:
                    store.update_run(plan.run_id, status="finished", error=None)
                    seconds = time.perf_counter() - started
                    log.write(f"finished in {seconds:.1f} s")
                    bar.write(f"run {plan.label} finished in {seconds:.0f} s")
                bar.update(bar_start + steps - bar.n)  # resumed runs skip steps: count them as done

    def close(self) -> None:
        pass
