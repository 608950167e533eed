"""scale: after training, move the weights back toward the base by a factor s in [0, 1]; a curve from one run.

W_s = W0 + s * (W_ft - W0), exactly, for every method whose change is linear in its parameters: for LoRA
B is scaled (s * B @ A), for ia3 the scales go to 1 + s * (l - 1), for top_layers and full the weights
themselves are interpolated. dora is refused (its magnitude vector makes this no interpolation).

Nothing is trained: each s is a derived run (runs.mitigation = 'scale', its s and source_run in the run
config) measured from the control run's saved weights (RUN_DIR/runs/<source>/adapter-step<N>), at every
step whose weights were kept (train.save_adapters: last -> the final step, all -> every checkpoint).
Its rows carry the control run's tokens_seen (recomputed from seed and step), wall_s = 0 (no training of
its own: the weights cost one control run) and no train_loss. Adapter methods keep the scaled adapter
(for evals) under the derived run. s = 0 gives the base model exactly; s = 1 the control run's row.
A derived run reads the control run's files, so it must run after it (the local executor runs plans in
order and derived plans come last; under Ray, rerun the sweep if a derived run started too early).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from forgetscale.data import batch_indices
from forgetscale.forgetting import measure
from forgetscale.methods import METHODS, attach, trainable_parameters
from forgetscale.mitigations import MITIGATIONS, MitigationSpec


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load what train.save_adapter wrote (a PEFT adapter, or the trainable weights) into `model`."""
    from safetensors.torch import load_file

    peft_file = directory / "adapter_model.safetensors"
    if peft_file.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(peft_file))
        if result.unexpected_keys:
            raise RuntimeError(f"{peft_file}: unexpected keys {result.unexpected_keys[:3]}")
        return
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(directory / "trainable.safetensors").items():
            named[name].copy_(value)


def tokens_seen(ctx: Any, seed: int, step: int) -> int:
    """Training tokens the control run had consumed at `step` (its batches are a pure function of seed and step)."""
    tcfg = ctx.config.train
    rows = tcfg.batch_size * tcfg.grad_accum
    return sum(int(ctx.data.train.select(batch_indices(s, rows, len(ctx.data.train), seed)).attention_mask.sum())
               for s in range(step))


def measure_row(model: torch.nn.Module, ctx: Any, run_id: str, step: int, tokens: int) -> dict[str, Any]:
    """A checkpoint row for a derived model (the columns train_run writes; no training time of its own)."""
    tcfg = ctx.config.train
    model.eval()
    held = measure(model, ctx.data.heldout, tcfg.eval_batch_size, ctx.device, ctx.dtype, ctx.heldout_ref)
    probe = measure(model, ctx.data.train_probe, tcfg.eval_batch_size, ctx.device, ctx.dtype)
    forget = measure(model, ctx.forgetting, tcfg.eval_batch_size, ctx.device, ctx.dtype, ctx.forgetting_ref)
    return {
        "run_id": run_id, "step": step, "ft_loss": held["nll"], "ft_loss_train": probe["nll"], "train_loss": None,
        "forget_ce": forget["ce"], "forget_ce_hard": forget["ce_hard"], "base_entropy": forget["entropy"],
        "forget_kl": forget["kl"], "ft_kl": held["kl"], "tokens_seen": tokens, "wall_s": 0.0,
    }


class ScaleSpec(MitigationSpec):
    name: Literal["scale"] = "scale"
    s: list[float] = Field([0.25, 0.5, 0.75], description="scale factors, each a derived run (0: base, 1: the "
                                                          "control run)")

    derived: ClassVar[bool] = True
    variant_key: ClassVar[str | None] = "s"

    @field_validator("s")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= x <= 1.0 for x in v) or len(set(v)) != len(v):
            raise ValueError("must be a non-empty list of distinct numbers in [0, 1]")
        return v

    def check(self, method: Any) -> str | None:
        if method.name == "dora":
            return "dora's magnitude vector makes scaling the adapter no interpolation to the base; use lora"
        return None

    def derive(self, plan: Any, ctx: Any, store: Any) -> dict[str, Any]:
        """Measure the control run's saved weights scaled by s = plan.variant; returns the last row.

        Reads only RUN_DIR/runs/<source>/ (not the store), so it runs under any executor that sees RUN_DIR."""
        from forgetscale.train import RunFailed, save_adapter

        tcfg = ctx.config.train
        src_dir = ctx.out_dir / "runs" / plan.source
        if not (src_dir / f"adapter-step{tcfg.steps}").is_dir():
            raise RunFailed(f"its control run {plan.source} has not finished (or set train.save_adapters to last "
                            "or all); run it first")
        steps = [s for s in tcfg.checkpoint_steps if s > 0 and (src_dir / f"adapter-step{s}").is_dir()]
        torch.manual_seed(plan.seed)
        model = attach(ctx.load_base(), plan.method, plan.rank).to(ctx.device)
        store.update_run(plan.run_id, trainable_params=trainable_parameters(model), status="running", error=None)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad and ".lora_A." not in n}
        start = {n: p.detach().clone() for n, p in named.items()}  # the base point: B = 0, ia3 = 1, W0
        store.delete_checkpoints_after(plan.run_id, -1)
        row: dict[str, Any] = {}
        for step in steps:
            load_weights(model, src_dir / f"adapter-step{step}")
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(start[n] + plan.variant * (p - start[n]))
            row = measure_row(model, ctx, plan.run_id, step, tokens_seen(ctx, plan.seed, step))
            store.add_checkpoint(row)
        if tcfg.save_adapters != "none" and METHODS.get(plan.method.name).uses_adapter:
            save_adapter(ctx.out_dir / "runs" / plan.run_id / f"adapter-step{steps[-1]}", model)
        return row


MITIGATIONS.add("scale", ScaleSpec)
