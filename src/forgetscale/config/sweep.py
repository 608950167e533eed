"""The sweep config's sections: every key, its default and its rule, in one place (pydantic, torch-free).

Every key is documented by its Field description; `forgetscale keys` prints them. Methods and arms are
validated in the same pass, each by its own spec class (registered in forgetscale.methods and
forgetscale.mitigations, one module per method or arm), chosen by its `name`.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    SerializeAsAny,
    field_validator,
    model_validator,
)

from forgetscale.config.evals import EvalsConfig
from forgetscale.methods import METHODS, MethodSpec
from forgetscale.mitigations import MITIGATIONS, MitigationSpec
from forgetscale.schema import Section, SourceSpec

_Section = Section


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="'smollm2-135m-instruct' (embedded), 'smollm2-135m-guarded' (it refuses harmful requests; built on "
        "first use, docs/evals.md), 'gemma3-270m' (Gemma 3 270M base, extra [gemma], docs/models.md), "
        "'tiny-random-llama' (tests), a hub id, a local "
        "model directory, or a .gguf file",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `name` (a hub id or directory)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="allow model code from the hub (off unless you trust it)")
    cache_dir: str | None = Field(None, description="converted-weights cache (default ~/.cache/forgetscale or $FORGETSCALE_CACHE)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="precision of the base weights: auto: bf16 on CUDA GPUs with native bf16, fp32 "
        "otherwise; the trained weights (adapters, or the layers full/top_layers train) stay fp32",
    )
    quantization: Literal["none", "4bit"] = Field(
        "none", description="4bit: the frozen base in NF4 (QLoRA, bitsandbytes; CUDA only, "
        "`pip install 'forgetscale[qlora]'`); adapter methods only",
    )
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="attention kernel: auto: eager on CPU under bf16/fp16 for sequences up to 512 tokens "
        "(a SmolLM2 step 1.10-1.19x faster there; benchmarks/bench_attention.py), sdpa otherwise",
    )

    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="random: `name` is a config (a local folder with config.json and a tokenizer, or "
        "a hub id) whose weights are drawn at random (seeded, on the run's device, in model.dtype): speed and "
        "memory checks at shapes you cannot download (benchmarks/gpu_check.py); its numbers mean nothing",
    )

    ADDED_KEYS = ("attention", "init")

    @model_validator(mode="after")
    def _random_is_plain(self) -> ModelConfig:
        if self.init == "random" and (self.quantization != "none" or self.gguf_file or self.name.endswith(".gguf")):
            raise ValueError("init: random draws plain weights from a config; it takes neither a GGUF file nor "
                             f"model.quantization (got quantization={self.quantization}, gguf_file={self.gguf_file})")
        return self


class FinetuneConfig(SourceSpec):
    dataset: str = Field(
        "embedded:news", description="embedded:news | embedded:sharegpt (multi-turn chats, offline) | hf:<hub id> | "
        "path to .jsonl/.json/.csv/.parquet/.txt")
    format: Literal["auto", "documents", "chat"] = Field(
        "auto", description="documents: raw text packed into blocks; chat: system/question/response records or "
        "`messages` lists"
    )
    system_field: str | None = Field(None, description="column with the system prompt (auto: system_prompt/system)")
    question_field: str | None = Field(None, description="column with the user turn (auto: question/instruction/prompt/input)")
    response_field: str | None = Field(None, description="column with the answer (auto: response/output/answer/completion)")
    max_examples: int | None = Field(
        None, gt=0, description="use at most this many records/documents (with language: en, this many English ones)")
    max_turns: int | None = Field(
        None, gt=0, description="multi-turn chat records: keep each conversation up to its N-th assistant reply "
        "(null: all; the context length cuts the rest)")
    language: Literal["auto", "en", "any"] = Field(
        "auto", description="en: keep only records a cheap heuristic calls English (the user turns' letters "
        "mostly ASCII, English function words not outnumbered by French/Spanish/German/...: "
        "forgetscale/data/language.py); any: all; auto: en for embedded:sharegpt, any elsewhere. With en, a hub "
        "source is read whole before max_examples applies")
    heldout_fraction: float = Field(0.1, gt=0.0, lt=0.9, description="part of the records held out for the held-out loss")
    heldout_max_tokens: int = Field(4096, gt=0, description="token budget of the held-out loss evaluation")
    loss_on: Literal["response", "responses", "all"] = Field(
        "response", description="chat data: response: loss on the reply only (a multi-turn `messages` record: its "
        "last reply; embedded:sharegpt: every reply, as responses); responses: every assistant turn; all: every token")
    separator: Literal["eos", "blank_line"] = Field(
        "eos", description="between packed documents: the tokenizer's EOS token (a chat model's end-of-turn token: "
        "SmolLM2's im_end), or a blank line as text")
    template_system_prompt: bool = Field(
        True, description="chat records with no (or an empty) system prompt: the chat template decides, and "
        "SmolLM2's inserts its default one ('You are a helpful AI assistant named SmolLM ...'); false: an empty "
        "system turn, so no default is inserted")

    ADDED_KEYS = ("separator", "template_system_prompt", "max_turns", "language")


class ForgettingConfig(SourceSpec):
    dataset: str = Field("embedded:wikipedia", description="embedded:wikipedia | hf:wikitext | hf:<hub id> | local file")
    config: str | None = Field(None, description="hub dataset config (hf:wikitext defaults to wikitext-103-raw-v1)")
    split: str = Field("test", description="hub dataset split")
    max_tokens: int = Field(4096, gt=0, description="token budget of the forgetting set (identical for every run)")
    block_length: int | None = Field(None, gt=1, description="tokens per forgetting block (default: train.context_length)")
    reference: str = Field(
        "auto", description="where the base predictions live: memory (4 bytes x vocab x tokens of RAM), disk "
        "(a file under RUN_DIR/references, read in chunks, reused by every run and resume), recompute (the base "
        "re-run with the adapter disabled at each checkpoint; adapter methods only), topk:K (the K largest base "
        "probabilities + tail mass; KL/CE slightly low, see docs), auto: memory if it fits in half the free RAM, "
        "else disk if its files fit in 90% of the free disk, else recompute (adapter methods)",
    )

    @field_validator("reference")
    @classmethod
    def _reference_mode(cls, v: str) -> str:
        head, _, k = v.partition(":")
        if v in ("auto", "memory", "disk", "recompute") or (head == "topk" and k.isdigit() and int(k) >= 1):
            return v
        raise ValueError("must be auto, memory, disk, recompute or topk:K with K >= 1")

    @property
    def exact_reference(self) -> bool:
        """Every mode but topk stores or recomputes the full distribution: the numbers do not depend on it."""
        return not self.reference.startswith("topk:")

    separator: Literal["eos", "blank_line"] = Field(
        "eos", description="between packed documents: the tokenizer's EOS token (a chat model's end-of-turn token: "
        "SmolLM2's im_end), or a blank line as text")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="precision of every forgetting measurement (sweep, measure; the callback's dtype=): "
        "auto: the base weights' own (fp32 weights: fp32, whatever train.dtype trains in; bf16/fp16 weights: "
        "autocast in it, the output head in fp32), so one checkpoint gives one number whichever tool measures it")

    ADDED_KEYS = ("separator", "dtype")


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
    gradient_checkpointing: bool = Field(False, description="recompute each layer's activations in the backward "
                                         "pass: less activation memory for one more forward pass per step, same "
                                         "numbers")
    allocator: Literal["auto", "retain", "system"] = Field(
        "auto", description="host memory torch frees: retain keeps it in the process (glibc mallopt), so tensors "
        "reuse mapped pages instead of page-faulting fresh ones (faster CPU steps, peak RSS kept); system: glibc's "
        "defaults; auto: retain on CPU. Same numbers either way")
    compile: Literal["off", "layers", "model"] = Field(
        "off", description="torch.compile (inductor) for the training step: layers: each decoder layer (one graph "
        "reused by every layer; compiled in seconds to a minute), model: the whole decoder body (minutes); the "
        "output head and every measuring pass stay eager. Numbers within the precision's rounding of off, so it "
        "is part of a run's identity (docs/performance.md#compiled-training-steps)")

    ADDED_KEYS = ("compile",)

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


class _Name(BaseModel):
    """An entry's `name`, checked against the registry in the validation context (errors point at `name`)."""

    name: str

    @field_validator("name")
    @classmethod
    def _known(cls, v: str, info: Any) -> str:
        info.context["registry"].get(v)  # unknown name -> did-you-mean message
        return v


def _named(registry: Any, kind: str, default: str | None) -> Any:
    """A validator turning one entry (a bare name, or a mapping with `name`) into the spec its name picks,
    so a list of methods or arms is validated in the same pass as the rest of the config."""

    def pick(item: Any) -> Any:
        if isinstance(item, BaseModel):
            return item
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise ValueError(f"must be a {kind} name or a mapping with a 'name'")
        name = _Name.model_validate({"name": item.get("name", default)}, context={"registry": registry}).name
        return registry.get(name).model_validate(item)

    return pick


def _as_list(v: Any) -> Any:
    return [] if v is None else v if isinstance(v, list) else [v]


# one entry or a list; errors point at the entry's key and line
MethodConfig = Annotated[SerializeAsAny[MethodSpec], BeforeValidator(_named(METHODS, "method", "lora"))]
MethodList = Annotated[list[MethodConfig], BeforeValidator(_as_list)]
MitigationConfig = Annotated[SerializeAsAny[MitigationSpec], BeforeValidator(_named(MITIGATIONS, "mitigation", None))]
MitigationList = Annotated[list[MitigationConfig], BeforeValidator(_as_list)]


class SweepConfig(_Section):
    name: str = Field("sweep", description="a label for this sweep")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="fine-tuning data")
    forgetting: ForgettingConfig = Field(default_factory=ForgettingConfig, description="general text the forgetting metric runs on")
    method: MethodList = Field(
        default_factory=lambda: [METHODS.get("lora")(ranks=[8])],
        description="one method mapping, or a list of them (see `forgetscale keys`)",
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

    @field_validator("method")
    @classmethod
    def _some_method(cls, v: list[MethodSpec]) -> list[MethodSpec]:
        if not v:
            raise ValueError("must list at least one method")
        return v

    @property
    def methods(self) -> list[MethodSpec]:
        return list(self.method)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self, exclude: tuple[str, ...] = ()) -> str:
        data = {k: v for k, v in self.to_dict().items() if k not in exclude}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
