"""A run's folder, RUN_DIR/runs/<run_id>/: the one place that knows its file names and how they are
written and read. Train, the scale arm, evals and the executors all go through it.

- state.pt: what a resumed run needs (trainable weights, optimizer state, counters); plain tensors and
  numbers only, loaded with `weights_only=True`, so a crafted file in RUN_DIR cannot run code.
- adapter-step<N>/: the trainable weights at step N (PEFT's own format for adapter methods,
  trainable.safetensors otherwise), for evals and derived runs.
- log.txt: what happened to the run, attempt by attempt.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from forgetscale.errors import StoreError

STATE_FILE = "state.pt"
LOG_FILE = "log.txt"
ADAPTER_PREFIX = "adapter-step"
TRAINABLE_FILE = "trainable.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_weights(directory: Path, model: torch.nn.Module) -> None:
    """Trainable weights as safetensors (PEFT adapters in PEFT's own format)."""
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, directory / TRAINABLE_FILE)


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load what save_weights wrote into `model` (already carrying the same method)."""
    from safetensors.torch import load_file

    peft_file = directory / PEFT_WEIGHTS
    if peft_file.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(peft_file))
        if result.unexpected_keys:
            raise RuntimeError(f"{peft_file}: unexpected keys {result.unexpected_keys[:3]}")
        return
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(directory / TRAINABLE_FILE).items():
            named[name].copy_(value)


class RunFolder:
    """RUN_DIR/runs/<run_id>/ and the files in it."""

    def __init__(self, out_dir: str | Path, run_id: str) -> None:
        self.path = Path(out_dir) / "runs" / run_id

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    def adapter(self, step: int) -> Path:
        return self.path / f"{ADAPTER_PREFIX}{step}"

    def saved_steps(self) -> list[int]:
        """Steps whose weights were kept, ascending."""
        if not self.path.is_dir():
            return []
        return sorted(int(p.name.removeprefix(ADAPTER_PREFIX)) for p in self.path.glob(f"{ADAPTER_PREFIX}*")
                      if p.is_dir() and p.name.removeprefix(ADAPTER_PREFIX).isdigit())

    def save_adapter(self, step: int, model: torch.nn.Module) -> None:
        save_weights(self.adapter(step), model)

    # -- resume state -------------------------------------------------------------------------------
    def save_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, counters: dict[str, Any]) -> None:
        """Atomically write the trainable weights, optimizer state and counters."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        torch.save({"params": trainable_state(model), "optimizer": optimizer.state_dict(), **counters}, tmp)
        tmp.replace(self.state_path)

    def load_state(self, *, mmap: bool = False) -> dict[str, Any] | None:
        """The saved state, or None; tensors and plain data only (never code)."""
        if not self.state_path.is_file():
            return None
        try:
            return torch.load(self.state_path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as err:  # noqa: BLE001 - a foreign or damaged file: say which, never run it
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StoreError(f"{self.state_path}: not a resume state forgetscale wrote ({reason[:120]}); delete it "
                             "to restart this run from step 0") from None

    def clear_state(self) -> None:
        self.state_path.unlink(missing_ok=True)

    # -- log --------------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
