"""One fine-tuning run, read top to bottom: attach the method, train with a constant LR after warm-up,
and at every checkpoint step measure the fine-tuning loss and forgetting and store the row.

Everything that decides the numbers is a function of (config, seed, step), so a run resumed from its
last saved state writes the same rows as one that was never interrupted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forgetscale.data import batch_indices
from forgetscale.forgetting import autocast, measure
from forgetscale.methods import METHODS, attach, trainable_parameters
from forgetscale.mitigations import CONTROL


class RunFailed(Exception):
    """A run that cannot go on (non-finite loss, out of memory); the sweep records it and continues."""


@dataclass
class RunPlan:
    run_id: str
    method: Any  # a MethodSpec
    rank: int | None
    seed: int
    label: str
    mitigation: Any = CONTROL  # a MitigationSpec (the control arm: no mitigation)
    variant: Any = None  # the arm's per-run value (scale's s), if it has one
    source: str | None = None  # derived runs (scale): the control run whose weights they are measured from

    def arm_config(self) -> dict[str, Any]:
        """The arm's settings as stored in the run's config."""
        return {**self.mitigation.identity(self.variant), **({"source_run": self.source} if self.source else {})}


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # fixed LR, no relative step or parameter scaling: the schedule below is the only LR control
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919) % (2**63 - 1)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
    """Atomically write what a resumed run needs: trainable weights, optimizer state, counters."""
    tmp = path.with_suffix(".tmp")
    torch.save({"params": trainable_state(model), "optimizer": optimizer.state_dict(), **extra}, tmp)
    tmp.replace(path)


def save_adapter(directory: Path, model: torch.nn.Module) -> None:
    """Trainable weights as safetensors (PEFT adapters in PEFT's own format), for later evals."""
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, directory / "trainable.safetensors")


def train_run(plan: RunPlan, ctx: Any, store: Any, on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train one run and write its checkpoint rows; returns the final row. Raises RunFailed."""
    if plan.source is not None:  # a derived run (scale): measured from the control run's weights, not trained
        return plan.mitigation.derive(plan, ctx, store)
    _cfg, tcfg = ctx.config, ctx.config.train
    run_dir = ctx.out_dir / "runs" / plan.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.pt"
    lr = plan.method.lr or tcfg.lr
    checkpoints = set(tcfg.checkpoint_steps)
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum

    # -- model: fresh base weights, then the method (its init is seeded) ---------------------------
    torch.manual_seed(plan.seed)
    model = attach(ctx.load_base(), plan.method, plan.rank)
    model.to(ctx.device)
    arm = plan.mitigation.hooks(ctx, model, plan)  # the mitigation arm's setup (may freeze layers) and hooks
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = trainable_parameters(model)
    store.update_run(plan.run_id, trainable_params=n_params, status="running", error=None)
    optimizer = make_optimizer(tcfg.optimizer, params, lr, tcfg.weight_decay)
    warmup = tcfg.warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    # fp16 autocast needs loss scaling (gradients underflow otherwise); a no-op for fp32 and bf16
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16 and ctx.device.type == "cuda")

    # -- resume from the last saved checkpoint state, if any ----------------------------------------
    step, tokens_seen, wall_s, loss_sum, loss_count = 0, 0, 0.0, 0.0, 0
    done_steps = {row["step"] for row in store.checkpoints(plan.run_id)}
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, tokens_seen, wall_s = state["step"], state["tokens_seen"], state["wall_s"]
        loss_sum, loss_count = state["loss_sum"], state["loss_count"]
        schedule.last_epoch = step - 1
        schedule.step()
        store.delete_checkpoints_after(plan.run_id, step)
        done_steps = {s for s in done_steps if s <= step}
    else:
        store.delete_checkpoints_after(plan.run_id, -1)
        done_steps = set()

    last_row: dict[str, Any] = {}
    while True:
        # -- checkpoint: measure, store, save state ---------------------------------------------------
        if step in checkpoints and step not in done_steps:
            model.eval()
            held = measure(model, ctx.data.heldout, tcfg.eval_batch_size, ctx.device, ctx.dtype, ctx.heldout_ref)
            probe = measure(model, ctx.data.train_probe, tcfg.eval_batch_size, ctx.device, ctx.dtype)
            forget = measure(model, ctx.forgetting, tcfg.eval_batch_size, ctx.device, ctx.dtype, ctx.forgetting_ref)
            last_row = {
                "run_id": plan.run_id, "step": step, "ft_loss": held["nll"], "ft_loss_train": probe["nll"],
                "train_loss": loss_sum / loss_count if loss_count else None,
                "forget_ce": forget["ce"], "forget_ce_hard": forget["ce_hard"], "base_entropy": forget["entropy"],
                "forget_kl": forget["kl"], "ft_kl": held["kl"], "tokens_seen": tokens_seen, "wall_s": wall_s,
            }
            store.add_checkpoint(last_row)
            loss_sum, loss_count = 0.0, 0
            done_steps.add(step)
            if step < tcfg.steps:
                save_state(state_path, model, optimizer, {"step": step, "tokens_seen": tokens_seen, "wall_s": wall_s,
                                                          "loss_sum": loss_sum, "loss_count": loss_count,
                                                          "scaler": scaler.state_dict()})
            keep = tcfg.save_adapters == "all" or (tcfg.save_adapters == "last" and step == tcfg.steps)
            if keep or step in _cfg.evals.adapter_steps(tcfg.steps):  # evals read these later
                save_adapter(run_dir / f"adapter-step{step}", model)
        if step >= tcfg.steps:
            break

        # -- one update step (gradient accumulation over micro-batches) -------------------------------
        model.train()
        started = time.perf_counter()
        torch.manual_seed(step_seed(plan.seed, step))
        index = batch_indices(step, tokens_per_step, len(ctx.data.train), plan.seed)
        blocks = arm.mix(step, ctx.data.train.select(index))  # replay arms put general text into some rows
        step_loss = 0.0
        for start in range(0, len(blocks), tcfg.batch_size):
            batch = blocks.select(slice(start, start + tcfg.batch_size))
            ids, labels, mask = (t.to(ctx.device) for t in (batch.input_ids, batch.labels, batch.attention_mask))
            with autocast(ctx.device, ctx.dtype):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / tcfg.grad_accum
            scaler.scale(loss).backward()
            step_loss += float(loss.detach())
            tokens_seen += int(mask.sum())
        with autocast(ctx.device, ctx.dtype):
            penalty = arm.penalty(model, step)  # kl, l2sp, ewc: an extra loss term, once per update step
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

    state_path.unlink(missing_ok=True)
    if not METHODS.get(plan.method.name).uses_adapter:
        del model  # full / top-layer runs changed the weights in place: never reuse them
    return last_row
