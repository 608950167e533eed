"""One fine-tuning run, read top to bottom: attach the method, train with a constant LR after warm-up,
and at every checkpoint step measure the fine-tuning loss and forgetting and hand the row to a sink.

The loop knows two small protocols and nothing else about where it runs: the StepHooks it calls
(mitigation arms implement them) and the RowSink it writes to (the store, or an executor's stand-in).
Everything that decides the numbers is a function of (config, seed, step), so a run resumed from its
last saved state writes the same rows as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from forgetscale.artefacts import RunFolder
from forgetscale.compiled import compile_model, compiled
from forgetscale.data import Blocks, FinetuneData, batch_indices
from forgetscale.errors import RunFailed
from forgetscale.methods.attach import attach, skip_lora_input_casts, trainable_parameters, upcast_trainable
from forgetscale.metric.head import LogitsWorkspace, next_token_loss
from forgetscale.metric.sums import Reference, autocast, score
from forgetscale.models import enable_gradient_checkpointing
from forgetscale.runs import RunPlan
from forgetscale.store import CheckpointRow


class RowSink(Protocol):
    """Where a run's status and checkpoint rows go (forgetscale.store.Store is one)."""

    def update_run(self, run_id: str, **fields: Any) -> None: ...

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]: ...

    def delete_checkpoints_after(self, run_id: str, step: int) -> None: ...

    def add_checkpoint(self, row: CheckpointRow) -> None: ...


class StepHooks(Protocol):
    """What a mitigation arm does inside the loop."""

    def mix(self, step: int, blocks: Blocks) -> Blocks:
        """The update step's blocks (all micro-batches), possibly with some rows replaced."""
        ...

    def penalty(self, model: torch.nn.Module, step: int) -> torch.Tensor | None:
        """An extra loss term added once per update step (None: nothing to add)."""
        ...


class NoHooks:
    """The control arm: the batch as drawn, no extra loss."""

    def mix(self, step: int, blocks: Blocks) -> Blocks:
        return blocks

    def penalty(self, model: torch.nn.Module, step: int) -> torch.Tensor | None:
        return None


# called on the freshly attached model, before the optimizer is built (an arm may freeze parameters)
HookSetup = Callable[[torch.nn.Module], StepHooks]


@dataclass
class RunContext:
    """What every run of a sweep shares, built once per sweep (forgetscale.sweep.build_context)."""

    config: Any  # the SweepConfig
    out_dir: Path
    device: torch.device
    dtype: torch.dtype | None
    tokenizer: Any
    data: FinetuneData
    forgetting: Blocks
    forgetting_ref: Reference  # where the base predictions live (forgetscale.metric.references)
    heldout_ref: Reference
    load_base: Callable[[], torch.nn.Module]
    keep_adapters: frozenset[int] = frozenset()  # checkpoint steps whose weights are saved (for evals)
    arm_inputs: Any = None  # once-per-sweep inputs of the mitigation arms
    reference_note: str = "memory"  # where the base predictions live, and why (forgetting.reference)
    base_metrics: dict[str, float] | None = None  # step 0 of a run whose method starts as the base, once measured
    workspace: LogitsWorkspace = field(default_factory=LogitsWorkspace)  # measuring buffers, reused on CPU
    measure_dtype: torch.dtype | None = None  # the measuring precision (metric.sums.measuring_dtype), not `dtype`

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """A freshly attached model on the run's device (a 4-bit base was placed by its loader and refuses .to())."""
        if self.config.model.quantization == "none":
            model.to(self.device)
        return model


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # fixed LR, no relative step or parameter scaling: the schedule below is the only LR control
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919) % (2**63 - 1)


def checkpoint_metrics(model: torch.nn.Module, ctx: RunContext) -> dict[str, float]:
    """Measure `model` on the held-out, train-probe and forgetting sets."""
    batch, device, dtype = ctx.config.train.eval_batch_size, ctx.device, ctx.measure_dtype
    space = ctx.workspace.on(device)  # CPU: one set of [tokens x vocabulary] buffers for every pass
    model.eval()
    held = score(model, ctx.data.heldout, batch, device, dtype, ctx.heldout_ref, space)
    probe = score(model, ctx.data.train_probe, batch, device, dtype, workspace=space)
    forget = score(model, ctx.forgetting, batch, device, dtype, ctx.forgetting_ref, space)
    return {"ft_loss": held["nll"], "ft_loss_train": probe["nll"], "forget_ce": forget["ce"],
            "forget_ce_hard": forget["ce_hard"], "base_entropy": forget["entropy"], "forget_kl": forget["kl"],
            "ft_kl": held["kl"]}


def checkpoint_row(model: torch.nn.Module, ctx: RunContext, run_id: str, step: int, *, train_loss: float | None,
                   tokens_seen: int, wall_s: float, starts_as_base: bool = False) -> CheckpointRow:
    """One stored checkpoint row. At step 0 a method that starts as the base (LoRA) has the values every other
    such run of the sweep measured, to the bit, so they are measured once per sweep context."""
    shared = step == 0 and starts_as_base
    metrics = ctx.base_metrics if shared and ctx.base_metrics is not None else checkpoint_metrics(model, ctx)
    if shared:
        ctx.base_metrics = metrics
    return CheckpointRow(run_id=run_id, step=step, train_loss=train_loss, **metrics, tokens_seen=tokens_seen,
                         wall_s=wall_s)


def train_run(plan: RunPlan, ctx: RunContext, sink: RowSink, setup: HookSetup | None = None,
              on_step: Callable[[int, float], None] | None = None,
              on_phase: Callable[[str], None] | None = None) -> CheckpointRow | None:
    """Train one run and write its checkpoint rows; returns the final row (None: every row was stored before). Raises RunFailed. `on_phase` hears
    what the run is doing between steps ('loading model', 'checkpoint N', 'training')."""
    phase = on_phase or (lambda what: None)
    tcfg = ctx.config.train
    folder = RunFolder(ctx.out_dir, plan.run_id)
    lr = plan.method.lr or tcfg.lr
    checkpoints = set(tcfg.checkpoint_steps)
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum

    # -- model: fresh base weights, then the method (its init is seeded) ---------------------------
    phase("loading model")
    torch.manual_seed(plan.seed)
    base = ctx.load_base()
    if tcfg.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    model = ctx.place(attach(base, plan.method, plan.rank))
    hooks = setup(model) if setup is not None else NoHooks()  # the arm's setup (may freeze layers)
    upcast_trainable(model)  # half-precision base weights (model.dtype): what is trained stays fp32
    if ctx.dtype is not None:  # every pass below runs under autocast, which undoes peft's input casts
        skip_lora_input_casts(model)
    eager = contextlib.nullcontext  # off: nothing compiled, nothing to switch (torch._dynamo not even imported)
    if tcfg.compile != "off":  # compiled at the first step (its time counts in wall_s); measuring stays eager
        compile_model(model, tcfg.compile)
        eager = lambda: compiled(False)  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    sink.update_run(plan.run_id, trainable_params=trainable_parameters(model), status="running", error=None)
    optimizer = make_optimizer(tcfg.optimizer, params, lr, tcfg.weight_decay)
    warmup = tcfg.warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    # fp16 autocast needs loss scaling (gradients underflow otherwise); a no-op for fp32 and bf16
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16 and ctx.device.type == "cuda")

    # -- resume from the last saved checkpoint state, if any ----------------------------------------
    step, tokens_seen, wall_s, loss_sum, loss_count = 0, 0, 0.0, 0.0, 0
    done_steps = {row["step"] for row in sink.checkpoints(plan.run_id)}
    state = folder.load_state()
    if state is not None:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, tokens_seen, wall_s = state["step"], state["tokens_seen"], state["wall_s"]
        loss_sum, loss_count = state["loss_sum"], state["loss_count"]
        # the optimizer state holds each group's LR as of `step`; the schedule only needs its position
        # (calling schedule.step() here, before any optimizer.step(), is what torch warns about)
        schedule.last_epoch = step
        sink.delete_checkpoints_after(plan.run_id, step)
        done_steps = {s for s in done_steps if s <= step}
    else:
        sink.delete_checkpoints_after(plan.run_id, -1)
        done_steps = set()

    last_row: CheckpointRow | None = None
    while True:
        # -- checkpoint: measure, store, save state ---------------------------------------------------
        if step in checkpoints and step not in done_steps:
            phase(f"checkpoint {step}")
            with eager():  # eager, as the base predictions were made: no rounding floor under the KL
                last_row = checkpoint_row(model, ctx, plan.run_id, step, tokens_seen=tokens_seen, wall_s=wall_s,
                                          train_loss=loss_sum / loss_count if loss_count else None,
                                          starts_as_base=plan.method.starts_as_base)
            sink.add_checkpoint(last_row)
            loss_sum, loss_count = 0.0, 0
            done_steps.add(step)
            if step < tcfg.steps:
                folder.save_state(model, optimizer, {"step": step, "tokens_seen": tokens_seen, "wall_s": wall_s,
                                                     "loss_sum": loss_sum, "loss_count": loss_count,
                                                     "scaler": scaler.state_dict()})
            if step in ctx.keep_adapters:  # evals and derived runs read these later
                folder.save_adapter(step, model)
        if step >= tcfg.steps:
            break
        if step in checkpoints:
            phase("training")  # after loading or measuring: the steps' own time starts here

        # -- one update step (gradient accumulation over micro-batches) -------------------------------
        model.train()
        started = time.perf_counter()
        torch.manual_seed(step_seed(plan.seed, step))
        index = batch_indices(step, tokens_per_step, len(ctx.data.train), plan.seed)
        blocks = hooks.mix(step, ctx.data.train.select(index))  # replay arms put general text into some rows
        step_loss = 0.0
        for start in range(0, len(blocks), tcfg.batch_size):
            batch = blocks.select(slice(start, start + tcfg.batch_size))
            ids, labels, mask = (t.to(ctx.device) for t in (batch.input_ids, batch.labels, batch.attention_mask))
            with autocast(ctx.device, ctx.dtype):
                loss = next_token_loss(model, ids, mask, labels) / tcfg.grad_accum  # the stock loss, chunked
            scaler.scale(loss).backward()
            step_loss += float(loss.detach())
            tokens_seen += int(mask.sum())
        with autocast(ctx.device, ctx.dtype):
            penalty = hooks.penalty(model, step)  # kl, l2sp, ewc: an extra loss term, once per update step
        if penalty is not None:
            scaler.scale(penalty).backward()
        if not math.isfinite(step_loss) or (penalty is not None and not math.isfinite(float(penalty.detach()))):
            raise RunFailed(f"non-finite training loss ({step_loss}) at step {step + 1}; lower train.lr")
        scaler.unscale_(optimizer)
        if tcfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)  # count this step's queued kernels in this step's time
        wall_s += time.perf_counter() - started
        loss_sum += step_loss
        loss_count += 1
        if on_step is not None:
            on_step(step, step_loss)

    folder.clear_state()
    return last_row
