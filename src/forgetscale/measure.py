"""The `forgetscale measure` verb: forgetting of PEFT adapters, full checkpoints and HF Trainer / TRL output
folders trained elsewhere, measured against the base with a ForgettingMeter (forgetscale.metric), stored as
sweep-shaped rows in a RUN_DIR so `fit`, `report`, `eval` and `export` read them like a sweep's.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgetscale.artefacts import PEFT_CONFIG, TRAINABLE_FILE, RunFolder
from forgetscale.data import build_finetune_data, build_forgetting_blocks
from forgetscale.errors import ConfigError, StoreError
from forgetscale.metric import ForgettingMeter, ForgettingResult
from forgetscale.metric.shard import broadcast, join_launched
from forgetscale.runs import run_hash
from forgetscale.store import RESULTS_FILE, CheckpointRow, RunDirLock, RunRecord, Store
from forgetscale.weights import (
    Source,
    adapter_source,
    applied,
    check_source,
    method_of,
    model_source,
    trainer_output_sources,
)


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


def _difference(settings: dict[str, Any]):
    """The first key of `settings` that differs from the stored measurements' (store.claim's test)."""

    def first(old: dict[str, Any]) -> str | None:
        for key, value in settings.items():
            if old.get(key) != value:
                sub = value if isinstance(value, dict) else {}
                inner = next((k for k in sub if not isinstance(old.get(key), dict) or old[key].get(k) != sub[k]), None)
                return f"{key}.{inner}" if inner else key
        return None

    return first


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


def _out_folder(out_dir: str | Path) -> Path:
    """out_dir as a Path, refused when it is a file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StoreError(f"{out_dir}: exists and is not a directory")
    return out_dir


def check_out_folder(cfg: Any, out_dir: str | Path, with_data: bool) -> None:
    """The main process's check of out_dir (its kind and stored settings), made before `--processes N` starts
    any: a refusal is then one line, printed once, rather than one per process racing the launcher's teardown."""
    out_dir = _out_folder(out_dir)
    if (out_dir / RESULTS_FILE).exists():
        with Store(out_dir, create=False) as store:
            store.check_claim("measure", _difference(measure_settings(cfg, with_data)))


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
    out_dir = _out_folder(out_dir)
    settings = measure_settings(cfg, with_data)
    for group in groups:
        group.hashes = {s.step: s.content_hash() for s in group.sources}
        ident = {"measured": settings, "path": str(group.path.resolve())}
        if len(group.sources) == 1 and group.sources[0].path == group.path:
            ident["weights"] = group.hashes[group.sources[0].step]  # a single folder: its content is its identity
        group.run_id = run_hash(ident)

    rank, world, group_ = join_launched()
    if rank > 0:  # another process of `torchrun ... forgetscale measure`: measure with the main one, store nothing
        todo = _agreed_todo(None, groups, group_)
        if todo:
            _measure_todo(cfg, out_dir, None, todo, with_data, progress=False)
        return []
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(RunDirLock(out_dir))
            store = held.enter_context(Store(out_dir))
            todo = _todo(store, groups, settings)
        except Exception as err:
            if world > 1:
                _agreed_todo(err, groups, group_)  # every rank raises it, none waits
            raise
        if world > 1:
            _agreed_todo(todo, groups, group_)
        if todo:
            _measure_todo(cfg, out_dir, store, todo, with_data, progress)
        return _printable(store, groups)


def _todo(store: Store, groups: list[Group], settings: dict[str, Any]) -> list[tuple[Group, list[Source]]]:
    """What is not stored yet: (group, its sources to measure) for each group that needs work."""
    store.check_claim("measure", _difference(settings))  # reads only: nothing is written yet
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
    return todo


def _agreed_todo(todo: Any, groups: list[Group], group: Any) -> list[tuple[Group, list[Source]]]:
    """The main process's plan (or its error) on every process of a distributed measurement: only the main
    process reads the store; the others measure what it says, in its order."""
    if isinstance(todo, list):
        todo = [(groups.index(g), [s.step for s in sources]) for g, sources in todo]
    plan = broadcast(todo, group)
    if isinstance(plan, BaseException):
        raise plan
    return [(groups[i], [s for s in groups[i].sources if s.step in steps]) for i, steps in plan]


def _measure_todo(cfg: Any, out_dir: Path, store: Store | None, todo: list[tuple[Group, list[Source]]],
                  with_data: bool, progress: bool) -> None:
    """Measure and store; `store` None: another rank of a distributed measurement (it measures its share of
    the blocks with the main process, which alone writes)."""
    from tqdm.auto import tqdm

    from forgetscale.models import load_configured_base, measuring_dtype

    setup = load_configured_base(cfg)
    base, device, length, block, cache = setup.loaded, setup.device, setup.context_length, setup.block_length, setup.data_cache
    dtype = measuring_dtype(setup.weights_dtype, cfg.forgetting.dtype, device)  # the sweep's and the callback's policy
    if store is not None:
        _check_sources(cfg, base, todo)  # every source is checked against the base before anything is written
    blocks = build_forgetting_blocks(cfg.forgetting, base.tokenizer, block, cache)
    heldout = None
    if with_data:
        data = build_finetune_data(cfg.finetune, base.tokenizer, length, cache)
        heldout = data.heldout
        for note in data.notes:
            print(f"warning: {note}", file=sys.stderr)
    ref = ForgettingMeter.build(base.model, forgetting=blocks, batch_size=cfg.train.eval_batch_size, device=device,
                              dtype=dtype, heldout=heldout, agreed=measure_settings(cfg, with_data))
    ref.settings = measure_settings(cfg, with_data)
    base_result = ref.measure(base.model)
    if store is None:
        for _group, sources in todo:
            for source in sources:
                with applied(base.model, source) as (tuned, _params):
                    ref.measure(tuned)
        return
    # every input is read and checked: the folder is ours now (sweep_config: what eval and report read)
    store.claim("measure", ref.settings, _difference(ref.settings))
    store.set_meta("sweep_config", json.dumps(cfg.to_dict(), sort_keys=True))
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
         ft_loss: float | None) -> CheckpointRow:
    return CheckpointRow(run_id=run_id, step=step, ft_loss=result.ft_loss if result.ft_loss is not None else ft_loss,
                         train_loss=train_loss, forget_ce=result.ce, forget_ce_hard=result.ce_hard,
                         base_entropy=result.entropy, forget_kl=result.kl, ft_kl=result.ft_kl, tokens_seen=tokens_seen)


def _intervals(result: ForgettingResult) -> dict[str, Any]:
    return {"kl_ci": list(result.kl_ci), "ce_ci": list(result.ce_ci), "ce_hard_ci": list(result.ce_hard_ci),
            "blocks": result.blocks, "tokens": result.tokens}


def _store_group(cfg: Any, out_dir: Path, store: Store, group: Group, sources: list[Source], base: torch.nn.Module,
                 ref: ForgettingMeter, base_result: ForgettingResult, with_data: bool, bar: Any) -> None:
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
    store.add_run(RunRecord(run_id=group.run_id, model=cfg.model.name, dataset=dataset, method=method,
                            method_config=method_config, rank=rank, trainable_params=None, seed=0, config=config,
                            status="running"))
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
        paths = {s.step: str(s.path) for s in group.sources}
        for row in store.checkpoints(group.run_id):
            extra = intervals.get(str(row["step"]), {})
            out.append({**row, "label": group.label, "path": paths.get(row["step"]) if row["step"] else None,
                        "method": run["method"], "rank": run["rank"],
                        "trainable_params": run["trainable_params"],
                        "kl_ci": tuple(extra.get("kl_ci", (math.nan, math.nan))),
                        "ce_ci": tuple(extra.get("ce_ci", (math.nan, math.nan))),
                        "ce_hard_ci": tuple(extra.get("ce_hard_ci", (math.nan, math.nan))),
                        "blocks": extra.get("blocks")})
    return out


def check_budget(budget: float | None) -> None:
    """`--budget` is a finite number of nats > 0 (checked before anything is loaded)."""
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise ConfigError(f"--budget: must be a finite forgetting KL in nats > 0; got {budget:g}")


def within_budget(rows: list[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    """The measured checkpoint (not the base) with the lowest held-out / eval loss among those whose forgetting
    KL is at most `budget` (the point estimate; its interval is printed beside it); with no loss stored for
    any of them, the latest such step. None when no checkpoint is within the budget."""
    inside = [r for r in rows if r["step"] > 0 and r["forget_kl"] <= budget]
    if not inside:
        return None
    scored = [r for r in inside if r["ft_loss"] is not None and math.isfinite(r["ft_loss"])]
    if scored:
        return min(scored, key=lambda r: (r["ft_loss"], r["step"]))
    return max(inside, key=lambda r: r["step"])
