"""Forgetting of models trained elsewhere: a base reference built once, then any tuned model measured
against it, with 95% intervals over the forgetting blocks.

The notebook API:

    from forgetscale.measure import BaseReference
    ref = BaseReference.build(base_model, tokenizer, forgetting="embedded:wikipedia", max_tokens=4096)
    result = ref.measure(tuned_model)       # ForgettingResult: kl, ce, ce_hard, entropy, intervals
    print(result.kl, result.kl_ci)

The numbers are forgetscale.forgetting's (same batches, same arithmetic, same sums), so a measured model
gives exactly what a sweep stores for the same weights; the intervals come from the per-block means
(a t interval over blocks, token-weighted when blocks carry different numbers of loss tokens).
`forgetscale measure` (measure_sources below) applies this to PEFT adapter folders, full checkpoints and
HF Trainer / TRL output folders and writes sweep-shaped rows into a RUN_DIR store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgetscale.artefacts import PEFT_CONFIG, PEFT_WEIGHTS, TRAINABLE_FILE, RunFolder
from forgetscale.data import Blocks, build_finetune_data, build_forgetting_blocks
from forgetscale.data.blocks import IGNORE
from forgetscale.errors import ConfigError, DataError, ModelError, StoreError
from forgetscale.forgetting import Reference, _batches, reference
from forgetscale.output_head import LogitsWorkspace
from forgetscale.plan import run_hash
from forgetscale.store import RunDirLock, Store

Interval = tuple[float, float]


# -- per-block statistics ---------------------------------------------------------------------------
def block_se(values: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """(token mean, its standard error) from per-block sums: the ratio estimator over blocks (blocks may hold
    different numbers of tokens); the error is NaN with fewer than two blocks."""
    b = len(counts)
    sums, n = values.double(), counts.double()
    mean = float(sums.sum() / n.sum())
    if b < 2:
        return mean, math.nan
    resid = sums - mean * n
    return mean, math.sqrt(float((resid**2).sum()) / (b * (b - 1))) / float(n.mean())


def block_interval(values: torch.Tensor, counts: torch.Tensor, level: float = 0.95) -> Interval:
    """95% interval of a token mean from per-block sums: a t interval over blocks (see block_se); NaN with
    fewer than two blocks."""
    from scipy import stats

    b = len(counts)
    if b < 2:
        return (math.nan, math.nan)
    mean, se = block_se(values, counts)
    q = float(stats.t.ppf(0.5 + level / 2, b - 1))
    return (mean - q * se, mean + q * se)


@dataclass
class ForgettingResult:
    """One model's forgetting against a base reference (nats per token) and 95% intervals over blocks."""

    kl: float
    ce: float
    ce_hard: float
    entropy: float
    nll: float  # mean NLL of the forgetting text itself
    tokens: int
    blocks: int
    kl_ci: Interval = (math.nan, math.nan)
    ce_ci: Interval = (math.nan, math.nan)
    ce_hard_ci: Interval = (math.nan, math.nan)
    ft_loss: float | None = None  # held-out fine-tuning NLL, when the reference holds held-out data
    ft_kl: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _per_block(model: torch.nn.Module, blocks: Blocks, batch_size: int, device: torch.device,
               dtype: torch.dtype | None, ref: Reference, workspace: LogitsWorkspace | None = None) -> ForgettingResult:
    """forgetting.measure's numbers (same batches, same per-batch fp64 sums) plus per-block sums."""
    nll = ce = ce_hard = kl = 0.0
    count = 0
    tok_kl, tok_ce, tok_hard = [], [], []
    for part, z, lse, labels in _batches(model, blocks, batch_size, device, dtype, workspace):
        t = z.shape[0]
        token_nll = (lse - z.gather(1, labels[:, None]).view(-1)).double()
        nll += float(token_nll.sum())
        rows = ref.rows(model, part, count, z, lse, device, dtype)
        cross, neg_h, hard = rows.cross, rows.neg_entropy, rows.argmax
        hard_nll = (lse - z.gather(1, hard[:, None]).view(-1)).double()
        ce += float(-cross.double().sum())
        kl += float((neg_h - cross).double().sum())
        ce_hard += float(hard_nll.sum())
        tok_kl.append((neg_h - cross).double().cpu())
        tok_ce.append((-cross).double().cpu())
        tok_hard.append(hard_nll.cpu())
        count += t
    if count != ref.tokens:
        raise RuntimeError(f"reference holds {ref.tokens} positions, blocks gave {count}")
    per_block = (blocks.labels[:, 1:] != IGNORE).sum(1)
    keep = per_block > 0
    counts = per_block[keep]
    index = torch.repeat_interleave(torch.arange(len(counts)), counts)

    def sums(tokens: list[torch.Tensor]) -> torch.Tensor:
        return torch.zeros(len(counts), dtype=torch.float64).index_add_(0, index, torch.cat(tokens))

    return ForgettingResult(
        kl=kl / count, ce=ce / count, ce_hard=ce_hard / count, entropy=ref.entropy, nll=nll / count, tokens=count,
        blocks=len(counts), kl_ci=block_interval(sums(tok_kl), counts), ce_ci=block_interval(sums(tok_ce), counts),
        ce_hard_ci=block_interval(sums(tok_hard), counts),
    )


def _nll_and_kl(model: torch.nn.Module, blocks: Blocks, batch_size: int, device: torch.device,
                dtype: torch.dtype | None, ref: Reference, workspace: LogitsWorkspace | None = None) -> tuple[float, float]:
    from forgetscale.forgetting import measure

    out = measure(model, blocks, batch_size, device, dtype, ref, workspace)
    return out["nll"], out["kl"]


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode (no dropout), its previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class BaseReference:
    """The base model's predictions on a forgetting set (and optionally a held-out fine-tuning set), built
    once; `measure(model)` then costs one forward pass of the tuned model over the same tokens."""

    blocks: Blocks
    ref: Reference
    batch_size: int = 8
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    heldout: Blocks | None = None
    heldout_ref: Reference | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    # measuring buffers reused model after model (CPU: no page faults per pass); pickles empty
    workspace: LogitsWorkspace = field(default_factory=LogitsWorkspace, repr=False, compare=False)

    @classmethod
    def build(cls, model: torch.nn.Module, tokenizer: Any = None, *, forgetting: Any = "embedded:wikipedia",
              max_tokens: int | None = None, block_length: int = 128, batch_size: int = 8,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None,
              heldout: Blocks | None = None, cache_dir: str | Path | None = None) -> BaseReference:
        """`forgetting`: a dataset spec ('embedded:wikipedia', 'hf:wikitext', a file), a mapping of
        `forgetting.*` keys, a ForgettingConfig, or ready Blocks. A PEFT model is measured with its adapter
        disabled (peft's disable_adapter), so the reference is the base even after attaching."""
        from forgetscale.config import ForgettingConfig, validate_section
        from forgetscale.models import cache_root

        if isinstance(forgetting, Blocks):
            blocks, settings = forgetting, {"blocks": len(forgetting), "block_length": forgetting.input_ids.shape[1]}
        else:
            if isinstance(forgetting, str):
                forgetting = {"dataset": forgetting}
            if isinstance(forgetting, dict):
                data = dict(forgetting)
                if max_tokens is not None:
                    data["max_tokens"] = max_tokens
                forgetting = validate_section(ForgettingConfig, data, "forgetting")
            if tokenizer is None:
                raise ConfigError("BaseReference.build: pass the tokenizer to build the forgetting blocks")
            length = forgetting.block_length or block_length
            blocks = build_forgetting_blocks(forgetting, tokenizer, length,
                                             cache_root(str(cache_dir) if cache_dir else None) / "data")
            settings = {**forgetting.model_dump(mode="json"), "block_length": length}
        device = torch.device(device) if device is not None else model_device(model)
        with evaluating(model), (model.disable_adapter() if is_peft(model) else contextlib.nullcontext()):
            ref = reference(model, blocks, batch_size, device, dtype)
            held_ref = reference(model, heldout, batch_size, device, dtype) if heldout is not None else None
        return cls(blocks, ref, batch_size, device, dtype, heldout, held_ref, settings)

    def measure(self, model: torch.nn.Module) -> ForgettingResult:
        """Forgetting of `model` (same tokenizer as the base) against this reference."""
        device = self.device or model_device(model)
        space = self.workspace.on(device)
        with evaluating(model):
            result = _per_block(model, self.blocks, self.batch_size, device, self.dtype, self.ref, space)
            if self.heldout is not None and self.heldout_ref is not None:
                result.ft_loss, result.ft_kl = _nll_and_kl(model, self.heldout, self.batch_size, device, self.dtype,
                                                           self.heldout_ref, space)
        return result


# -- what a folder holds ----------------------------------------------------------------------------
MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
ADAPTER_WEIGHTS = (PEFT_WEIGHTS, "adapter_model.bin")
_STEP = re.compile(r"(\d+)$")


@dataclass
class Source:
    """One tuned model to measure: a PEFT adapter folder or a full checkpoint, at a training step."""

    path: Path
    kind: str  # adapter | model
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


@contextlib.contextmanager
def applied(base: torch.nn.Module, source: Source) -> Iterator[tuple[torch.nn.Module, int]]:
    """(the base with the source applied, its trainable parameter count P); the base is restored on exit."""
    if source.kind == "adapter":
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict

        from forgetscale import compatibility

        compatibility.check_adapter_shapes(base, source.path, source.weights[0])
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
    tuned.to(model_device(base)).eval()
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


def _keep_weights(source: Source, folder: RunFolder) -> bool:
    """Make RUN_DIR/runs/<id>/adapter-step<N>/ what artefacts.RunFolder and `forgetscale eval` read: the
    adapter files copied; a full single-file safetensors checkpoint linked as trainable.safetensors."""
    target = folder.adapter(source.step)
    if target.exists():
        return True
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if source.kind == "adapter":
        for name in (PEFT_CONFIG, *(w.name for w in source.weights)):
            shutil.copy2(source.path / name, tmp / name)
    elif len(source.weights) == 1 and source.weights[0].suffix == ".safetensors":
        (tmp / TRAINABLE_FILE).symlink_to(source.weights[0].resolve())
    else:
        shutil.rmtree(tmp)
        return False
    tmp.rename(target)
    return True


# -- the `forgetscale measure` verb's work ------------------------------------------------------------
def measure_settings(cfg: Any, with_data: bool) -> dict[str, Any]:
    """What makes two measurements comparable: base model, forgetting set, held-out data, block length."""
    return {
        "model": cfg.model.model_dump(mode="json"),
        "forgetting": cfg.forgetting.model_dump(mode="json"),
        "block_length": cfg.forgetting.block_length or cfg.train.context_length,
        "finetune": cfg.finetune.model_dump(mode="json") if with_data else None,
        "context_length": cfg.train.context_length if with_data else None,
    }


def _check_run_dir(store: Store, settings: dict[str, Any]) -> None:
    """Refuse a folder holding a sweep or measurements made with other settings (reads only)."""
    stored = store.get_meta("measure_settings")
    if stored is not None and not store.checkpoints():
        stored = None  # nothing measured yet (a start that failed): the folder is not claimed
    if stored is None and store.get_meta("sweep_config") is not None and store.checkpoints():
        raise StoreError(f"{store.path.parent}: holds a sweep; measure into a new --out folder")
    if stored is not None:
        old = json.loads(stored)
        for key, value in settings.items():
            if old.get(key) != value:
                sub = value if isinstance(value, dict) else {}
                inner = next((k for k in sub if not isinstance(old.get(key), dict) or old[key].get(k) != sub[k]), None)
                name = f"{key}.{inner}" if inner else key
                raise ConfigError(f"{name}: differs from the measurements already stored in {store.path.parent}; "
                                  "use a new --out folder")


def _claim_run_dir(store: Store, settings: dict[str, Any], cfg: Any) -> None:
    """Write the settings the folder's rows are measured with (only once every input has been checked)."""
    store.set_meta("measure_settings", json.dumps(settings, sort_keys=True))
    store.set_meta("sweep_config", json.dumps(cfg.to_dict(), sort_keys=True))


def _log_values(state: dict[str, Any] | None, step: int, previous: int, key: str) -> float | None:
    if not state:
        return None
    values = [e[key] for e in state.get("log_history", []) if key in e and previous < e.get("step", -1) <= step]
    return sum(values) / len(values) if values else None


@dataclass
class Group:
    """One run to store: a single adapter/model, or a trainer output's checkpoints."""

    label: str
    path: Path
    sources: list[Source]
    run_id: str = ""
    hashes: dict[int, str] = field(default_factory=dict)


def measure_sources(cfg: Any, out_dir: str | Path, *, adapters: list[Path] = (), models: list[Path] = (),
                    trainer_outputs: list[Path] = (), with_data: bool = False,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Measure every source against the base and store sweep-shaped rows in out_dir; returns one printable
    row per measured checkpoint (stored ones are read back, not measured again)."""
    groups = [Group(Path(p).name, Path(p), [adapter_source(Path(p))]) for p in adapters]
    groups += [Group(Path(p).name, Path(p), [model_source(Path(p))]) for p in models]
    groups += [Group(Path(p).resolve().name, Path(p), trainer_output_sources(Path(p))) for p in trainer_outputs]
    if not groups:
        raise ConfigError("measure: give at least one --adapter, --model or --trainer-output")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StoreError(f"{out_dir}: exists and is not a directory")
    settings = measure_settings(cfg, with_data)
    for group in groups:
        group.hashes = {s.step: s.content_hash() for s in group.sources}
        ident = {"measured": settings, "path": str(group.path.resolve())}
        if len(group.sources) == 1 and group.sources[0].path == group.path:
            ident["weights"] = group.hashes[group.sources[0].step]  # a single folder: its content is its identity
        group.run_id = run_hash(ident)

    with RunDirLock(out_dir):
        store = Store(out_dir)
        try:
            _check_run_dir(store, settings)
            todo = []
            for group in groups:
                run = store.run(group.run_id)
                done = {}
                if run is not None:
                    done = json.loads(run["config"]).get("measured", {}).get("hashes", {})
                stored_steps = {r["step"] for r in store.checkpoints(group.run_id)}
                missing = [s for s in group.sources
                           if s.step not in stored_steps or done.get(str(s.step)) != group.hashes[s.step]]
                if missing or 0 not in stored_steps:
                    todo.append((group, missing))
            if todo:
                _measure_todo(cfg, out_dir, store, todo, with_data, progress)
            return _printable(store, groups)
        finally:
            store.close()


def _measure_todo(cfg: Any, out_dir: Path, store: Store, todo: list[tuple[Group, list[Source]]], with_data: bool,
                  progress: bool) -> None:
    from tqdm.auto import tqdm

    from forgetscale.models import load_configured_base

    setup = load_configured_base(cfg)
    base, device, dtype, length, block, cache = (setup.loaded, setup.device, setup.dtype, setup.context_length,
                                                 setup.block_length, setup.data_cache)
    _check_sources(cfg, base, todo)  # every source is checked against the base before anything is written
    blocks = build_forgetting_blocks(cfg.forgetting, base.tokenizer, block, cache)
    heldout = None
    if with_data:
        data = build_finetune_data(cfg.finetune, base.tokenizer, length, cache)
        heldout = data.heldout
        for note in data.notes:
            print(f"warning: {note}", file=sys.stderr)
    ref = BaseReference.build(base.model, forgetting=blocks, batch_size=cfg.train.eval_batch_size, device=device,
                              dtype=dtype, heldout=heldout)
    ref.settings = measure_settings(cfg, with_data)
    base_result = ref.measure(base.model)
    _claim_run_dir(store, ref.settings, cfg)  # every input is read and checked: the folder is ours now
    total = sum(len(s) for _, s in todo)
    with tqdm(total=total, desc="measure", unit="model", disable=not progress, dynamic_ncols=True) as bar:
        for group, sources in todo:
            _store_group(cfg, out_dir, store, group, sources, base.model, ref, base_result, with_data, bar)


def _check_sources(cfg: Any, base: Any, todo: list[tuple[Group, list[Source]]]) -> None:
    names = [cfg.model.name, str(getattr(base.model.config, "_name_or_path", "") or "")]
    for _group, sources in todo:
        warnings = [w for source in sources for w in check_source(base, source, names)]
        if warnings:  # one line per group: a trainer output's checkpoints all record the same base
            more = f" (and {len(warnings) - 1} more checkpoints)" if len(warnings) > 1 else ""
            print(f"warning: {warnings[0]}{more}", file=sys.stderr)


def _row(run_id: str, step: int, result: ForgettingResult, *, train_loss: float | None, tokens_seen: int,
         ft_loss: float | None) -> dict[str, Any]:
    return {"run_id": run_id, "step": step, "ft_loss": result.ft_loss if result.ft_loss is not None else ft_loss,
            "ft_loss_train": None, "train_loss": train_loss, "forget_ce": result.ce, "forget_ce_hard": result.ce_hard,
            "base_entropy": result.entropy, "forget_kl": result.kl, "ft_kl": result.ft_kl,
            "tokens_seen": tokens_seen, "wall_s": 0.0}


def _intervals(result: ForgettingResult) -> dict[str, Any]:
    return {"kl_ci": list(result.kl_ci), "ce_ci": list(result.ce_ci), "ce_hard_ci": list(result.ce_hard_ci),
            "blocks": result.blocks, "tokens": result.tokens}


def _store_group(cfg: Any, out_dir: Path, store: Store, group: Group, sources: list[Source], base: torch.nn.Module,
                 ref: BaseReference, base_result: ForgettingResult, with_data: bool, bar: Any) -> None:
    first = group.sources[0]
    if first.kind == "adapter":
        method, rank, method_config = method_of(json.loads((first.path / PEFT_CONFIG).read_text(encoding="utf-8")))
    else:
        method, rank, method_config = "full", None, {"name": "full", "source": "checkpoint"}
    run = store.run(group.run_id)
    measured = json.loads(run["config"]).get("measured", {}) if run else {}
    measured = {"label": group.label, "path": str(group.path.resolve()), "kind": first.kind,
                "hashes": measured.get("hashes", {}), "intervals": measured.get("intervals", {}),
                "eval_weights": measured.get("eval_weights", {})}
    last = max(s.step for s in group.sources)
    config = {**cfg.to_dict(), "method": method_config, "rank": rank, "seed": 0, "mitigation": {"name": "none"},
              "train": {**cfg.train.model_dump(mode="json"), "steps": last}, "measured": measured}
    dataset = cfg.finetune.dataset if with_data else "unknown"
    store.add_run({"run_id": group.run_id, "model": cfg.model.name, "dataset": dataset, "method": method,
                   "method_config": method_config, "rank": rank, "trainable_params": None, "seed": 0,
                   "config": config, "status": "running"})
    store.add_checkpoint(_row(group.run_id, 0, base_result, train_loss=None, tokens_seen=0, ft_loss=None))
    measured["intervals"]["0"] = _intervals(base_result)
    folder = RunFolder(out_dir, group.run_id)
    steps = sorted(s.step for s in group.sources)
    for source in sources:
        bar.set_description(f"measure {group.label}@{source.step}")
        with applied(base, source) as (tuned, params):
            result = ref.measure(tuned)
        previous = max([s for s in steps if s < source.step], default=0)
        state = source.trainer_state
        tokens = int(state.get("num_input_tokens_seen") or 0) if state else 0
        eval_loss = None if with_data else _log_values(state, source.step, source.step - 1, "eval_loss")
        store.add_checkpoint(_row(group.run_id, source.step, result, tokens_seen=tokens, ft_loss=eval_loss,
                                  train_loss=_log_values(state, source.step, previous, "loss")))
        measured["hashes"][str(source.step)] = group.hashes[source.step]
        measured["intervals"][str(source.step)] = _intervals(result)
        measured["eval_weights"][str(source.step)] = _keep_weights(source, folder)
        store.update_run(group.run_id, config=json.dumps(config, sort_keys=True), trainable_params=params)
        bar.update(1)
    store.update_run(group.run_id, status="finished", error=None, config=json.dumps(config, sort_keys=True))


def _printable(store: Store, groups: list[Group]) -> list[dict[str, Any]]:
    out = []
    for group in groups:
        run = store.run(group.run_id)
        if run is None:
            continue
        intervals = json.loads(run["config"]).get("measured", {}).get("intervals", {})
        for row in store.checkpoints(group.run_id):
            extra = intervals.get(str(row["step"]), {})
            out.append({**row, "label": group.label, "method": run["method"], "rank": run["rank"],
                        "trainable_params": run["trainable_params"],
                        "kl_ci": tuple(extra.get("kl_ci", (math.nan, math.nan))),
                        "ce_ci": tuple(extra.get("ce_ci", (math.nan, math.nan))),
                        "ce_hard_ci": tuple(extra.get("ce_hard_ci", (math.nan, math.nan))),
                        "blocks": extra.get("blocks")})
    return out
