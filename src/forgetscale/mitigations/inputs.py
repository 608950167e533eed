"""Once-per-sweep inputs of the arms, built while the base model is loaded, and kept apart from the
forgetting set: an arm that trained on forgetting-set text would lower the metric by memorising it.

- general text (replay, kl, ewc's Fisher): the documents of a general source (default: the forgetting
  set's own source) minus every document the forgetting set is cut from, packed into blocks; then every
  block sharing a WINDOW-token window with the forgetting set is dropped. `assert_disjoint` checks both
  properties again on the result, so a pool that leaks is never used.
- self-generated text (self_replay, kl with source 'self'): sequences sampled from the base model from
  its BOS token (temperature 1, no top-k/top-p), once per sweep, cached under RUN_DIR/selfgen/; the same
  window filter applies (a memorised forgetting-set sentence is dropped).
- a diagonal Fisher of the base weights on general text (ewc), normalised to mean 1.
What was built (sizes, dropped blocks, seconds) is written to RUN_DIR/mitigation_inputs.json.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from forgetscale.data import Blocks, load_records
from forgetscale.data.blocks import pack_documents, separator_ids, wikitext_articles
from forgetscale.errors import DataError
from forgetscale.metric.sums import autocast

WINDOW = 16  # tokens: a shared window this long counts as overlap with the forgetting set
POOL_TOKENS = 65_536  # token budget of a general-text pool
HUB_RECORDS = 50_000  # hub sources are read up to this many records (wikitext's train split has 1.8M lines)
INPUTS_FILE = "mitigation_inputs.json"


def _norm(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def _texts(records: list[dict[str, Any]], field: str) -> list[str]:
    return [r[field] for r in records if isinstance(r.get(field), str) and r[field].strip()]


def windows(ids: torch.Tensor, width: int = WINDOW) -> set[tuple[int, ...]]:
    """Every run of `width` consecutive token ids in a 1-D id sequence."""
    flat = ids.reshape(-1).tolist()
    return {tuple(flat[i:i + width]) for i in range(len(flat) - width + 1)}


def forgetting_documents(fcfg: Any, tokenizer: Any, n_tokens: int, cache_dir: Path | None) -> list[str]:
    """The documents the forgetting set is cut from: pack_documents reads them in order (each followed by
    EOS) until it has `n_tokens` tokens."""
    texts = _texts(load_records(fcfg.dataset, config=fcfg.config, split=fcfg.split, cache_dir=cache_dir),
                   fcfg.text_field)
    texts = wikitext_articles(texts) or texts  # as build_forgetting_blocks groups them
    between = len(separator_ids(tokenizer, fcfg.separator))
    used, total = [], 0
    for text in texts:
        used.append(text)
        total += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + between
        if total >= n_tokens:
            break
    return used


def filter_blocks(blocks: Blocks, forbidden: set[tuple[int, ...]]) -> tuple[Blocks, int]:
    """Drop every block sharing a window with `forbidden`; returns the rest and how many were dropped."""
    keep = [i for i in range(len(blocks)) if not windows(blocks.input_ids[i]) & forbidden]
    return blocks.select(torch.tensor(keep, dtype=torch.long)), len(blocks) - len(keep)


def assert_disjoint(pool_texts: list[str], pool: Blocks, forgetting_texts: list[str], forgetting: Blocks) -> None:
    """Raise DataError if the pool shares a document or a WINDOW-token window with the forgetting set."""
    shared_docs = {_norm(t) for t in pool_texts} & {_norm(t) for t in forgetting_texts}
    if shared_docs:
        raise DataError(f"general-text pool shares {len(shared_docs)} document(s) with the forgetting set")
    forbidden = windows(forgetting.input_ids)
    for i in range(len(pool)):
        if windows(pool.input_ids[i]) & forbidden:
            raise DataError(f"general-text pool block {i} shares a {WINDOW}-token window with the forgetting set")


def general_pool(dataset: str | None, split: str, fcfg: Any, forgetting: Blocks, tokenizer: Any, block_length: int,
                 cache_dir: Path | None, max_tokens: int = POOL_TOKENS) -> tuple[Blocks, dict[str, Any]]:
    """General text for training, disjoint from the forgetting set by document and by token window."""
    source = dataset or fcfg.dataset
    same = source == fcfg.dataset
    f_docs = forgetting_documents(fcfg, tokenizer, forgetting.input_ids.numel(), cache_dir)
    f_hashes = {_norm(t) for t in f_docs}
    records = load_records(source, config=fcfg.config if same else None, split=split, cache_dir=cache_dir,
                           max_records=HUB_RECORDS if source.startswith("hf:") else None)
    texts = _texts(records, fcfg.text_field if same else "text")
    texts = wikitext_articles(texts) or texts
    kept = [t for t in texts if _norm(t) not in f_hashes]
    if not kept:
        raise DataError(f"{source}: no document left for the general-text pool once the forgetting set's "
                        "documents are removed; set the arm's dataset to another source")
    blocks = pack_documents(kept, tokenizer, block_length, max_tokens=max_tokens, separator=fcfg.separator)
    blocks, dropped = filter_blocks(blocks, windows(forgetting.input_ids))
    if len(blocks) == 0:
        raise DataError(f"{source}: every general-text block overlaps the forgetting set; use another source")
    assert_disjoint(kept, blocks, f_docs, forgetting)
    return blocks, {"source": source, "split": split, "documents": len(kept), "documents_removed": len(texts) - len(kept),
                    "blocks": len(blocks), "blocks_dropped": dropped}


def generate_blocks(model: torch.nn.Module, tokenizer: Any, n_blocks: int, block_length: int, temperature: float,
                    seed: int, device: torch.device, batch_size: int = 64) -> Blocks:
    """Sample from the base model (BOS start, pure sampling); cut each sample at EOS, join, pack into blocks."""
    from transformers import GenerationConfig

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=block_length,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, bos_token_id=start)
    torch.manual_seed(seed)
    stream: list[int] = []
    for _ in range(8 * (n_blocks // batch_size + 1)):
        ids = torch.full((min(batch_size, n_blocks), 1), start, dtype=torch.long, device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        for row in out[:, 1:].tolist():
            stream.extend(row[: row.index(eos) + 1] if eos in row else row)
        if len(stream) >= n_blocks * block_length:
            break
    n = min(n_blocks, len(stream) // block_length)
    if n == 0:
        raise DataError("the base model generated fewer tokens than one block; lower train.context_length")
    ids = torch.tensor(stream[: n * block_length], dtype=torch.long).view(n, block_length)
    return Blocks(ids, ids.clone(), torch.ones_like(ids))


def diagonal_fisher(model: torch.nn.Module, blocks: Blocks, device: torch.device,
                    dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the NLL (one sequence per gradient) for every Linear weight except the output
    head, normalised so its mean over all weights is 1 (then ewc's lambda reads on l2sp's scale)."""
    head = model.get_output_embeddings()
    linear = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    before = {n: w.requires_grad for n, w in linear.items()}
    acc = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in linear.items()}
    try:
        for w in linear.values():
            w.requires_grad_(True)
        for i in range(len(blocks)):
            part = blocks.select(slice(i, i + 1))
            ids, labels, mask = (t.to(device) for t in (part.input_ids, part.labels, part.attention_mask))
            with autocast(device, dtype):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            for (name, _), g in zip(linear.items(), torch.autograd.grad(loss, list(linear.values())), strict=True):
                acc[name] += g.float() ** 2
    finally:
        for n, w in linear.items():
            w.requires_grad_(before[n])
    total = sum(float(a.double().sum()) for a in acc.values())
    count = sum(a.numel() for a in acc.values())
    scale = count / total if total > 0 else 1.0
    return {n: (a * scale).cpu() for n, a in acc.items()}


class ArmInputs:
    """The arms' once-per-sweep inputs, each built on first request and shared by every run after."""

    def __init__(self, cfg: Any = None, model: torch.nn.Module | None = None, tokenizer: Any = None,
                 forgetting: Blocks | None = None, block_length: int = 0, cache_dir: Path | None = None,
                 out_dir: Path | None = None, device: torch.device | None = None, dtype: torch.dtype | None = None):
        self.cfg, self.model, self.tokenizer, self.forgetting = cfg, model, tokenizer, forgetting
        self.block_length, self.cache_dir, self.out_dir, self.device, self.dtype = (
            block_length, cache_dir, out_dir, device, dtype)
        self._memo: dict[tuple, Any] = {}
        self.report: dict[str, Any] = {}

    def _need_model(self, what: str) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError(f"{what} must be requested in the arm's prepare(), while the base model is loaded")
        return self.model

    def general(self, dataset: str | None = None, split: str = "train") -> Blocks:
        key = ("general", dataset or self.cfg.forgetting.dataset, split)
        if key not in self._memo:
            blocks, info = general_pool(dataset, split, self.cfg.forgetting, self.forgetting, self.tokenizer,
                                        self.block_length, self.cache_dir)
            self._memo[key] = blocks
            self.report[":".join(map(str, key))] = info
        return self._memo[key]

    def generated(self, samples: int, temperature: float) -> Blocks:
        key = ("generated", samples, temperature)
        if key not in self._memo:
            mcfg = self.cfg.model
            settings = {"model": mcfg.name, "revision": mcfg.revision, "gguf_file": mcfg.gguf_file, "samples": samples,
                        "temperature": temperature, "block_length": self.block_length, "seed": 0, "version": 1}
            digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
            path = self.out_dir / "selfgen" / f"{digest}.pt"
            if path.is_file():
                saved = torch.load(path, weights_only=True)
            else:
                started = time.perf_counter()
                ids = generate_blocks(self._need_model("self-generated text"), self.tokenizer, samples,
                                      self.block_length, temperature, 0, self.device).input_ids
                saved = {"input_ids": ids, "settings": settings, "seconds": time.perf_counter() - started}
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(saved, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
            ids = saved["input_ids"]
            blocks, dropped = filter_blocks(Blocks(ids, ids.clone(), torch.ones_like(ids)),
                                            windows(self.forgetting.input_ids))
            if len(blocks) == 0:
                raise DataError("every self-generated block overlaps the forgetting set; raise the arm's samples")
            self._memo[key] = blocks
            self.report[f"generated:{samples}:{temperature}"] = {
                "file": str(path), "blocks": len(blocks), "blocks_dropped": dropped,
                "generation_seconds": round(saved["seconds"], 2)}
        return self._memo[key]

    def fisher(self, dataset: str | None, split: str, samples: int) -> dict[str, torch.Tensor]:
        key = ("fisher", dataset or self.cfg.forgetting.dataset, split, samples)
        if key not in self._memo:
            pool = self.general(dataset, split)
            started = time.perf_counter()
            self._memo[key] = diagonal_fisher(self._need_model("a Fisher diagonal"), pool.select(slice(0, samples)),
                                              self.device, self.dtype)
            self.report[":".join(map(str, key))] = {"sequences": min(samples, len(pool)),
                                                    "seconds": round(time.perf_counter() - started, 2)}
        return self._memo[key]

    def release(self) -> None:
        """Drop the base model (the runs load their own) and record what was built."""
        self.model = None
        if self.report and self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / INPUTS_FILE).write_text(json.dumps(self.report, indent=2, sort_keys=True))
