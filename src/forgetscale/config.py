"""Sweep configuration: YAML validated on load, with one-line errors that name the key and its line.

Every key is documented by its Field description; `forgetscale sweep --help-config` prints them.
Defaults live here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from forgetscale.errors import ConfigError, ForgetscaleError
from forgetscale.evals.settings import EvalsConfig
from forgetscale.methods import METHODS, MethodSpec
from forgetscale.mitigations import MITIGATIONS, MitigationSpec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="'smollm2-135m-instruct' (embedded), 'tiny-random-llama' (tests), a hub id, a local "
        "model directory, or a .gguf file",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `name` (a hub id or directory)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="allow model code from the hub (off unless you trust it)")
    cache_dir: str | None = Field(None, description="converted-weights cache (default ~/.cache/forgetscale or $FORGETSCALE_CACHE)")


class FinetuneConfig(_Section):
    dataset: str = Field("embedded:news", description="embedded:news | hf:<hub id> | path to .jsonl/.json/.csv/.parquet/.txt")
    config: str | None = Field(None, description="hub dataset config name (hf: sources)")
    split: str = Field("train", description="hub dataset split (hf: sources)")
    format: Literal["auto", "documents", "chat"] = Field(
        "auto", description="documents: raw text packed into blocks; chat: system/question/response records"
    )
    text_field: str = Field("text", description="column holding document text")
    system_field: str | None = Field(None, description="column with the system prompt (auto: system_prompt/system)")
    question_field: str | None = Field(None, description="column with the user turn (auto: question/instruction/prompt/input)")
    response_field: str | None = Field(None, description="column with the answer (auto: response/output/answer/completion)")
    max_examples: int | None = Field(None, gt=0, description="use at most this many records/documents")
    heldout_fraction: float = Field(0.1, gt=0.0, lt=0.9, description="part of the records held out for the held-out loss")
    heldout_max_tokens: int = Field(4096, gt=0, description="token budget of the held-out loss evaluation")
    loss_on: Literal["response", "all"] = Field("response", description="chat data: loss on response tokens only, or all")


class ForgettingConfig(_Section):
    dataset: str = Field("embedded:wikipedia", description="embedded:wikipedia | hf:wikitext | hf:<hub id> | local file")
    config: str | None = Field(None, description="hub dataset config (hf:wikitext defaults to wikitext-103-raw-v1)")
    split: str = Field("test", description="hub dataset split")
    text_field: str = Field("text", description="column holding the text")
    max_tokens: int = Field(4096, gt=0, description="token budget of the forgetting set (identical for every run)")
    block_length: int | None = Field(None, gt=1, description="tokens per forgetting block (default: train.context_length)")


class TrainConfig(_Section):
    steps: int = Field(64, gt=0, description="optimizer update steps per run (N)")
    checkpoints: list[int] | None = Field(None, description="steps at which metrics are measured (default: log-spaced, 0 included)")
    num_checkpoints: int = Field(7, ge=2, description="how many log-spaced checkpoints when `checkpoints` is not given")
    batch_size: int = Field(4, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per update step")
    context_length: int = Field(128, ge=8, description="tokens per training sequence")
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate (constant after warm-up)")
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps (default: 5% of steps, at least 1)")
    optimizer: Literal["adafactor", "adamw"] = Field("adafactor", description="adafactor (the paper's) or adamw")
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="gradient clipping norm (null: off)")
    seed: int = Field(0, ge=0, description="seed of data order, adapter init and dropout")
    seeds: list[int] | None = Field(None, description="run every method/rank once per seed (overrides `seed`)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, fp32 otherwise"
    )
    eval_batch_size: int = Field(8, gt=0, description="blocks per forward pass when measuring losses")
    save_adapters: Literal["last", "all", "none"] = Field("last", description="adapter weights kept under RUN_DIR/runs/<id>/")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")

    @field_validator("seeds")
    @classmethod
    def _seeds_nonempty(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(s < 0 for s in v) or len(set(v)) != len(v)):
            raise ValueError("must be a non-empty list of distinct seeds >= 0")
        return v

    @model_validator(mode="after")
    def _checkpoints_within_steps(self) -> TrainConfig:
        if self.checkpoints is not None:
            bad = [c for c in self.checkpoints if c < 0 or c > self.steps]
            if bad:
                raise ValueError(f"checkpoints: each must be between 0 and train.steps={self.steps}; got {bad[0]}")
            if not self.checkpoints:
                raise ValueError("checkpoints: must list at least one step")
        return self

    @property
    def checkpoint_steps(self) -> list[int]:
        """Sorted checkpoint steps; 0 and the last step are always included."""
        if self.checkpoints is not None:
            steps = set(self.checkpoints)
        else:
            k = self.num_checkpoints - 1
            steps = {round(self.steps ** (i / k)) for i in range(k + 1)} if self.steps > 1 else {1}
        return sorted(steps | {0, self.steps})

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, math.ceil(0.05 * self.steps))

    @property
    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed]


class ResourcesConfig(_Section):
    """What each run asks the executor for. Never part of a run's identity: it may change between invocations."""

    gpus_per_run: float | None = Field(
        None, ge=0.0, description="GPUs each Ray task reserves; a fraction below 1 packs small runs onto one GPU "
        "(default: 1 when the Ray cluster has GPUs, else 0)",
    )
    cpus_per_run: float = Field(1.0, gt=0.0, description="CPU cores each Ray task reserves; also its torch threads "
                                "when train.threads is unset")
    memory_gb_per_run: float | None = Field(None, gt=0.0, description="host memory (GB) each Ray task reserves, so "
                                            "the scheduler never packs more runs onto a node than fit")
    max_parallel: int | None = Field(None, gt=0, description="most runs in flight at once (default: as many as "
                                     "the cluster's free resources fit)")
    max_retries: int = Field(2, ge=0, description="Ray: extra attempts for a run whose worker dies or raises "
                             "(a non-finite loss is a result, never retried)")
    artefacts: Literal["auto", "shared", "stream"] = Field(
        "auto", description="Ray: shared: workers write RUN_DIR directly (same path on every node, e.g. NFS); "
        "stream: files come back to the driver through Ray; auto: shared on the driver's node, stream elsewhere",
    )

    @field_validator("gpus_per_run")
    @classmethod
    def _whole_gpus_above_one(cls, v: float | None) -> float | None:
        if v is not None and v > 1 and not float(v).is_integer():
            raise ValueError("must be a fraction below 1 or a whole number (Ray's rule)")
        return v


class _ArmName(BaseModel):
    name: str

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        MITIGATIONS.get(v)  # unknown arm -> did-you-mean message
        return v


def _mitigation(item: Any) -> Any:
    """One `mitigation:` entry (a bare arm name, or a mapping with `name`) -> that arm's spec."""
    if isinstance(item, MitigationSpec):
        return item
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict):
        raise ValueError("must be a mitigation name or a mapping with a 'name'")
    return MITIGATIONS.get(_ArmName.model_validate({k: v for k, v in item.items() if k == "name"}).name).model_validate(item)


# mitigation arms (src/forgetscale/mitigations/): one entry, or a list; errors point at the entry's key and line
MitigationConfig = Annotated[SerializeAsAny[MitigationSpec], BeforeValidator(_mitigation)]
MitigationList = Annotated[list[MitigationConfig], BeforeValidator(lambda v: [] if v is None else
                                                                    v if isinstance(v, list) else [v])]


class SweepConfig(_Section):
    name: str = Field("sweep", description="a label for this sweep")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="fine-tuning data")
    forgetting: ForgettingConfig = Field(default_factory=ForgettingConfig, description="general text the forgetting metric runs on")
    method: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"name": "lora", "ranks": [8]}],
        description="one method mapping, or a list of them (see `forgetscale methods`)",
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation settings shared by every run")
    mitigation: MitigationList = Field(default_factory=list, description="mitigation arms, each compared with "
                                       "'none' on the same data, ranks and seeds (see docs/mitigations.md)")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="what each run asks the executor for")
    evals: EvalsConfig = Field(default_factory=EvalsConfig, description="capability suites run on saved adapters (see `forgetscale eval`)")

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("method", mode="before")
    @classmethod
    def _method_list(cls, v: Any) -> Any:
        items = v if isinstance(v, list) else [v]
        return [{"name": item} if isinstance(item, str) else item for item in items]

    @property
    def methods(self) -> list[MethodSpec]:
        return [METHODS.get(m.get("name", "lora")).spec.model_validate(m) for m in self.method]

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["method"] = [m.model_dump(mode="json") for m in self.methods]
        return data

    def fingerprint(self, exclude: tuple[str, ...] = ()) -> str:
        data = {k: v for k, v in self.to_dict().items() if k not in exclude}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# -- loading and error messages -------------------------------------------------------------------

def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line, for messages that point at the line."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, key.value)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: ValidationError, source: str, lines: dict[tuple, int], prefix: tuple = ()) -> str:
    first = err.errors()[0]
    loc = (*prefix, *(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
    key = _format_loc(loc) or "config"
    line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
    where = f"{source}:{line}" if line else source
    if first["type"] == "extra_forbidden":
        return f"{where} {key}: unknown key; remove it or check its spelling"
    rule = first["msg"].removeprefix("Value error, ")
    rule = rule[0].lower() + rule[1:] if rule else rule
    got = first.get("input")
    shown = json.dumps(got) if isinstance(got, (int, float, str, bool, type(None))) else type(got).__name__
    return f"{where} {key}: {rule}; got {shown}"


def parse_config(data: Any, source: str = "config", text: str = "") -> SweepConfig:
    """Validate a mapping (as read from YAML) into a SweepConfig."""
    lines = _yaml_lines(text) if text else {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a YAML mapping of keys; got {type(data).__name__}")
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_message(err, source, lines)) from None
    for i, method in enumerate(cfg.method):
        if not isinstance(method, dict):
            raise ConfigError(f"{source} method[{i}]: must be a mapping with a 'name'; got {method!r}")
        try:
            spec_cls = METHODS.get(method.get("name", "lora")).spec
        except ForgetscaleError as err:
            line = lines.get(("method", "name")) or lines.get(("method", i, "name"))
            raise ConfigError(f"{source}{':' + str(line) if line else ''} method.name: {err}") from None
        try:
            spec_cls.model_validate(method)
        except ValidationError as err:
            prefix = ("method",) if ("method", "name") in lines else ("method", i)
            raise ConfigError(_message(err, source, lines, prefix)) from None
    if isinstance(cfg.evals.steps, list):
        off = [s for s in cfg.evals.steps if s not in cfg.train.checkpoint_steps]
        if off:
            line = lines.get(("evals", "steps"))
            raise ConfigError(f"{source}{':' + str(line) if line else ''} evals.steps: must be checkpoint steps "
                              f"({', '.join(map(str, cfg.train.checkpoint_steps))}); got {off[0]}")
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and validate a YAML sweep config; `overrides` are dotted keys applied on top (is-not-None)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    data = data if data is not None else {}
    for dotted, value in (overrides or {}).items():
        if value is None or not isinstance(data, dict):
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_config(data, str(path), text)
