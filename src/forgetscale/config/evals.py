"""The `evals:` section of a sweep config (also the defaults of `forgetscale eval`). Torch-free; the
suites themselves are forgetscale.evals."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from forgetscale.config.sources import SourceSpec, Strict

SUITE_NAMES = ("safety", "choice", "samples")
LMEVAL = "lm-eval"  # `lm-eval:TASK[,TASK...]`: lm-evaluation-harness tasks (forgetscale.evals.lmeval)


class _Settings(Strict):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Source(SourceSpec):
    """A suite's item source (the key is `source`: a suite reads prompts or questions, not documents)."""

    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


class SafetySettings(_Source):
    source: str = Field("embedded:harmbench", description="embedded:harmbench | hf:walledai/AdvBench (the paper's) | local .csv/.jsonl")
    text_field: str | None = Field(None, description="column with the request (auto: prompt/goal/behavior/text)")
    limit: int | None = Field(50, gt=0, description="first N prompts (the paper used 50 AdvBench requests; null: all)")
    max_new_tokens: int = Field(64, gt=0, description="tokens generated per reply (greedy)")
    system_prompt: str | None = Field(None, description="system turn added before each request")


class ChoiceSettings(_Settings):
    source: str = Field("embedded:choice", description="embedded:choice | hf:allenai/ai2_arc (ARC-Challenge test) | local ARC-format .jsonl")
    config: str | None = Field(None, description="hub config (hf:allenai/ai2_arc defaults to ARC-Challenge)")
    split: str = Field("test", description="hub dataset split")
    limit: int | None = Field(None, gt=0, description="first N items (null: all)")
    protocols: list[Literal["loglik", "generate"]] = Field(
        ["loglik", "generate"],
        description="loglik: most likely option text (lm-evaluation-harness); generate: answer letter parsed from a greedy reply (the paper's)",
    )
    max_new_tokens: int = Field(8, gt=0, description="tokens generated for the answer letter")

    @field_validator("protocols")
    @classmethod
    def _some(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("must list distinct protocols: loglik, generate")
        return v


class SamplesSettings(_Settings):
    prompts: list[str] | str | None = Field(None, description="prompt list, or a .txt (one per line) / .jsonl / .csv file; null: built-in set")
    max_new_tokens: int = Field(96, gt=0, description="tokens generated per reply")
    sample: bool = Field(False, description="sample instead of greedy decoding (seeded by evals.seed)")
    temperature: float = Field(0.7, gt=0.0, description="sampling temperature when sample: true")


class LmEvalSettings(_Settings):
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


def split_suites(names: list[str]) -> list[str]:
    """One name per suite: `lm-eval:a,b` (a CLI comma list, or one config entry) becomes `lm-eval:a`,
    `lm-eval:b`; a bare name after an lm-eval entry that is not a built-in suite is one more task."""
    out: list[str] = []
    in_lmeval = False
    for part in (p.strip() for name in names for p in name.split(",")):
        if not part:
            continue
        if part.startswith(f"{LMEVAL}:"):
            in_lmeval = True
            part = part.removeprefix(f"{LMEVAL}:").strip()
            if not part:
                raise ValueError(f"'{LMEVAL}:' needs a task name, e.g. {LMEVAL}:arc_easy")
            out.append(f"{LMEVAL}:{part}")
        elif in_lmeval and part not in SUITE_NAMES:
            out.append(f"{LMEVAL}:{part}")
        else:
            in_lmeval = False
            out.append(part)
    return out


class EvalsConfig(_Settings):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    suites: list[str] = Field(
        [], description="capability suites run after the sweep (also `forgetscale eval RUN_DIR`): safety, choice, "
        "samples, lm-eval:TASK[,TASK...]"
    )
    steps: list[int] | Literal["last"] = Field(
        "last", description="checkpoint steps to evaluate ('last' or a list; adapters are saved at these steps)"
    )
    batch_size: int = Field(16, gt=0, description="prompts per generation / scoring batch")
    seed: int = Field(0, ge=0, description="seed for sampled generations")
    safety: SafetySettings = Field(default_factory=SafetySettings, description="harmful-request refusals")
    choice: ChoiceSettings = Field(default_factory=ChoiceSettings, description="multiple-choice knowledge and reasoning")
    samples: SamplesSettings = Field(default_factory=SamplesSettings, description="side-by-side generations")
    lm_eval: LmEvalSettings = Field(default_factory=LmEvalSettings, alias=LMEVAL,
                                    description="lm-evaluation-harness tasks (`lm-eval:TASK` suites; extra [lmeval])")

    @field_validator("suites")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        v = split_suites(v)
        unknown = [s for s in v if s not in SUITE_NAMES and not s.startswith(f"{LMEVAL}:")]
        if unknown:
            raise ValueError(f"unknown suite '{unknown[0]}'; known: {', '.join(SUITE_NAMES)}, {LMEVAL}:TASK")
        if len(set(v)) != len(v):
            raise ValueError("must list each suite once")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, list) and (not v or any(s < 0 for s in v)):
            raise ValueError("must be 'last' or a non-empty list of steps >= 0")
        return v

    def adapter_steps(self, last: int) -> set[int]:
        """Steps whose adapters the sweep keeps for evals (also when the suites run later, from the CLI)."""
        return {last} if self.steps == "last" else set(self.steps)
