"""Multiple choice (reasoning and knowledge), scored two ways, always named in the output:

- `loglik`: the option whose text is most likely after "Question: ...\\nAnswer:" (summed log-prob of
  " <option>", the lm-evaluation-harness convention for ARC); never unparseable.
- `generate`: the question and lettered options in the chat template, a greedy reply, and the
  answer letter parsed from it (the paper's setting). A reply with no parseable letter is wrong and
  counted as `unparsed`.

Per model: accuracy against gold and, the paper's point, agreement with the base model's answers.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from forgetscale.evals.suites import SuiteSettings, paired_rows, rate, register_suite

if TYPE_CHECKING:
    from forgetscale.evals.choice_set import ChoiceItem
    from forgetscale.evals.suites import Target

INSTRUCTION = "Answer with the letter of the correct option only."


class ChoiceSettings(SuiteSettings):
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


def load(settings: Any, cache_dir: Any) -> list[ChoiceItem]:
    from forgetscale.evals.items import choice_items

    return choice_items(settings.source, config=settings.config, split=settings.split, limit=settings.limit,
                        cache_dir=cache_dir)


def question_text(item: ChoiceItem) -> str:
    options = "\n".join(f"{label}. {text}" for label, text in zip(item.labels, item.options, strict=True))
    return f"{item.question}\n\n{options}\n\n{INSTRUCTION}"


def parse_answer(reply: str, item: ChoiceItem) -> str | None:
    """The label a reply picks: a label opening the reply ('B', 'B.', '(B)', 'B) ...'), then 'answer is B'
    / 'Answer: B', then a reply that starts with exactly one option's text. None: unparseable."""
    labels = "|".join(re.escape(label) for label in sorted(item.labels, key=len, reverse=True))
    text = reply.strip()
    # a label then punctuation or the end: "A capital city ..." is the article, not option A
    m = re.match(rf"^\**\(?({labels})\)?\**(?:[.):,]|\s*$|\s*\n)", text)
    if m is None:
        m = re.search(rf"\banswer(?: is)?\s*[:\-]?\s*\**\(?({labels})\)?\**(?![\w])", text, flags=re.IGNORECASE)
    if m is not None:
        return m.group(1)
    lowered = text.lower()
    starts = [label for label, option in zip(item.labels, item.options, strict=True)
              if lowered.startswith(option.lower())]
    return starts[0] if len(starts) == 1 else None


def evaluate(target: Target, items: list[ChoiceItem], settings: Any) -> list[dict[str, Any]]:
    from forgetscale.evals.generation import chat_prompt, generate, option_logprobs

    rows: list[dict[str, Any]] = []
    tok = target.tokenizer
    if "loglik" in settings.protocols:
        contexts, continuations, owners = [], [], []
        for n, item in enumerate(items):
            context = list(tok(f"Question: {item.question}\nAnswer:", add_special_tokens=True)["input_ids"])
            for option in item.options:
                contexts.append(context)
                continuations.append(list(tok(f" {option}", add_special_tokens=False)["input_ids"]))
                owners.append(n)
        scores = option_logprobs(target.model, tok, contexts, continuations, batch_size=target.batch_size * 2,
                                 device=target.device, dtype=target.dtype)
        per_item: list[list[float]] = [[] for _ in items]
        for owner, score in zip(owners, scores, strict=True):
            per_item[owner].append(score)
        for item, item_scores in zip(items, per_item, strict=True):
            best = max(range(len(item_scores)), key=lambda i: (item_scores[i], -i))
            pred = item.labels[best]
            rows.append(_row("loglik", item, f"Question: {item.question}\nAnswer:",
                             json.dumps(dict(zip(item.labels, [round(s, 6) for s in item_scores], strict=True))), pred))
        if target.on_items:
            target.on_items(len(items))
    if "generate" in settings.protocols:
        prompts = [chat_prompt(tok, question_text(item)) for item in items]
        replies = generate(target.model, tok, prompts, max_new_tokens=settings.max_new_tokens,
                           batch_size=target.batch_size, device=target.device, dtype=target.dtype,
                           on_batch=target.on_items)
        for item, reply in zip(items, replies, strict=True):
            rows.append(_row("generate", item, question_text(item), reply, parse_answer(reply, item)))
    return rows


def _row(protocol: str, item: ChoiceItem, prompt: str, output: str, pred: str | None) -> dict[str, Any]:
    return {"protocol": protocol, "item_id": item.item_id, "prompt": prompt, "output": output, "prediction": pred,
            "gold": item.answer, "correct": int(pred == item.answer), "extra": {"category": item.category}}


def summarize(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]] | None, settings: Any) -> list[dict[str, Any]]:
    out = []
    for protocol in settings.protocols:
        mine, base = paired_rows(rows, base_rows, protocol)
        if not mine:
            continue
        correct = [bool(r["correct"]) for r in mine]
        out.append(rate("accuracy", protocol, correct, None if base is None else [bool(r["correct"]) for r in base]))
        if protocol == "generate":
            out.append(rate("unparsed", protocol, [r["prediction"] is None for r in mine], None))
        if base is not None:
            agree = [r["prediction"] is not None and r["prediction"] == b["prediction"]
                     for r, b in zip(mine, base, strict=True)]
            out.append(rate("agreement_with_base", protocol, agree, None))
    return out


register_suite(
    "choice", ChoiceSettings, "multiple-choice knowledge and reasoning",
    title="Reasoning and knowledge: multiple choice", load=load, evaluate=evaluate, summarize=summarize,
    describe="ARC-format questions; accuracy against gold and agreement with the base model, per protocol",
)
