"""Executors: what turns a sweep's run plans into stored rows. The sweep plans and builds the shared context;
an executor only executes, so a new way to run (a scheduler, a cloud) is one module + one `EXECUTORS.add`.

`local` (default) trains the runs one after another in this process; `ray` sends each run to a Ray cluster
as a task and gathers the rows it streams back (see docs/distributed.md). Both write through one Store in
the driver, and both leave a per-run log at RUN_DIR/runs/<run_id>/log.txt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from forgetscale.registry import Registry

if TYPE_CHECKING:
    from forgetscale.config import SweepConfig
    from forgetscale.runs import RunPlan
    from forgetscale.store import Store


class Executor(Protocol):
    """Built before the (expensive) shared context so that a bad executor setting fails fast."""

    def execute(self, plans: list[RunPlan], ctx: Any, store: Store, *, progress: bool = True) -> None:
        """Run every plan, write its rows and final status to `store`; a failed run never stops the rest."""

    def close(self) -> None:
        """Release what the executor holds (a Ray connection); called even after an interrupt."""


ExecutorFactory = Callable[..., Executor]
EXECUTORS: Registry[ExecutorFactory] = Registry("executor")


def make_executor(name: str, cfg: SweepConfig, *, address: str | None = None) -> Executor:
    """The named executor, set up for `cfg`; `address` (a Ray cluster) only applies to `ray`."""
    return EXECUTORS.get(name)(cfg, address=address)


def _local(cfg: SweepConfig, *, address: str | None = None) -> Executor:
    from forgetscale.executors.local import LocalExecutor

    return LocalExecutor(cfg, address=address)


def _ray(cfg: SweepConfig, *, address: str | None = None) -> Executor:
    from forgetscale.executors.remote import RayExecutor

    return RayExecutor(cfg, address=address)


EXECUTORS.add("local", _local)
EXECUTORS.add("ray", _ray)
