"""Tuned weights made elsewhere or saved by a sweep: where a folder's weights are (a PEFT adapter, a full
checkpoint, an HF Trainer / TRL output's checkpoints, a sweep's saved trainable weights), and one way to put
them on the loaded base (`applied`), used by `forgetscale measure` and `forgetscale eval`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forgetscale.artefacts import PEFT_CONFIG, PEFT_WEIGHTS, TRAINABLE_FILE
from forgetscale.errors import DataError, ModelError, StoreError

MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
ADAPTER_WEIGHTS = (PEFT_WEIGHTS, "adapter_model.bin")
_STEP = re.compile(r"(\d+)$")


@dataclass
class Source:
    """One set of tuned weights at a training step: a PEFT adapter folder, a full checkpoint, or a sweep's saved
    trainable weights."""

    path: Path
    kind: str  # adapter (PEFT) | model (a full checkpoint) | trainable (a sweep's saved trainable weights)
    step: int
    weights: list[Path]
    trainer_state: dict[str, Any] | None = None

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for path in self.weights:
            digest.update(path.name.encode())
            with path.open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.hexdigest()[:16]


def _weights(path: Path, names: tuple[str, ...]) -> list[Path]:
    found = [path / n for n in names if (path / n).is_file()]
    if not found:  # sharded checkpoints
        found = sorted(path.glob("model-*-of-*.safetensors")) or sorted(path.glob("pytorch_model-*-of-*.bin"))
    return found[:1] if found and found[0].name in names else found


def _trainer_state(path: Path) -> dict[str, Any] | None:
    state = path / "trainer_state.json"
    if not state.is_file():
        return None
    try:
        return json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{state}: not a JSON trainer state; delete it or fix it") from None


def _step_of(path: Path, state: dict[str, Any] | None) -> int | None:
    if state is not None and isinstance(state.get("global_step"), int):
        return int(state["global_step"])
    match = _STEP.search(path.name)
    return int(match.group(1)) if match else None


def adapter_source(path: Path, step: int | None = None) -> Source:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"--adapter {path}: no such folder")
    if not (path / PEFT_CONFIG).is_file():
        raise DataError(f"--adapter {path}: not a PEFT adapter folder (no {PEFT_CONFIG}); for a full checkpoint "
                        "use --model, for a Trainer output folder --trainer-output")
    weights = _weights(path, ADAPTER_WEIGHTS)
    if not weights:
        raise DataError(f"--adapter {path}: {PEFT_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    state = _trainer_state(path)
    found = _step_of(path, state) if step is None else step
    return Source(path, "adapter", 1 if found is None else found, weights, state)


def model_source(path: Path, step: int | None = None) -> Source:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"--model {path}: no such folder")
    if (path / PEFT_CONFIG).is_file():
        raise DataError(f"--model {path}: this is a PEFT adapter folder; use --adapter")
    weights = _weights(path, MODEL_WEIGHTS)
    if not (path / "config.json").is_file() or not weights:
        raise DataError(f"--model {path}: not a transformers checkpoint (needs config.json and model weights)")
    state = _trainer_state(path)
    found = _step_of(path, state) if step is None else step
    return Source(path, "model", 1 if found is None else found, weights, state)


def trainer_output_sources(path: Path) -> list[Source]:
    """checkpoint-*/ folders of an HF Trainer / TRL output, by step (trainer_state.json's global_step)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"--trainer-output {path}: no such folder")
    folders = sorted(p for p in path.glob("checkpoint-*") if p.is_dir())
    if not folders:
        raise DataError(f"--trainer-output {path}: no checkpoint-*/ folders; train with save_steps (or "
                        "save_strategy) set, or pass the folders with --adapter / --model")
    out = []
    for folder in folders:
        state = _trainer_state(folder)
        step = _step_of(folder, state)
        if (folder / PEFT_CONFIG).is_file():
            out.append(adapter_source(folder, step))
        elif (folder / "config.json").is_file():
            out.append(model_source(folder, step))
        else:
            raise DataError(f"--trainer-output {folder}: neither a PEFT adapter nor a model checkpoint")
    steps = [s.step for s in out]
    if len(set(steps)) != len(steps):
        raise DataError(f"--trainer-output {path}: two checkpoints claim the same step")
    kinds = {s.kind for s in out}
    if len(kinds) > 1:
        raise DataError(f"--trainer-output {path}: mixes adapter and full checkpoints")
    return sorted(out, key=lambda s: s.step)


# -- applying a source to the loaded base ----------------------------------------------------------
def method_of(adapter_config: dict[str, Any]) -> tuple[str, int | None, dict[str, Any]]:
    """(method name, rank, method_config) from a PEFT adapter_config.json."""
    kind = adapter_config.get("peft_type", "unknown")
    kind = str(getattr(kind, "value", kind)).lower()
    if kind == "lora" and adapter_config.get("use_dora"):
        kind = "dora"
    rank = adapter_config.get("r") if kind in ("lora", "dora", "adalora", "loha", "lokr") else None
    targets = adapter_config.get("target_modules")
    settings: dict[str, Any] = {"name": kind, "source": "peft"}
    if isinstance(targets, (list, set, tuple)):
        settings["target_modules"] = sorted(targets)
    elif targets is not None:
        settings["target_modules"] = targets
    if kind in ("lora", "dora"):
        settings["scaling"] = "rslora" if adapter_config.get("use_rslora") else "standard"
        settings["alpha"] = adapter_config.get("lora_alpha")
    return kind, None if rank is None else int(rank), settings


def check_source(base: Any, source: Source, base_names: list[str]) -> list[str]:
    """Raise ModelError when a source cannot be measured against the loaded base (`base`: a LoadedModel):
    another architecture, tokenizer or vocabulary. Returns warnings (a recorded base of another name)."""
    from forgetscale import compatibility

    if source.kind == "model":
        compatibility.check_vocab_size(base.model, source.path, "model")
        compatibility.check_tokenizer(base.tokenizer, source.path, "model")
        return []
    compatibility.check_adapter_shapes(base.model, source.path, source.weights[0])
    compatibility.check_tokenizer(base.tokenizer, source.path, "adapter")
    config = json.loads((source.path / PEFT_CONFIG).read_text(encoding="utf-8"))
    warning = compatibility.recorded_base_warning(config, base_names, source.path)
    return [warning] if warning else []


def saved_source(folder: Path, step: int) -> Source:
    """A sweep's (or `forgetscale measure`'s) saved weights, RUN_DIR/runs/<id>/adapter-step<N>/: a PEFT adapter,
    or the trainable weights of a method without one (artefacts.save_weights)."""
    if (folder / PEFT_CONFIG).is_file():
        return Source(folder, "adapter", step, _weights(folder, ADAPTER_WEIGHTS))
    return Source(folder, "trainable", step, [folder / TRAINABLE_FILE])


@contextlib.contextmanager
def applied(base: torch.nn.Module, source: Source) -> Iterator[tuple[torch.nn.Module, int]]:
    """(the base with the source applied, its trainable parameter count P); the base is restored on exit.
    An adapter is wrapped around the base and unloaded afterwards, saved trainable weights are swapped in and
    restored, a full checkpoint is loaded beside it: a large base is never re-read per checkpoint."""
    if source.kind == "trainable":
        with _swapped(base, source.path / TRAINABLE_FILE) as params:
            yield base, params
        return
    if source.kind == "adapter":
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict

        from forgetscale import compatibility

        compatibility.check_adapter_shapes(base, source.path, source.weights[0])
        trainable = [p.requires_grad for p in base.parameters()]  # peft freezes them all; restored below
        try:
            tuned = PeftModel.from_pretrained(base, source.path, is_trainable=False)
        except Exception as err:  # noqa: BLE001 - peft raises RuntimeError/ValueError/KeyError here
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            first = next((ln for ln in lines if ln.startswith("size mismatch")), lines[0] if lines else type(err).__name__)
            raise ModelError(f"adapter {source.path}: cannot apply it to the base model ({first[:300]})") from None
        tuned.eval()
        try:
            # the vocabulary was checked to be the base's: no hub look-up of the recorded base's config
            state = get_peft_model_state_dict(tuned, save_embedding_layers=False)
            params = sum(v.numel() for v in state.values())
            yield tuned, int(params)
        finally:
            tuned.unload()
            for p, flag in zip(base.parameters(), trainable, strict=True):
                p.requires_grad_(flag)
        return
    from transformers import AutoModelForCausalLM

    try:
        # the base's attention kernel, so the two differ by their weights alone
        tuned = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32,
                                                     attn_implementation=base.config._attn_implementation)
    except (OSError, ValueError) as err:
        raise ModelError(f"model {source.path}: cannot load it ({str(err).strip().splitlines()[0][:200]})") from None
    mine, theirs = dict(base.named_parameters()), dict(tuned.named_parameters())
    for name, value in mine.items():
        other = theirs.get(name)
        if other is None or other.shape != value.shape:
            got = "missing" if other is None else f"shape {list(other.shape)}"
            raise ModelError(f"model {source.path}: parameter '{name}' is {got}, the base model's is "
                             f"{list(value.shape)}; a full checkpoint must have the base model's architecture")
    tuned.to(next(base.parameters()).device).eval()
    seen: set[int] = set()
    params = 0
    for p in tuned.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    try:
        yield tuned, params
    finally:
        del tuned


@contextlib.contextmanager
def _swapped(model: torch.nn.Module, path: Path) -> Iterator[int]:
    """The weights in `path` copied into `model` (their count yielded); the model's own restored on exit."""
    from safetensors.torch import load_file

    weights = load_file(path)
    named = dict(model.named_parameters())
    missing = [n for n in weights if n not in named]
    if missing:
        raise StoreError(f"{path.parent}: weight '{missing[0]}' is not in the base model; was it saved from another model?")
    backup = {n: named[n].detach().clone() for n in weights}
    with torch.no_grad():
        for n, value in weights.items():
            named[n].copy_(value)
    try:
        yield sum(v.numel() for v in weights.values())
    finally:
        with torch.no_grad():
            for n, value in backup.items():
                named[n].copy_(value)

