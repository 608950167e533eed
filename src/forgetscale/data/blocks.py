"""Turning records into fixed-length token blocks: packed documents, or chat records with a loss mask."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import torch

from forgetscale.data.sources import record_where
from forgetscale.errors import DataError

IGNORE = -100
SYSTEM_FIELDS = ("system_prompt", "system")
QUESTION_FIELDS = ("question", "instruction", "prompt", "input")
RESPONSE_FIELDS = ("response", "output", "answer", "completion")


@dataclass
class Blocks:
    """A stack of equal-length sequences; labels are IGNORE where no loss is taken."""

    input_ids: torch.Tensor  # [n, L] int64
    labels: torch.Tensor  # [n, L] int64
    attention_mask: torch.Tensor  # [n, L] int64

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | list[int] | slice) -> Blocks:
        return Blocks(self.input_ids[index], self.labels[index], self.attention_mask[index])

    @property
    def loss_tokens(self) -> int:
        """Tokens that carry a loss (a label at position t+1 is predicted from position t)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def limit_tokens(self, budget: int) -> Blocks:
        """The first blocks whose loss tokens fit the budget (at least one block)."""
        counts = (self.labels[:, 1:] != IGNORE).sum(1).cumsum(0)
        n = max(1, int((counts <= budget).sum()))
        return self.select(slice(0, n))


def _field(record: dict[str, Any], explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    if explicit is not None:
        return explicit
    return next((c for c in candidates if c in record), None)


def detect_format(record: dict[str, Any], text_field: str, question_field: str | None, response_field: str | None) -> str:
    if "messages" in record:
        return "chat"
    if _field(record, question_field, QUESTION_FIELDS) and _field(record, response_field, RESPONSE_FIELDS):
        return "chat"
    if text_field in record:
        return "documents"
    raise DataError(
        f"cannot tell the data format from the fields {sorted(k for k in record if not k.startswith('_'))}; "
        f"set finetune.format and finetune.text_field / question_field / response_field"
    )


def document_texts(records: list[dict[str, Any]], text_field: str, source: str) -> list[str]:
    texts = []
    for i, record in enumerate(records):
        if text_field not in record:
            raise DataError(f"{record_where(source, record, i)}: missing field '{text_field}'; set the text field in the config")
        text = record[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{record_where(source, record, i)}: field '{text_field}' must be text; got {type(text).__name__}")
        if text.strip():
            texts.append(text)
    return texts


def separator_ids(tokenizer: Any, separator: str = "eos") -> list[int]:
    """What goes between two packed documents: the EOS token (a chat model's is its end-of-turn token), or
    a blank line as text (no special token inside prose)."""
    if separator == "blank_line":
        return list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])
    return [tokenizer.eos_token_id]


def block_start_ids(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer starts every text with it (Gemma), else nothing (SmolLM2, Llama 3 as packed here).

    Why: a model trained with BOS at every sequence start predicts poorly without it: Gemma 3 270M's
    perplexity on a Wikipedia paragraph is 26.3 with BOS and 97.8 without (docs/models.md)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def pack_documents(texts: list[str], tokenizer: Any, block_length: int, max_tokens: int | None = None,
                   separator: str = "eos") -> Blocks:
    """Tokenise, join with the separator (EOS by default), and cut into full blocks (the remainder is dropped);
    each block starts with BOS where the tokenizer adds one (`block_start_ids`)."""
    between = separator_ids(tokenizer, separator)
    start = block_start_ids(tokenizer)
    width = block_length - len(start)
    stream: list[int] = []
    limit = None if max_tokens is None else max_tokens + max_tokens // block_length + block_length
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.extend(between)
        if limit is not None and len(stream) >= limit:
            break
    n_blocks = len(stream) // width
    if max_tokens is not None:
        # max_tokens counts predicted tokens: block_length - 1 per block
        n_blocks = min(n_blocks, max(1, max_tokens // (block_length - 1)))
    if n_blocks == 0:
        raise DataError(f"the text holds {len(stream)} tokens, fewer than one block of {block_length}; add text or shorten the blocks")
    ids = torch.tensor(stream[: n_blocks * width], dtype=torch.long).view(n_blocks, width)
    if start:
        ids = torch.cat([torch.tensor(start, dtype=torch.long).expand(n_blocks, len(start)), ids], dim=1)
    return Blocks(ids, ids.clone(), torch.ones_like(ids))


_WIKITEXT_TITLE = re.compile(r"^ ?= [^=].* = ?$")
_WIKITEXT_HEADING = re.compile(r"^ ?(= )+.*( =)+ ?$")


def wikitext_articles(texts: list[str]) -> list[str] | None:
    """WikiText-style text (` = Title = ` lines; hub rows one line each, a .txt's blank-line paragraphs) as
    whole articles: a title starts one, section headings are dropped and paragraphs joined by newlines, as
    the embedded Wikipedia is built. None when no title line is present (the texts are left as they are)."""
    if not any(_WIKITEXT_TITLE.match(t.strip("\n")) for t in texts):
        return None
    articles: list[list[str]] = []
    for text in texts:
        for line in text.split("\n"):
            if _WIKITEXT_TITLE.match(line):
                articles.append([])
            elif line.strip() and not _WIKITEXT_HEADING.match(line):
                if not articles:
                    articles.append([])
                articles[-1].append(line.strip())
    return [joined for joined in ("\n".join(a) for a in articles) if joined]


@dataclass
class ChatStats:
    """What rendering chat records did that a user should know: records cut at the context length, dropped
    (nothing of the response left), given the chat template's default system prompt, cut at
    finetune.max_turns, and multi-turn records whose earlier replies carry no loss (a template that does not
    render a conversation's start as the start of the whole)."""

    records: int = 0
    truncated: int = 0
    dropped: int = 0
    default_system: int = 0
    turn_capped: int = 0
    last_reply_only: int = 0

    def notes(self, source: str, block_length: int, default_system: str | None) -> list[str]:
        out = []
        if self.turn_capped:
            out.append(f"{source}: {self.turn_capped} of {self.records} chat records are cut after "
                       "finetune.max_turns replies")
        if self.last_reply_only:
            out.append(f"{source}: in {self.last_reply_only} multi-turn chat records only the last reply carries "
                       "the loss: the chat template does not render a conversation's start as the start of the "
                       "whole conversation")
        if self.truncated:
            out.append(f"{source}: {self.truncated} of {self.records} chat records "
                       f"({100 * self.truncated / self.records:.0f}%) are cut at train.context_length={block_length} "
                       f"tokens ({self.dropped} dropped: no response token left); raise train.context_length to "
                       "keep them whole")
        if self.default_system and default_system:
            out.append(f"{source}: {self.default_system} chat records have no system prompt, so the chat template "
                       f"inserts its default one ({default_system[:60]!r}); set finetune.template_system_prompt: "
                       "false to keep it out")
        return out


def template_default_system(tokenizer: Any) -> str | None:
    """The system prompt the chat template inserts when a conversation has none (SmolLM2: 'You are a helpful
    AI assistant named SmolLM, ...'); None when it inserts nothing."""
    probe = [{"role": "user", "content": "\x00"}]
    try:
        bare = tokenizer.apply_chat_template(probe, tokenize=False)
        empty = tokenizer.apply_chat_template([{"role": "system", "content": ""}, *probe], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses a system turn inserts nothing of its own
        return None
    if bare == empty or "system" not in bare.split("\x00")[0]:
        return None
    head = bare.split("\x00")[0]
    prefix = empty.split("\x00")[0]
    # the inserted text: what the bare rendering holds beyond the empty system turn's rendering
    start = next((i for i, (a, b) in enumerate(zip(head, prefix, strict=False)) if a != b), min(len(head), len(prefix)))
    extra = head[start:]
    tail = prefix[start:]
    if tail and extra.endswith(tail):
        extra = extra[: len(extra) - len(tail)]
    return extra.strip() or None


def chat_messages(record: dict[str, Any], fields: tuple[str | None, str | None, str | None], where: str) -> tuple[list, list]:
    """(prompt messages, full messages) of one chat record: the prompt is everything before the last reply."""
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages)
                or messages[-1].get("role") != "assistant"):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} turns ending with an "
                            "assistant turn")
        return messages[:-1], messages
    system_f, question_f, response_f = fields
    question, response = record.get(question_f), record.get(response_f)
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing or empty '{question_f}'; every chat record needs a question")
    if not isinstance(response, str) or not response.strip():
        raise DataError(f"{where}: missing or empty '{response_f}'; every chat record needs a response")
    prompt = []
    system = record.get(system_f) if system_f else None
    if isinstance(system, str) and system.strip():
        prompt.append({"role": "system", "content": system})
    prompt.append({"role": "user", "content": question})
    return prompt, [*prompt, {"role": "assistant", "content": response}]


def cap_turns(messages: list[dict[str, Any]], max_turns: int) -> list[dict[str, Any]]:
    """The conversation up to its `max_turns`-th assistant reply."""
    seen = 0
    for k, message in enumerate(messages):
        seen += message.get("role") == "assistant"
        if seen == max_turns:
            return messages[: k + 1]
    return messages


def render_chat(
    records: list[dict[str, Any]], tokenizer: Any, block_length: int, *, source: str,
    fields: tuple[str | None, str | None, str | None], loss_on: str, template_system_prompt: bool = True,
    stats: ChatStats | None = None, max_turns: int | None = None,
) -> Blocks:
    """One block per record: chat template, truncated/padded to block_length, loss on the reply (loss_on
    "response"; a multi-turn `messages` record: its last reply), on every assistant turn ("responses"; cut
    after `max_turns` replies when given) or on every token ("all"). A record
    with no system prompt gets the template's default one unless `template_system_prompt` is false (then an
    empty system turn). `stats` counts what was cut, dropped and defaulted."""
    stats = stats if stats is not None else ChatStats()
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{source}: chat data needs a tokenizer with a chat template; this model has none (use format: documents)")
    pad = tokenizer.pad_token_id
    rows_ids, rows_labels, rows_mask = [], [], []
    for i, record in enumerate(records):
        where = record_where(source, record, i)
        resolved = (
            _field(record, fields[0], SYSTEM_FIELDS),
            _field(record, fields[1], QUESTION_FIELDS) or QUESTION_FIELDS[0],
            _field(record, fields[2], RESPONSE_FIELDS) or RESPONSE_FIELDS[0],
        )
        prompt, full = chat_messages(record, resolved, where)
        stats.records += 1
        if max_turns is not None:
            capped = cap_turns(full, max_turns)
            if len(capped) < len(full):
                stats.turn_capped += 1
                prompt, full = capped[:-1], capped
        if not any(m.get("role") == "system" for m in full):
            if template_system_prompt:
                stats.default_system += 1
            else:
                prompt, full = [{"role": "system", "content": ""}, *prompt], [{"role": "system", "content": ""}, *full]
        prompt_ids = _template_ids(tokenizer, prompt, add_generation_prompt=True)
        full_ids = _template_ids(tokenizer, full, add_generation_prompt=False)
        labels = list(full_ids)
        if loss_on in ("response", "responses"):
            n_prompt = min(len(prompt_ids), len(full_ids))
            labels[:n_prompt] = [IGNORE] * n_prompt
            if loss_on == "responses" and not _earlier_replies(tokenizer, full, full_ids, labels, block_length):
                stats.last_reply_only += 1
        stats.truncated += len(full_ids) > block_length
        full_ids, labels = full_ids[:block_length], labels[:block_length]
        if all(label == IGNORE for label in labels[1:]):
            stats.dropped += 1
            continue  # the response was cut off entirely: nothing to learn from this record
        padding = block_length - len(full_ids)
        rows_ids.append(full_ids + [pad] * padding)
        rows_labels.append(labels + [IGNORE] * padding)
        rows_mask.append([1] * len(full_ids) + [0] * padding)
    if not rows_ids:
        raise DataError(f"{source}: no chat record has response tokens within {block_length} tokens; raise train.context_length")
    return Blocks(torch.tensor(rows_ids), torch.tensor(rows_labels), torch.tensor(rows_mask))


def _earlier_replies(tokenizer: Any, messages: list, full_ids: list[int], labels: list[int], within: int) -> bool:
    """Give the loss to every assistant turn before the last one that starts within the first `within` tokens
    (the block; what lies beyond is cut anyway): a reply spans from the end of the rendering of the turns
    before it with the generation prompt to the end of the rendering up to and including it. A reply before
    the first user turn answers nothing and stays context. False (labels untouched) when a rendering is
    not the start of the whole conversation's: the template renders a turn differently once more follow,
    so no span can be trusted."""
    spans, asked = [], False
    for k, message in enumerate(messages[:-1]):
        asked = asked or message.get("role") == "user"
        if not asked or message.get("role") != "assistant":
            continue
        before = _template_ids(tokenizer, messages[:k], add_generation_prompt=True)
        if len(before) >= within:
            break
        upto = _template_ids(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if full_ids[: len(before)] != before or full_ids[: len(upto)] != upto:
            return False
        spans.append((len(before), len(upto)))
    for start, end in spans:
        labels[start:end] = full_ids[start:end]
    return True


def _template_ids(tokenizer: Any, messages: list, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def split_heldout(records: list[Any], fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """A fixed held-out part (the same for every run and seed of a sweep: split seed is 0 unless given)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(fraction * len(records)))
    if len(records) - n_held < 1:
        raise DataError(f"the dataset has {len(records)} record(s); need at least 2 to hold some out")
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [records[i] for i in train], [records[i] for i in held]
