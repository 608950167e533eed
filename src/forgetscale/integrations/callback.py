"""`ForgettingCallback`: the forgetting metric inside a transformers Trainer or a TRL trainer, unchanged.

    from forgetscale.integrations import ForgettingCallback
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, peft_config=lora,
                         callbacks=[ForgettingCallback(max_tokens=4096, run_dir="runs/sft")])
    trainer.train()

- on_train_begin: the base model's predictions on the forgetting set, once (PEFT models with the adapter
  disabled by peft's disable_adapter(); a fully fine-tuned model as it is before the first step);
- at every evaluation (on_evaluate) and/or every `every_steps` update steps: one forward pass of the
  model being trained, logged through the trainer's own `log()` (so every report_to backend and
  trainer.state.log_history receive forgetting/kl, forgetting/ce, forgetting/ce_hard, forgetting/entropy);
- with `budget=X`: a forgetting budget (integrations/budget.py): at the first measurement whose KL passes X,
  on_exceed="stop" ends training without saving that step (every in-budget measurement is saved as
  checkpoint-<step>, so the last in-budget one is on disk: `callback.budget.checkpoint`); "warn" warns once;
- with `run_dir`: sweep-shaped rows (step 0 = the base) appended to RUN_DIR/results.sqlite, ft_loss from
  the trainer's eval_loss at the same step, so `forgetscale fit/report/export` read them.

Under torch.distributed (accelerate, torchrun; DDP or FSDP) every process runs the callback: the forgetting
blocks are split across the ranks (forgetscale.metric.shard), each holds its share of the base reference,
and every rank gets the same numbers, logged and stored by the main process alone.

The callback finds its trainer on the first event (the Trainer calls its callbacks from its own methods);
pass `trainer=` to say it explicitly, as TRL's own callbacks take it. Resuming a full fine-tune from a
checkpoint: the model at on_train_begin is no longer the base; pass `meter=` (a ForgettingMeter built on the base beforehand).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from forgetscale.integrations.budget import ForgettingBudget
from forgetscale.methods.attach import trainable_parameters
from forgetscale.metric import ForgettingMeter, ForgettingResult
from forgetscale.metric.meter import is_peft
from forgetscale.models import measuring_dtype, weights_dtype_of
from forgetscale.runs import run_hash
from forgetscale.store import CheckpointRow, RunRecord, Store
from forgetscale.weights import method_of

KEYS = ("kl", "ce", "ce_hard", "entropy")


def _find_trainer(callback: TrainerCallback) -> Any:
    """The Trainer whose callback handler holds `callback`, from the frames that called it."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None)
        if handler is not None and any(cb is callback for cb in getattr(handler, "callbacks", ())):
            return owner
        frame = frame.f_back
    return None


def _tokenizer(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", None) or processing_class


class ForgettingCallback(TrainerCallback):
    """Measure forgetting (KL / soft CE / hard CE against the base model) while a Trainer trains."""

    def __init__(self, forgetting: Any = "embedded:wikipedia", *, max_tokens: int | None = 4096,
                 block_length: int = 128, batch_size: int = 8, every_steps: int | None = None,
                 on_evaluate: bool = True, run_dir: str | Path | None = None, trainer: Any = None,
                 tokenizer: Any = None, meter: ForgettingMeter | None = None, dtype: Any = "auto",
                 prefix: str = "forgetting/", budget: float | None = None, on_exceed: str = "stop") -> None:
        if every_steps is not None and every_steps < 1:
            raise ValueError("every_steps: must be >= 1 or None")
        self.budget = ForgettingBudget(budget, on_exceed) if budget is not None else None
        self.forgetting, self.max_tokens, self.block_length = forgetting, max_tokens, block_length
        self.batch_size, self.every_steps, self.measure_on_evaluate = batch_size, every_steps, on_evaluate
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.trainer, self.tokenizer, self.meter, self.dtype, self.prefix = trainer, tokenizer, meter, dtype, prefix
        self.results: dict[int, ForgettingResult] = {}  # step -> result, also kept here for notebooks
        self.run_id: str | None = None
        self._last_step: int | None = None

    # -- events ----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.trainer is None:
            self.trainer = _find_trainer(self)
        if self.meter is None:
            tokenizer = self.tokenizer or _tokenizer(processing_class)
            self.meter = ForgettingMeter.build(
                model, tokenizer, forgetting=self.forgetting, max_tokens=self.max_tokens,
                block_length=self.block_length, batch_size=self.batch_size, dtype=self._autocast(args, model),
                agreed={"every_steps": self.every_steps, "on_evaluate": self.measure_on_evaluate,
                        "run_dir": self.run_dir is not None,  # what decides when every rank measures
                        "budget": None if self.budget is None else [self.budget.limit, self.budget.on_exceed]})
        if self.run_dir is not None:
            self._open_run(args, state, model)
        if self.budget is not None:
            self.budget.output_dir = Path(args.output_dir)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps and state.global_step % self.every_steps == 0:
            self._within_budget(self._measure(model, state), state, control)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not self.measure_on_evaluate:
            return
        eval_loss = (metrics or {}).get("eval_loss")
        if self._last_step == state.global_step and state.global_step in self.results:
            self._store(state, self.results[state.global_step], eval_loss)  # measured this step: add L_ft only
            return
        self._within_budget(self._measure(model, state, eval_loss), state, control)

    def on_train_end(self, args, state, control, **kwargs):
        if self.run_dir is not None and self.run_id is not None and self._main:
            with Store(self.run_dir) as store:
                store.update_run(self.run_id, status="finished", error=None)

    # -- work --------------------------------------------------------------------------------------
    def _within_budget(self, result: ForgettingResult, state: Any, control: Any) -> None:
        if self.budget is not None:
            self.budget.check(float(result.kl), int(state.global_step), control)

    def _autocast(self, args: Any, model: torch.nn.Module) -> torch.dtype | None:
        """The measuring precision: forgetscale.metric.sums.measuring_dtype's policy (the weights' own, not the
        trainer's bf16/fp16 autocast), so `forgetscale measure` on a saved checkpoint gives the same number;
        `dtype=` overrides it (a torch dtype, or 'float32' / 'bfloat16' / 'float16')."""
        if isinstance(self.dtype, torch.dtype):
            return None if self.dtype == torch.float32 else self.dtype
        return measuring_dtype(weights_dtype_of(model), self.dtype, next(model.parameters()).device)

    def _measure(self, model: torch.nn.Module, state: Any, eval_loss: float | None = None) -> ForgettingResult:
        if self.meter is None:
            raise RuntimeError("ForgettingCallback: no meter (on_train_begin did not run)")
        result = self.meter.measure(model)
        step = int(state.global_step)
        self.results[step], self._last_step = result, step
        logs = {f"{self.prefix}{k}": float(getattr(result, k)) for k in KEYS}
        if not self._main:  # every rank holds the numbers (self.results); the main process logs and stores them
            return result
        if self.trainer is not None:
            control = getattr(self.trainer, "control", None)
            should_log = getattr(control, "should_log", False)
            self.trainer.log(logs)
            if control is not None:  # log() clears it: the trainer's own logs of this step (and, under DDP,
                control.should_log = should_log  # the loss all-gather every rank makes for them) still happen
        else:  # no trainer found: keep the numbers in the history the trainer would have written
            state.log_history.append({**logs, "step": step})
        self._store(state, result, eval_loss)
        return result

    @property
    def _main(self) -> bool:
        shard = self.meter.shard if self.meter is not None else None
        return shard is None or shard.rank == 0

    def _open_run(self, args: Any, state: Any, model: torch.nn.Module) -> None:
        base = None
        if int(state.global_step) == 0:  # the base row: measured (by every rank), so KL is exactly 0 there
            with (model.disable_adapter() if is_peft(model) else _null()):
                base = self.meter.measure(model)
        if not self._main:
            return
        name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        settings = dict(self.meter.settings)
        self.run_id = run_hash({"callback": True, "model": name, "forgetting": settings,
                                "output_dir": str(Path(args.output_dir).resolve()), "run_name": args.run_name})
        if is_peft(model):
            config = model.peft_config[getattr(model, "active_adapter", "default")]
            method, rank, method_config = method_of(config.to_dict())
        else:
            method, rank, method_config = "full", None, {"name": "full", "source": "trainer"}
        params = trainable_parameters(model)
        total = int(getattr(args, "max_steps", 0) or 0)
        config = {"model": {"name": name}, "forgetting": settings, "method": method_config, "rank": rank, "seed":
                  int(args.seed), "mitigation": {"name": "none"}, "train": {"steps": max(total, state.max_steps or 0)},
                  "measured": {"by": "ForgettingCallback", "output_dir": str(args.output_dir)}}
        with Store(self.run_dir) as store:
            if store.get_meta("sweep_config") is None:
                store.set_meta("sweep_config", json.dumps(self._sweep_config(name, settings), sort_keys=True))
            store.add_run(RunRecord(run_id=self.run_id, model=name, dataset=str(getattr(args, "run_name", None) or "trainer"),
                                    method=method, method_config=method_config, rank=rank, trainable_params=params,
                                    seed=int(args.seed), config=config, status="running"))
            store.update_run(self.run_id, status="running", trainable_params=params)
            store.delete_checkpoints_after(self.run_id, int(state.global_step))  # a resumed run keeps its rows
        if base is not None:
            self._store(state, base, None)

    @staticmethod
    def _sweep_config(name: str, settings: dict[str, Any]) -> dict[str, Any]:
        """A config `forgetscale eval/report` can read (the keys that apply; the rest are defaults)."""
        from forgetscale.config import SweepConfig

        forgetting = {k: v for k, v in settings.items() if k in SweepConfig.model_fields["forgetting"].annotation.model_fields}
        try:
            return SweepConfig.model_validate({"name": "trainer", "model": name, "forgetting": forgetting}).to_dict()
        except ValueError:
            return {"name": "trainer", "model": {"name": name}}

    def _store(self, state: Any, result: ForgettingResult, eval_loss: float | None) -> None:
        if self.run_dir is None or self.run_id is None or not self._main:
            return
        step = int(state.global_step)
        losses = [e["loss"] for e in state.log_history if "loss" in e and e.get("step", -1) <= step]
        with Store(self.run_dir) as store:
            store.add_checkpoint(CheckpointRow(
                run_id=self.run_id, step=step, ft_loss=eval_loss, train_loss=losses[-1] if losses and step > 0 else None,
                forget_ce=result.ce, forget_ce_hard=result.ce_hard, base_entropy=result.entropy, forget_kl=result.kl,
                tokens_seen=int(getattr(state, "num_input_tokens_seen", 0) or 0)))


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
