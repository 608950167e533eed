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

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from forgetscale.errors import RunFailed
from forgetscale.methods import METHODS, MethodSpec
from forgetscale.methods.attach import attach, trainable_parameters, upcast_trainable
from forgetscale.mitigations.base import Arm, MitigationSpec, register_arm

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from forgetscale.runs import RunPlan
    from forgetscale.train import RowSink, RunContext


def unit_grid(v: list[float]) -> list[float]:
    """A derived arm's grid (scale's s, intruders' mitigation_lambda): distinct values in [0, 1], at least one."""
    if not v or any(not 0.0 <= x <= 1.0 for x in v) or len(set(v)) != len(v):
        raise ValueError("must be a non-empty list of distinct numbers in [0, 1]")
    return v


class ScaleSpec(MitigationSpec):
    """After training, move the weights back toward the base by s in [0, 1]; runs derived, never trained."""

    name: Literal["scale"] = "scale"
    s: list[float] = Field([0.25, 0.5, 0.75], description="scale factors, each a derived run (0: base, 1: the "
                                                          "control run)")

    derived: ClassVar[bool] = True
    grid_key: ClassVar[str | None] = "s"
    curve_ends: ClassVar[dict[float, str]] = {0.0: "base", 1.0: "control"}

    @field_validator("s")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        return unit_grid(v)

    def check(self, method: MethodSpec) -> str | None:
        if method.name == "dora":
            return "dora's magnitude vector makes scaling the adapter no interpolation to the base; use lora"
        return None


def tokens_seen(ctx: RunContext, seed: int, step: int) -> int:
    """Training tokens the control run had consumed at `step` (its batches are a pure function of seed and step)."""
    from forgetscale.data import batch_indices

    tcfg = ctx.config.train
    rows = tcfg.batch_size * tcfg.grad_accum
    return sum(int(ctx.data.train.select(batch_indices(s, rows, len(ctx.data.train), seed)).attention_mask.sum())
               for s in range(step))


class Scale(Arm):
    """Derived runs: the control run's saved weights at each kept step, changed by `changer`, measured.
    Another post-hoc arm (intruders) subclasses it and overrides `changer` alone."""

    def changer(self, spec: Any, model: torch.nn.Module, value: Any) -> Callable[[], None]:
        """Called once on the freshly attached model (B = 0, ia3 = 1, W0: the base point); returns what changes
        the loaded weights in place (under no_grad): W0 + s (W - W0)."""
        named = {n: p for n, p in model.named_parameters() if p.requires_grad and ".lora_A." not in n}
        start = {n: p.detach().clone() for n, p in named.items()}

        def change() -> None:
            for n, p in named.items():
                p.copy_(start[n] + value * (p - start[n]))

        return change

    def derive(self, spec: ScaleSpec, plan: RunPlan, ctx: RunContext, sink: RowSink) -> dict[str, Any]:
        """Measure the control run's saved weights changed by `changer` (scaled by s = plan.arm_value); returns
        the last row.

        Reads only RUN_DIR/runs/<source>/ (not the store), so it runs under any executor that sees RUN_DIR."""
        import torch

        from forgetscale.artefacts import RunFolder, load_weights
        from forgetscale.train import checkpoint_row

        tcfg = ctx.config.train
        source = RunFolder(ctx.out_dir, plan.source)
        saved = set(source.saved_steps())
        if tcfg.steps not in saved:
            raise RunFailed(f"its control run {plan.source} has not finished (or set train.save_adapters to last "
                            "or all); run it first")
        steps = [s for s in tcfg.checkpoint_steps if s > 0 and s in saved]
        torch.manual_seed(plan.seed)
        model = ctx.place(attach(ctx.load_base(), plan.method, plan.rank))
        upcast_trainable(model)  # as trained: the saved fp32 weights are not rounded to a half-precision base
        sink.update_run(plan.run_id, trainable_params=trainable_parameters(model), status="running", error=None)
        change = self.changer(spec, model, plan.arm_value)  # on the fresh model: the base point
        sink.delete_checkpoints_after(plan.run_id, -1)
        row: dict[str, Any] = {}
        for step in steps:
            load_weights(model, source.adapter(step))
            with torch.no_grad():
                change()
            row = checkpoint_row(model, ctx, plan.run_id, step, train_loss=None,
                                 tokens_seen=tokens_seen(ctx, plan.seed, step), wall_s=0.0)
            sink.add_checkpoint(row)
        if tcfg.save_adapters != "none" and METHODS.get(plan.method.name).uses_adapter:
            RunFolder(ctx.out_dir, plan.run_id).save_adapter(steps[-1], model)
        return row


register_arm(ScaleSpec, Scale())
