"""Samples: a fixed list of prompts (knowledge, reasoning, instructions, a few harmful requests),
base and tuned replies stored side by side for a person to read; the summary only counts how
many replies are unchanged from the base model's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from forgetscale.evals.suites import SuiteSettings, paired_rows, rate, register_suite

if TYPE_CHECKING:
    from forgetscale.evals.suites import Target


class SamplesSettings(SuiteSettings):
    prompts: list[str] | str | None = Field(None, description="prompt list, or a .txt (one per line) / .jsonl / .csv file; null: built-in set")
    max_new_tokens: int = Field(96, gt=0, description="tokens generated per reply")
    sample: bool = Field(False, description="sample instead of greedy decoding (seeded by evals.seed)")
    temperature: float = Field(0.7, gt=0.0, description="sampling temperature when sample: true")


def load(settings: Any, cache_dir: Any) -> list[tuple[str, str]]:
    from forgetscale.evals.items import sample_prompts

    return sample_prompts(settings.prompts)


def _protocol(settings: Any) -> str:
    return f"sample-t{settings.temperature:g}" if settings.sample else "greedy"


def evaluate(target: Target, items: list[tuple[str, str]], settings: Any) -> list[dict[str, Any]]:
    from forgetscale.evals.generation import chat_prompt, generate, prompt_format

    prompts = [chat_prompt(target.tokenizer, text) for _, text in items]
    replies = generate(target.model, target.tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                       batch_size=target.batch_size, device=target.device, dtype=target.dtype,
                       sample=settings.sample, temperature=settings.temperature, seed=target.seed,
                       on_batch=target.on_items)
    protocol = _protocol(settings)
    return [{"protocol": protocol, "item_id": f"{i:03d}", "prompt": text, "output": reply,
             "extra": {"category": category, "prompt_format": prompt_format(target.tokenizer)}}
            for i, ((category, text), reply) in enumerate(zip(items, replies, strict=True))]


def summarize(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]] | None, settings: Any) -> list[dict[str, Any]]:
    mine, base = paired_rows(rows, base_rows, _protocol(settings))
    if base is None:
        return [rate("replies", _protocol(settings), [True] * len(mine), None)]
    same = [r["output"] == b["output"] for r, b in zip(mine, base, strict=True)]
    return [rate("same_as_base", _protocol(settings), same, None)]


register_suite(
    "samples", SamplesSettings, "side-by-side generations",
    title="Samples: base and tuned replies side by side", load=load, evaluate=evaluate, summarize=summarize,
    describe="fixed prompts; generations of every model, shown side by side",
)
