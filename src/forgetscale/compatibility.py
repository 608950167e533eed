"""Does a model trained elsewhere fit the base it is measured against? Checked before anything is stored,
each answer one line naming what differs: the tokenizer (a folder's saved tokenizer against the base's),
the vocabulary size of a full checkpoint, an adapter's modules and shapes, and the base an adapter
records (a different name with the same shapes is only a warning: a renamed copy, or a mirror).

Forgetting compares next-token distributions position by position, so a tokenizer or vocabulary that
differs from the base's makes every number meaningless rather than merely different.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from forgetscale.errors import ModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def vocab_size(config: Any) -> int | None:
    """config.vocab_size, or a multimodal config's text_config.vocab_size."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    size = get("vocab_size")
    if size is None:
        text = get("text_config")
        if text is not None:
            return vocab_size(text)
    return int(size) if size is not None else None


def check_vocab_size(base: torch.nn.Module, path: Path, what: str) -> None:
    """A full checkpoint's config.json vocabulary against the base model's (before loading any weights)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise ModelError(f"{what} {path}: config.json is not readable JSON; fix or re-save the checkpoint") from None
    theirs = vocab_size(config)
    ours = base.get_input_embeddings().num_embeddings
    if theirs is not None and theirs != ours:
        raise ModelError(f"{what} {path}: its vocabulary has {theirs} tokens (config.json vocab_size), the base "
                         f"model's {ours}; a checkpoint must keep the base model's vocabulary")


def _vocab_difference(theirs: dict[str, int], ours: dict[str, int]) -> str | None:
    if len(theirs) != len(ours):
        extra = sorted(set(theirs) - set(ours), key=theirs.get)[:1] or sorted(set(ours) - set(theirs), key=ours.get)[:1]
        hint = f" (e.g. {extra[0]!r} is in only one)" if extra else ""
        return f"has {len(theirs)} tokens, the base's {len(ours)}{hint}"
    for token, index in sorted(theirs.items(), key=lambda kv: kv[1]):
        if ours.get(token) != index:
            other = "absent" if token not in ours else f"id {ours[token]}"
            return f"maps {token!r} to id {index}, the base's tokenizer to {other}"
    return None


def check_tokenizer(base_tokenizer: Any, path: Path, what: str) -> None:
    """A folder's saved tokenizer (if it holds one) must be the base's: same tokens, same ids, same EOS."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return  # nothing saved: the base's tokenizer is the one that will be used
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(f"{what} {path}: its saved tokenizer cannot be loaded ({first}); remove the tokenizer "
                         "files or fix them") from None
    difference = _vocab_difference(theirs.get_vocab(), base_tokenizer.get_vocab())
    if difference is None and theirs.eos_token_id != base_tokenizer.eos_token_id:
        difference = f"has EOS id {theirs.eos_token_id}, the base's {base_tokenizer.eos_token_id}"
    if difference is not None:
        raise ModelError(f"{what} {path}: its saved tokenizer differs from the base model's: it {difference}; "
                         "measure it against the base it was trained from")


def check_adapter_shapes(base: torch.nn.Module, path: Path, weights: Path) -> None:
    """Name the first adapter module or shape the base model does not have (before PEFT's own, longer error)."""
    if weights.suffix != ".safetensors":
        return
    from safetensors import safe_open

    modules = dict(base.named_modules())
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            name = key.removeprefix("base_model.model.")
            head, sep, tail = name.partition(".lora_")
            if not sep:
                continue
            module = modules.get(head)
            if module is None:
                raise ModelError(f"adapter {path}: module '{head}' is not in the base model; the adapter "
                                 "was trained on another architecture")
            shape = tuple(fh.get_slice(key).get_shape())
            base_layer = getattr(module, "base_layer", module)
            if tail.startswith("A.") and hasattr(base_layer, "in_features") and shape[-1] != base_layer.in_features:
                raise ModelError(f"adapter {path}: {key} has shape {list(shape)} but the base model's "
                                 f"'{head}' takes {base_layer.in_features} inputs; the adapter was trained on "
                                 "another architecture")
            if tail.startswith("B.") and hasattr(base_layer, "out_features") and shape[0] != base_layer.out_features:
                raise ModelError(f"adapter {path}: {key} has shape {list(shape)} but the base model's "
                                 f"'{head}' gives {base_layer.out_features} outputs; the adapter was trained on "
                                 "another architecture")


def _same_name(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def recorded_base_warning(adapter_config: dict[str, Any], base_names: list[str], path: Path) -> str | None:
    """A warning when the adapter records a base other than the one given (the shapes were checked to match);
    `base_names`: what the base is called (--base, and the folder it was loaded from)."""
    recorded = adapter_config.get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded or any(_same_name(recorded, n) for n in base_names if n):
        return None
    return (f"adapter {path} records base '{recorded}', measured here against '{base_names[0]}' (same modules and "
            "shapes); the numbers are forgetting relative to that base")
