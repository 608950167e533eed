"""A forgetting budget for `ForgettingCallback`: stop (or warn) when the forgetting KL passes a limit.

The Trainer's order within one update step is: on_step_end (DefaultFlowCallback sets should_save /
should_evaluate), then log, then evaluate (on_evaluate), then `if control.should_save: save checkpoint-<step>`.
The callback measures at on_evaluate (or on_step_end with every_steps), before that save, so this class
decides both flags for the step just measured:

- KL within the budget: should_save = True (on_exceed "stop"), so output_dir/checkpoint-<step> exists on disk
  whatever save_steps says: the last in-budget state is never lost;
- KL over the budget, on_exceed "stop": should_save = False (the over-budget weights are not written) and
  should_training_stop = True: training ends at the first measurement past the budget;
- on_exceed "warn": a warning at the first crossing, training goes on, nothing forced.

Checkpoints the Trainer saves between two measurements were never measured; `checkpoint` names the last
measured one. With save_strategy "best" the Trainer sets should_save itself after evaluating, so the forced
save may not happen; use "steps" or "no".
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ON_EXCEED = ("stop", "warn")
CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


@dataclass
class ForgettingBudget:
    """At most `limit` nats of forgetting KL(p_base || p_tuned); `on_exceed`: "stop" the run or "warn"."""

    limit: float
    on_exceed: str = "stop"
    output_dir: Path | None = None  # the Trainer's output_dir (set at on_train_begin)
    last_in_budget: int | None = None  # the step of the last measurement within the budget
    exceeded_at: int | None = None  # the step of the first measurement past it
    exceeded_kl: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, (int, float)) or not (
                math.isfinite(self.limit) and self.limit > 0):
            raise ValueError(f"budget: must be a finite number of nats > 0; got {self.limit!r}")
        if self.on_exceed not in ON_EXCEED:
            raise ValueError(f"on_exceed: must be one of {', '.join(ON_EXCEED)}; got {self.on_exceed!r}")

    @property
    def checkpoint(self) -> Path | None:
        """output_dir/checkpoint-<step> of the last in-budget measurement, if it is on disk."""
        if self.output_dir is None or self.last_in_budget is None:
            return None
        path = self.output_dir / f"{CHECKPOINT_PREFIX}-{self.last_in_budget}"
        return path if path.is_dir() else None

    def check(self, kl: float, step: int, control: Any) -> None:
        """Set the Trainer's control flags for the step just measured (see the module docstring)."""
        if kl <= self.limit:
            self.last_in_budget = step
            if self.on_exceed == "stop" and step > 0:
                control.should_save = True
            return
        first = self.exceeded_at is None
        if first:
            self.exceeded_at, self.exceeded_kl = step, kl
        if self.on_exceed == "warn":
            if first:
                warnings.warn(f"forgetting KL {kl:.4g} at step {step} is over the budget {self.limit:g}; "
                              "training goes on (on_exceed='warn')", stacklevel=2)
            return
        control.should_save = False
        control.should_training_stop = True
        kept = (f"the last in-budget checkpoint is step {self.last_in_budget}" if self.last_in_budget
                else "no measurement was within the budget")
        warnings.warn(f"forgetting KL {kl:.4g} at step {step} is over the budget {self.limit:g}: training stops "
                      f"and this step is not saved; {kept}", stacklevel=2)
