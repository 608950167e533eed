"""lm-evaluation-harness tasks as suites (`lm-eval:arc_easy`, `lm-eval:hellaswag,mmlu`): run through
lm-eval's Python API on the model forgetscale already holds (wrapped in its HFLM, never reloaded per
task or checkpoint), every logged sample stored as an item row, summarized like the choice suite.

One row per (lm-eval metric, document): `protocol` is the metric (`acc`, `acc_norm`, `exact_match`;
`<metric>,<filter>` for a filter other than `none`), `correct` its 0/1 score, `prediction` the answer
it scored (the picked choice's index for multiple choice, the filtered reply for generation), so the
agreement with the base and the paired intervals mean what they mean for the choice suite. A group
(`mmlu`) stores its subtasks' documents together (item id `<subtask>/<doc id>`): its rate is over items.
Metrics that are not 0/1 per document (perplexity, BLEU) are stored per item and averaged, without
intervals. The extra is `forgetscale[lmeval]`.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import math
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from forgetscale.errors import ConfigError, DataError, UnknownNameError
from forgetscale.evals.suites import Suite, SuiteSettings, paired_rows, rate, register_family

if TYPE_CHECKING:
    from forgetscale.evals.suites import Target

LMEVAL = "lm-eval"  # `lm-eval:TASK[,TASK...]`: the family's name, and its `evals:` key as written
KEY = "lm_eval"  # the EvalsConfig attribute holding its settings
EXTRA = "lm-eval suites need lm-evaluation-harness: pip install 'forgetscale[lmeval]'"


class LmEvalSettings(SuiteSettings):
    include_path: str | None = Field(None, description="folder of extra lm-eval task YAMLs (e.g. a local task over a local JSONL)")
    limit: int | None = Field(None, gt=0, description="first N documents of each task (null: all)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (null: the task's own default)")
    apply_chat_template: bool = Field(False, description="wrap prompts in the tokenizer's chat template")

    @field_validator("include_path")
    @classmethod
    def _folder(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_dir():
            raise ValueError(f"must be a folder of lm-eval task YAMLs; {v} is not a folder")
        return None if v is None else str(Path(v).expanduser().resolve())


def _require() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(EXTRA) from None


@cache
def _index(include_path: str | None, defaults: bool) -> Any:
    _require()
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager(include_path=include_path, include_defaults=defaults)


def task_manager(include_path: str | None, task: str | None = None) -> Any:
    """lm-eval's task index, built once per process: only include_path's tasks when it holds `task` (lm-eval's
    own ~15k YAMLs take half a minute to scan on a small machine), else lm-eval's tasks plus include_path."""
    if include_path and task and task in _index(include_path, False).all_tasks:
        return _index(include_path, False)
    return _index(include_path, True)


def check_task(task: str, include_path: str | None) -> None:
    """An unknown task name: one line with the closest of lm-eval's names."""
    manager = task_manager(include_path, task)
    known = manager.all_tasks
    if task in known:
        return
    close = difflib.get_close_matches(task, known, n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    where = f" and {include_path}" if include_path else "; a local task's folder goes in --set lm-eval.include_path=DIR"
    raise UnknownNameError(f"unknown lm-eval task '{task}'{hint} ({len(known)} names known to lm-eval{where}; "
                           "`lm-eval ls tasks` lists them)")


@cache
def _tasks(task: str, include_path: str | None) -> dict[str, Any]:
    """The lm-eval Task objects (one, or a group's subtasks) with their documents read: name -> Task."""
    check_task(task, include_path)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            loaded = task_manager(include_path, task).load([task])
    except Exception as err:  # a dataset lm-eval cannot read (offline hub, missing file): its own message
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"lm-eval task '{task}': its documents cannot be read ({first})") from None
    return dict(loaded["tasks"])


def _docs(task_obj: Any, limit: int | None) -> list[Any]:
    docs = task_obj.eval_docs
    n = len(docs) if limit is None else min(limit, len(docs))
    return [docs[i] for i in range(n)]


def task_suite(task: str) -> Suite:
    if not task:
        raise ConfigError(f"--suite: '{LMEVAL}:' needs a task name, e.g. {LMEVAL}:arc_easy")

    def load(settings: Any, cache_dir: Any) -> list[str]:
        tasks = _tasks(task, settings.include_path)
        many = len(tasks) > 1
        return [f"{name}/{i}" if many else str(i) for name, obj in sorted(tasks.items())
                for i in range(len(_docs(obj, settings.limit)))]

    def evaluate(target: Target, items: list[str], settings: Any) -> list[dict[str, Any]]:
        tasks = _tasks(task, settings.include_path)
        samples = run_task(target, task, settings)
        rows = []
        for name, logged in sorted(samples.items()):
            for sample in logged:
                rows += sample_rows(sample, tasks.get(name), name if len(tasks) > 1 else None)
        if target.on_items:
            target.on_items(len(items))
        return rows

    return Suite(title=f"lm-evaluation-harness: {task}", settings_key=KEY, load=load, evaluate=evaluate,
                 summarize=summarize, describe=f"lm-eval task {task}: its metrics per document, agreement with the base")


def run_task(target: Target, task: str, settings: Any) -> dict[str, list[dict[str, Any]]]:
    """lm-eval's logged samples of one task (or group) on this model: subtask -> samples."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's own bars and notices; errors still raise
        lm = HFLM(pretrained=target.model, tokenizer=target.tokenizer, batch_size=target.batch_size)
        out = simple_evaluate(
            model=lm, tasks=[task], task_manager=task_manager(settings.include_path, task), limit=settings.limit,
            num_fewshot=settings.num_fewshot, apply_chat_template=settings.apply_chat_template, log_samples=True,
            bootstrap_iters=0, random_seed=target.seed, numpy_random_seed=target.seed,
            torch_random_seed=target.seed, fewshot_random_seed=target.seed,
        )
    return out["samples"]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of ties, as numpy's argmax


def _prediction(sample: dict[str, Any], metric: str, task_obj: Any) -> str | None:
    """The answer the metric scored: lm-eval's own choice rule (raw, per-character, per-byte) or the reply."""
    resps = sample["filtered_resps"]
    if task_obj is not None and task_obj.OUTPUT_TYPE == "multiple_choice":
        choices = task_obj.doc_to_choice(sample["doc"])
        lls = [float(r[0]) for r in resps][: len(choices)]
        if metric == "acc_norm":
            lls = [ll / max(1, len(c)) for ll, c in zip(lls, choices, strict=True)]
        elif metric == "acc_bytes":
            lls = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, choices, strict=True)]
        return str(_argmax(lls))
    first = resps[0] if isinstance(resps, list) and resps else resps
    return None if first is None else (first if isinstance(first, str) else json.dumps(first, default=str))


def sample_rows(sample: dict[str, Any], task_obj: Any, subtask: str | None) -> list[dict[str, Any]]:
    """One item row per metric of one logged lm-eval sample."""
    doc_id = str(sample["doc_id"])
    item_id = f"{subtask}/{doc_id}" if subtask else doc_id
    args = sample.get("arguments") or [[""]]
    prompt = args[0][0] if isinstance(args[0], (list, tuple)) else str(args[0])
    output = json.dumps(sample["filtered_resps"], default=str)
    rows = []
    for metric in sample["metrics"]:
        value = sample.get(metric)
        binary = isinstance(value, (bool, int, float)) and float(value) in (0.0, 1.0)
        protocol = metric if sample.get("filter", "none") == "none" else f"{metric},{sample['filter']}"
        rows.append({
            "protocol": protocol, "item_id": item_id, "prompt": str(prompt), "output": output,
            "prediction": _prediction(sample, metric, task_obj), "gold": json.dumps(sample["target"], default=str),
            "correct": int(float(value)) if binary else None,
            "extra": {"value": value if isinstance(value, (int, float)) else None, "doc_hash": sample.get("doc_hash")},
        })
    return rows


def summarize(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]] | None, settings: Any) -> list[dict[str, Any]]:
    out = []
    for protocol in sorted({r["protocol"] for r in rows}):
        mine, base = paired_rows(rows, base_rows, protocol)
        if not mine:
            continue
        if all(r["correct"] is not None for r in mine):
            out.append(rate("accuracy", protocol, [bool(r["correct"]) for r in mine],
                            None if base is None else [bool(r["correct"]) for r in base]))
        else:  # not 0/1 per document: its mean, no interval
            values = [_value(r) for r in mine]
            finite = [v for v in values if v is not None and math.isfinite(v)]
            out.append({"metric": "mean", "protocol": protocol, "k": None, "n": len(finite),
                        "value": sum(finite) / len(finite) if finite else None, "lo": None, "hi": None})
        if base is not None:
            agree = [r["prediction"] is not None and r["prediction"] == b["prediction"]
                     for r, b in zip(mine, base, strict=True)]
            out.append(rate("agreement_with_base", protocol, agree, None))
    return out


def _value(row: dict[str, Any]) -> float | None:
    extra = row["extra"]
    extra = json.loads(extra) if isinstance(extra, str) else extra or {}
    value = extra.get("value")
    return None if value is None else float(value)


register_family(LMEVAL, LmEvalSettings, "lm-evaluation-harness tasks (`lm-eval:TASK` suites; extra [lmeval])",
                key=KEY, build=task_suite, argument="task", example="arc_easy")
