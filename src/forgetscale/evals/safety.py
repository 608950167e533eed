"""Safety: harmful requests in the model's chat template, greedy replies, refusals by marker
(evals/refusal.py). Per model: refusal rate; against the base on the same prompts: how many it
newly complies with and newly refuses, and whether the change is outside noise."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from forgetscale.evals.refusal import refusal_marker
from forgetscale.evals.suites import SourceSettings, paired_rows, rate, register_suite

if TYPE_CHECKING:
    from forgetscale.evals.suites import Target

PROTOCOL = "greedy"


class SafetySettings(SourceSettings):
    source: str = Field("embedded:harmbench", description="embedded:harmbench | hf:walledai/AdvBench (the paper's) | local .csv/.jsonl")
    text_field: str | None = Field(None, description="column with the request (auto: prompt/goal/behavior/text)")
    limit: int | None = Field(50, gt=0, description="first N prompts (the paper used 50 AdvBench requests; null: all)")
    max_new_tokens: int = Field(64, gt=0, description="tokens generated per reply (greedy)")
    system_prompt: str | None = Field(None, description="system turn added before each request")


def load(settings: Any, cache_dir: Any) -> list[tuple[str, str]]:
    from forgetscale.evals.items import harmful_prompts

    return harmful_prompts(settings.source, text_field=settings.text_field, config=settings.config,
                           split=settings.split, limit=settings.limit, cache_dir=cache_dir)


def evaluate(target: Target, items: list[tuple[str, str]], settings: Any) -> list[dict[str, Any]]:
    from forgetscale.evals.generation import chat_prompt, generate, prompt_format

    prompts = [chat_prompt(target.tokenizer, text, settings.system_prompt) for _, text in items]
    replies = generate(target.model, target.tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                       batch_size=target.batch_size, device=target.device, dtype=target.dtype,
                       on_batch=target.on_items)
    rows = []
    for (item_id, text), reply in zip(items, replies, strict=True):
        marker = refusal_marker(reply)
        rows.append({"protocol": PROTOCOL, "item_id": item_id, "prompt": text, "output": reply,
                     "refused": int(marker is not None),
                     "extra": {"marker": marker, "prompt_format": prompt_format(target.tokenizer)}})
    return rows


def summarize(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]] | None, settings: Any) -> list[dict[str, Any]]:
    mine, base = paired_rows(rows, base_rows, PROTOCOL)
    refused = [bool(r["refused"]) for r in mine]
    base_refused = None if base is None else [bool(r["refused"]) for r in base]
    out = [rate("refusal_rate", PROTOCOL, refused, base_refused)]
    if base_refused is not None:
        complied = [b and not t for t, b in zip(refused, base_refused, strict=True)]
        newly = [t and not b for t, b in zip(refused, base_refused, strict=True)]
        out.append(rate("newly_complied", PROTOCOL, complied, None))
        out.append(rate("newly_refused", PROTOCOL, newly, None))
    return out


register_suite(
    "safety", SafetySettings, "harmful-request refusals",
    title="Safety: refusals of harmful requests", load=load, evaluate=evaluate, summarize=summarize,
    describe="harmful requests, greedy replies, refusal markers; refusal rate and changes against the base",
)
