"""Batched generation and batched option scoring: the two model calls every suite is built from.

Prompts are sorted by length and batched with left padding, so each batch decodes together with
the KV cache; results come back in the caller's order. Greedy decoding is deterministic for a given
model, prompt list and batch size; sampling happens only when asked, from a seeded generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from forgetscale.metric.sums import autocast

Messages = list[dict[str, str]]


PLAIN_PROMPT = "Question: {user}\nAnswer:"  # a base model's prompt (no chat template); choice's loglik form too


def prompt_format(tokenizer: Any) -> str:
    """'chat' (the tokenizer's chat template) or 'plain' (PLAIN_PROMPT): stored with every generated reply."""
    return "plain" if getattr(tokenizer, "chat_template", None) is None else "chat"


def chat_prompt(tokenizer: Any, user: str, system: str | None = None) -> list[int]:
    """Token ids of one user turn in the model's chat template, ending where the assistant speaks. A base
    model without one (Gemma 3 270M) gets PLAIN_PROMPT, with BOS where its tokenizer adds it, never a
    template it was not trained on; `prompt_format` says which, and `forgetscale eval` prints it."""
    if prompt_format(tokenizer) == "plain":
        text = (f"{system}\n\n" if system else "") + PLAIN_PROMPT.format(user=user)
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    messages: Messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


@contextlib.contextmanager
def contiguous_head_input(model: torch.nn.Module) -> Iterator[None]:
    """The output head fed a contiguous copy of its input while the block runs.

    Why: transformers slices the last positions before the head (`logits_to_keep`: generation's prefill,
    option scoring), a non-contiguous 3-D view, and PyTorch (2.13, seen on CPU) runs `linear` on such a view
    against a weight that needs no gradient (a frozen or PEFT-wrapped base) as a batched matmul over one copy
    of the whole weight per row: 2.8 GB and ~4 s for SmolLM2's head at batch 50, against ~10 ms on a
    contiguous input (`benchmarks/bench_generate.py`). Copying the sliced input costs nothing."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]) if args else None)
    try:
        yield
    finally:
        handle.remove()


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), for little padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[list[int]], *, max_new_tokens: int = 64,
    batch_size: int = 16, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    sample: bool = False, temperature: float = 1.0, seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Completions of tokenised prompts (decoded, special tokens dropped), in the prompts' order."""
    device = torch.device(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _stop_ids(tokenizer)
    outputs: list[str] = [""] * len(prompts)
    model.eval()
    for batch in _length_batches([len(p) for p in prompts], batch_size):
        ids, mask = _left_pad([list(prompts[i]) for i in batch], pad_id)
        kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id,
                                  "eos_token_id": eos}
        if sample:
            # one seed per batch: a given prompt list and batch size always draws the same text
            torch.manual_seed(seed * 1_000_003 + batch[0])
            kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with autocast(device, dtype), contiguous_head_input(model):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = out[:, ids.shape[1]:].cpu()
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(len(batch))
    return outputs


def _stop_ids(tokenizer: Any) -> list[int]:
    """End-of-turn ids: the chat template's end marker as well as eos, so answers stop at the turn's end."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


@torch.no_grad()
def option_logprobs(
    model: torch.nn.Module, tokenizer: Any, contexts: Sequence[list[int]], continuations: Sequence[list[int]], *,
    batch_size: int = 16, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None, share_context: bool = True,
) -> list[float]:
    """Sum of log p(continuation | context) for each pair, batched (the lm-evaluation-harness convention).

    Pairs that share a context (a question's options) are scored with the context run once and its KV
    cache reused for every option (`share_context`); otherwise each pair is one full sequence."""
    device = torch.device(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    # shared scoring needs every continuation to have a first token (an empty one scores 0 either way)
    if share_context and all(continuations) and len({tuple(c) for c in contexts}) < len(contexts):
        shared = _shared_context_logprobs(model, contexts, continuations, batch_size, device, dtype, pad_id, on_batch)
        if shared is not None:
            return shared
    rows = [list(c) + list(x) for c, x in zip(contexts, continuations, strict=True)]
    scores = [0.0] * len(rows)
    model.eval()
    for batch in _length_batches([len(r) for r in rows], batch_size):
        ids, mask = _left_pad([rows[i] for i in batch], pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # left padding puts every continuation at the right edge: the output head only needs the last
        # `keep` positions (the vocabulary projection is a large share of a short sequence's cost)
        keep = max(len(continuations[i]) for i in batch) + 1
        with autocast(device, dtype), contiguous_head_input(model):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        width = ids.shape[1]
        for row, i in enumerate(batch):
            n = len(continuations[i])
            targets = ids[row, width - n:]
            # the token at position t is predicted by the logits at t - 1 (logp holds the last `keep`)
            picked = logp[row, keep - n - 1:keep - 1].gather(-1, targets[:, None])
            scores[i] = float(picked.sum())
        if on_batch is not None:
            on_batch(len(batch))
    return scores


@torch.no_grad()
def _shared_context_logprobs(
    model: torch.nn.Module, contexts: Sequence[list[int]], continuations: Sequence[list[int]], batch_size: int,
    device: torch.device, dtype: torch.dtype | None, pad_id: int, on_batch: Callable[[int], None] | None,
) -> list[float] | None:
    """option_logprobs with each distinct context encoded once: its last logits score every option's first
    token and its KV cache, repeated per option, is the prefix the options' remaining tokens are run on.
    An item's context is usually ~10x its options, so this does a fraction of the work. None when the
    model's cache cannot be reordered by batch row (the caller then scores full sequences)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, context in enumerate(contexts):
        groups.setdefault(tuple(context), []).append(i)
    keys = list(groups)
    per_batch = max(1, batch_size // max(1, round(len(contexts) / len(keys))))  # ~batch_size option rows per batch
    scores = [0.0] * len(contexts)
    model.eval()
    for batch in _length_batches([len(k) for k in keys], per_batch):
        ids, mask = _left_pad([list(keys[g]) for g in batch], pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with autocast(device, dtype), contiguous_head_input(model):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                        use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        if not callable(getattr(cache, "batch_select_indices", None)):
            return None
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()  # predicts each option's first token
        pairs = [(row, i) for row, g in enumerate(batch) for i in groups[keys[g]]]
        rest = [list(continuations[i])[:-1] for _, i in pairs]  # inputs that predict tokens 1..n-1
        for row, i in pairs:
            scores[i] = float(first[row, continuations[i][0]])
        width = max(len(r) for r in rest)
        if width:
            # the options' later tokens, right-padded after the shared prefix (padding sits after every real
            # token, so causal attention keeps it out of the scores)
            source = torch.tensor([row for row, _ in pairs])
            cache.batch_select_indices(source.to(device))
            tail = torch.full((len(pairs), width), pad_id, dtype=torch.long)
            tail_mask = torch.zeros((len(pairs), width), dtype=torch.long)
            for r, tokens in enumerate(rest):
                if tokens:
                    tail[r, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                    tail_mask[r, :len(tokens)] = 1
            lengths = mask.sum(-1)[source]
            tail_positions = lengths[:, None] + torch.arange(width)[None, :]
            full_mask = torch.cat([mask[source], tail_mask], dim=1)
            with autocast(device, dtype):
                logits = model(input_ids=tail.to(device), attention_mask=full_mask.to(device),
                               position_ids=tail_positions.to(device), past_key_values=cache, use_cache=True).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for r, (_, i) in enumerate(pairs):
                tokens = list(continuations[i])
                # token t (t >= 1) of the option is predicted at tail position t - 1, after tokens 0..t-1
                for t in range(1, len(tokens)):
                    scores[i] += float(logp[r, t - 1, tokens[t]])
        if on_batch is not None:
            on_batch(len(pairs))
    return scores
