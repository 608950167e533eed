"""The local executor: every run in this process, one after another (the default, and the reference that the
Ray executor's rows are tested against). Also the per-run log both executors write."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from forgetscale.errors import ConfigError
from forgetscale.store import Store
from forgetscale.train import RunFailed, RunPlan, train_run


class RunLog:
    """RUN_DIR/runs/<run_id>/log.txt: what happened to a run, attempt by attempt, in the driver's words."""

    def __init__(self, out_dir: Path, run_id: str) -> None:
        self.path = Path(out_dir) / "runs" / run_id / "log.txt"

    def write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def checkpoint(self, row: dict[str, Any]) -> None:
        self.write(f"step {row['step']}: ft_loss {row['ft_loss']:.5f} forget_ce {row['forget_ce']:.5f} "
                   f"forget_kl {row['forget_kl']:.5f}")


class _LoggedStore:
    """The real store, with each checkpoint row also written to the run's log."""

    def __init__(self, store: Store, log: RunLog) -> None:
        self._store, self._log = store, log

    def add_checkpoint(self, row: dict[str, Any]) -> None:
        self._store.add_checkpoint(row)
        self._log.checkpoint(row)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


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

    def execute(self, plans: list[RunPlan], ctx: Any, store: Store, *, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        steps = self.cfg.train.steps
        with tqdm(total=len(plans) * steps, desc="sweep", unit="step", disable=not progress,
                  dynamic_ncols=True) as bar:
            for plan in plans:
                bar.set_description(plan.label)

                def on_step(step: int, loss: float) -> None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")

                log = RunLog(ctx.out_dir, plan.run_id)
                log.write(f"{plan.label}: local, device {ctx.device}, autocast {ctx.dtype or 'off (float32)'}, "
                          f"torch threads {torch.get_num_threads()}")
                started, bar_start = time.perf_counter(), bar.n
                try:
                    train_run(plan, ctx, _LoggedStore(store, log), on_step)
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
