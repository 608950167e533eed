"""`forgetscale eval`: run the suites on the base model and on saved adapters, store every item and
every summary in RUN_DIR/results.sqlite.

The base model is loaded once; each tuned model is the base plus its saved weights (forgetscale.weights.applied:
PEFT adapters are wrapped around the base and unloaded afterwards; full / top-layer weights are swapped in and
restored), so a 7B base is not re-read per checkpoint. A (suite, model) already stored with the same
settings is skipped, so re-running the command after an interruption only does what is missing.
Summaries are recomputed from the stored items each time (stage outputs feed the next stage).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetscale.artefacts import RunFolder
from forgetscale.config.evals import EvalsConfig, split_suites
from forgetscale.errors import ConfigError, StoreError
from forgetscale.evals.labels import run_labels
from forgetscale.evals.suites import Target, suite_for
from forgetscale.methods import METHODS
from forgetscale.store import Store
from forgetscale.weights import applied, saved_source

BASE = "base"


@dataclass(frozen=True)
class Checkpoint:
    """A tuned model to evaluate: one run at one step, and where its adapter lies."""

    run_id: str
    step: int
    label: str
    adapter: Path

    @property
    def key(self) -> str:
        return f"{self.run_id}@{self.step}"


def select_checkpoints(store: Store, run_dir: Path, runs: list[str] | None, steps: list[int] | str) -> tuple[list[Checkpoint], list[str]]:
    """The (run, step) pairs to evaluate, and notes about runs skipped for lack of a saved adapter.

    steps: 'last', 'checkpoints' (every step with a stored checkpoint row: a missing adapter is a note, as
    for 'last', since a measured full checkpoint may not have been kept) or a list (a missing one is an error).
    """
    labels = run_labels(store)
    rows = store.runs()
    if runs:
        wanted = []
        for name in runs:
            hit = [r for r in rows if labels[r["run_id"]] == name or r["run_id"].startswith(name)]
            if not hit:
                raise ConfigError(f"--runs: no run '{name}' in {run_dir}; known: {', '.join(sorted(labels.values()))}")
            wanted += [r for r in hit if r not in wanted]
        rows = wanted
    out, notes = [], []
    for r in rows:
        config = json.loads(r["config"])
        last = int(config["train"]["steps"])
        folder = RunFolder(run_dir, r["run_id"])
        saved = folder.saved_steps()
        if steps == "checkpoints":  # every stored checkpoint step (a sweep's or a measured trainer output's)
            wanted_steps = sorted({int(c["step"]) for c in store.checkpoints(r["run_id"])})
        else:
            wanted_steps = [last] if steps == "last" else list(steps)
        for step in wanted_steps:
            if step not in saved and steps == "checkpoints" and step == 0:
                continue  # a measured run's step 0 is the base model itself, evaluated as 'base'
            if step not in saved:
                why = (f"run {labels[r['run_id']]} step {step}: no saved adapter "
                       f"({'saved steps: ' + ', '.join(map(str, saved)) if saved else 'none saved'}; status {r['status']})")
                if isinstance(steps, list) or runs:
                    raise StoreError(f"{why}; re-run the sweep with train.save_adapters: all or evals.steps listing it "
                                     "(or evals.steps: checkpoints)")
                notes.append(why)
                continue
            out.append(Checkpoint(r["run_id"], step, labels[r["run_id"]], folder.adapter(step)))
    return out, notes


def as_base(store: Store, targets: list[Checkpoint]) -> set[str]:
    """The step-0 checkpoints of methods that start as the base (MethodSpec.starts_as_base: LoRA's B is zero, so
    the model computes the base's predictions bit for bit, as training already relies on): every suite answers
    as the base did, so their items are the base's, stored again, not generated again."""
    methods = {r["run_id"]: r["method"] for r in store.runs()}
    return {t.key for t in targets if t.step == 0 and methods.get(t.run_id) in METHODS
            and METHODS.get(methods[t.run_id]).starts_as_base}


def _settings_json(settings: Any) -> str:
    return json.dumps(settings.model_dump(mode="json"), sort_keys=True)


def _stored_settings(store: Store, suite: str) -> dict[str, str]:
    return {row["model_key"]: row["settings"] for row in store.eval_summaries(suite)}


GENERATING = ("safety", "samples", "choice")  # suites that prompt the model (choice: its generate protocol)


def prompt_notes(tokenizer: Any, model_name: str, suites: set[str]) -> list[str]:
    """One note when a suite prompts a model that has no chat template: it says the prompts are plain text."""
    from forgetscale.evals.generation import PLAIN_PROMPT, prompt_format

    if prompt_format(tokenizer) != "plain" or not suites & set(GENERATING):
        return []
    shown = PLAIN_PROMPT.replace("\n", "\\n")
    return [f"model '{model_name}' has no chat template (a base model): {', '.join(sorted(suites & set(GENERATING)))} "
            f"prompt it with plain text '{shown}', not a chat turn; its refusals are a base model's"]


def run_evals(
    run_dir: str | Path, evals: EvalsConfig, *, suites: list[str] | None = None, runs: list[str] | None = None,
    steps: list[int] | str | None = None, force: bool = False, progress: bool = True, device: str | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Evaluate base and checkpoints; returns (summary rows of the evaluated models, notes to print)."""
    from tqdm.auto import tqdm

    from forgetscale.config import SweepConfig
    from forgetscale.models import cache_root, compute_dtype, load_configured_model, resolve_device

    run_dir = Path(run_dir)
    store = Store(run_dir, create=False)
    stored = store.get_meta("sweep_config")
    if stored is None:
        raise StoreError(f"{store.path}: no sweep config stored; run `forgetscale sweep` into {run_dir} first")
    cfg = SweepConfig.model_validate(json.loads(stored))
    names = _names(suites or list(evals.suites))
    targets, notes = select_checkpoints(store, run_dir, runs, steps if steps is not None else evals.steps)

    cache = cache_root(cfg.model.cache_dir) / "data"
    items = {name: suite_for(name).load(getattr(evals, suite_for(name).settings_key), cache) for name in names}
    todo: list[tuple[str, str]] = []  # (suite, model key) to evaluate
    for name in names:
        settings = _settings_json(getattr(evals, suite_for(name).settings_key))
        done = _stored_settings(store, name)
        for key in [BASE] + [t.key for t in targets]:
            # the base must match the settings too: every comparison is on the same items
            if force or done.get(key) != settings or (key != BASE and done.get(BASE) != settings):
                todo.append((name, key))
    if any(k == BASE for _, k in todo):  # a re-evaluated base invalidates stored comparisons
        todo += [(n, t.key) for n in {n for n, k in todo if k == BASE} for t in targets if (n, t.key) not in todo]
    copies = as_base(store, targets)
    generate = {(n, k) for n, k in todo if k not in copies}
    by_key = {t.key: t for t in targets}
    if generate:
        dev = resolve_device(device or cfg.train.device)
        # the sweep's precision: base weights in model.dtype (or 4-bit), autocast as the checkpoints were measured
        dtype = compute_dtype(cfg, dev)
        base = load_configured_model(cfg, dev)
        notes += prompt_notes(base.tokenizer, cfg.model.name, {n for n, _ in todo})
        work = sum(_work(items[n], getattr(evals, suite_for(n).settings_key)) for n, _ in generate)
        with tqdm(total=work, desc="eval", unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
            for key in [BASE] + [t.key for t in targets]:
                names_here = [n for n in names if (n, key) in generate]
                if not names_here:
                    continue
                bar.set_description(f"eval {by_key[key].label}@{by_key[key].step}" if key != BASE else "eval base")
                context = (contextlib.nullcontext((base.model, 0)) if key == BASE
                           else applied(base.model, saved_source(by_key[key].adapter, by_key[key].step)))
                with context as (model, _params):
                    target = Target(key, model, base.tokenizer, dev, dtype, evals.batch_size, evals.seed, bar.update)
                    for name in names_here:
                        suite = suite_for(name)
                        rows = suite.evaluate(target, items[name], getattr(evals, suite.settings_key))
                        run_id, step = (None, None) if key == BASE else (by_key[key].run_id, by_key[key].step)
                        for row in rows:
                            row.update(run_id=run_id, step=step)
                        store.replace_eval_items(name, key, rows)
    for name, key in todo:  # the base's own function: its answers are the base's, stored again, not regenerated
        if key in copies:
            rows = [{**row, "run_id": by_key[key].run_id, "step": 0} for row in store.eval_items(name, BASE)]
            store.replace_eval_items(name, key, rows)
    summaries = []
    wanted = [BASE] + [t.key for t in targets]
    for name in names:
        summaries += summarize_suite(store, name, getattr(evals, suite_for(name).settings_key), wanted)
    store.close()
    return summaries, notes


def _names(names: list[str]) -> list[str]:
    """One name per suite (`lm-eval:a,b` is two), each known: an unknown one is a did-you-mean error."""
    try:
        names = split_suites(names)
    except ValueError as err:
        raise ConfigError(f"--suite: {err}") from None
    if not names:
        raise ConfigError("--suite: name at least one suite (safety, choice, samples, lm-eval:TASK) or set "
                          "evals.suites in the config")
    for name in names:
        suite_for(name)
    return names


def check_suites(evals: EvalsConfig) -> None:
    """What a sweep's evals.suites name exists, before the sweep trains for hours (lm-eval: the extra, the
    task names and their documents)."""
    from forgetscale.models import cache_root

    for name in _names(list(evals.suites)):
        suite = suite_for(name)
        if name.startswith("lm-eval:"):
            suite.load(getattr(evals, suite.settings_key), cache_root(None) / "data")


def _work(items: list[Any], settings: Any) -> int:
    protocols = getattr(settings, "protocols", ["greedy"])
    return len(items) * len(protocols)


def summarize_suite(store: Store, name: str, settings: Any, keys: list[str]) -> list[dict[str, Any]]:
    """(Re)compute and store the suite's summaries of these models from their stored items (other models'
    summaries, possibly made with other settings, stay as they are)."""
    suite = suite_for(name)
    rows = store.eval_items(name)
    by_key: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault(row["model_key"], []).append(row)
    base_rows = by_key.get(BASE)
    settings_json = _settings_json(settings)
    out = []
    for key in keys:
        mine = by_key.get(key)
        if not mine:
            continue
        metrics = suite.summarize(mine, None if key == BASE else base_rows, settings)
        run_id, step = mine[0]["run_id"], mine[0]["step"]
        for metric in metrics:
            metric.update(suite=name, model_key=key, run_id=run_id, step=step, settings=settings_json)
        out += metrics
    store.replace_eval_summaries(name, out)
    return out
