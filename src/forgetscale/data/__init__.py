"""Fine-tuning data and the forgetting set, as fixed token blocks built once per sweep."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgetscale.data.blocks import (
    Blocks,
    ChatStats,
    detect_format,
    document_texts,
    pack_documents,
    render_chat,
    split_heldout,
    template_default_system,
    wikitext_articles,
)
from forgetscale.data.language import english_record
from forgetscale.data.sources import ENGLISH_BY_DEFAULT, load_records
from forgetscale.errors import DataError

__all__ = ["Blocks", "FinetuneData", "build_finetune_data", "build_forgetting_blocks", "batch_indices", "load_records"]


@dataclass
class FinetuneData:
    train: Blocks
    heldout: Blocks  # capped at finetune.heldout_max_tokens
    train_probe: Blocks  # a fixed sample of training blocks of the same size, for ft_loss_train
    format: str
    notes: list[str] = field(default_factory=list)  # what a user should be told (truncation, default prompts)


def build_finetune_data(cfg: Any, tokenizer: Any, context_length: int, cache_dir: Path | None) -> FinetuneData:
    """Records (English ones only under finetune.language: en) -> held-out split (by record, fixed across
    seeds) -> blocks."""
    notes: list[str] = []
    english = cfg.language == "en" or (cfg.language == "auto" and cfg.dataset in ENGLISH_BY_DEFAULT)
    records = load_records(cfg.dataset, config=cfg.config, split=cfg.split, cache_dir=cache_dir,
                           max_records=None if english else cfg.max_examples, notes=notes)
    if english:
        kept = [r for r in records if english_record(r)]
        if not kept:
            raise DataError(f"{cfg.dataset}: no record looks English; set finetune.language: any to keep them all")
        if len(kept) < len(records):
            notes.append(f"{cfg.dataset}: {len(kept):,} of {len(records):,} records kept as English "
                         f"(finetune.language: {cfg.language}); language: any keeps them all")
        records = kept[: cfg.max_examples]
    fmt = cfg.format
    if fmt == "auto":
        fmt = detect_format(records[0], cfg.text_field, cfg.question_field, cfg.response_field)
    train_records, held_records = split_heldout(records, cfg.heldout_fraction)
    stats = ChatStats()

    def to_blocks(part: list[dict[str, Any]]) -> Blocks:
        if fmt == "documents":
            texts = document_texts(part, cfg.text_field, cfg.dataset)
            return pack_documents(wikitext_articles(texts) or texts, tokenizer, context_length,
                                  separator=cfg.separator)
        return render_chat(
            part, tokenizer, context_length, source=cfg.dataset,
            fields=(cfg.system_field, cfg.question_field, cfg.response_field), loss_on=chat_loss(cfg),
            template_system_prompt=cfg.template_system_prompt, stats=stats, max_turns=cfg.max_turns,
        )

    train, heldout = to_blocks(train_records), to_blocks(held_records).limit_tokens(cfg.heldout_max_tokens)
    if fmt == "chat":
        notes += stats.notes(cfg.dataset, context_length, template_default_system(tokenizer))
    # a seed no training permutation uses, so the probe is not simply the first batches
    probe_index = torch.randperm(len(train), generator=torch.Generator().manual_seed(2**31 - 1))[: len(heldout)]
    return FinetuneData(train=train, heldout=heldout, train_probe=train.select(probe_index.sort().values), format=fmt,
                        notes=notes)


def chat_loss(cfg: Any) -> str:
    """finetune.loss_on as rendering reads it: embedded:sharegpt's conversations take the loss on every reply
    (`responses`) unless another choice is made; elsewhere `response` stays the last reply, as it always was,
    so a sweep's rows and run ids do not change."""
    return "responses" if cfg.loss_on == "response" and cfg.dataset == "embedded:sharegpt" else cfg.loss_on


def build_forgetting_blocks(cfg: Any, tokenizer: Any, block_length: int, cache_dir: Path | None) -> Blocks:
    """The general-text set: the first `max_tokens` predicted tokens, in blocks; identical for every run.
    Built alike from every source: WikiText-style lines (hub rows, a .txt) are grouped into whole articles
    with headings dropped, as the embedded Wikipedia is."""
    records = load_records(cfg.dataset, config=cfg.config, split=cfg.split, cache_dir=cache_dir)
    texts = []
    for record in records:
        text = record.get(cfg.text_field)
        if isinstance(text, str) and text.strip():
            texts.append(text)
    if not texts:
        raise DataError(f"{cfg.dataset}: no text in field '{cfg.text_field}'; set forgetting.text_field")
    return pack_documents(wikitext_articles(texts) or texts, tokenizer, block_length, max_tokens=cfg.max_tokens,
                          separator=cfg.separator)


def batch_indices(step: int, batch_size: int, n_blocks: int, seed: int) -> torch.Tensor:
    """Blocks of update step `step` (0-based): a pure function of (step, seed), so resuming needs no loader state.

    Blocks are visited in a fresh seeded permutation each epoch.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_blocks)
        perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), n_blocks - offset)
        out.extend(perm[offset : offset + take].tolist())
    return torch.tensor(out, dtype=torch.long)
