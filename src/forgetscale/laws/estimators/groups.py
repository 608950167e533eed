"""Method groups: which stored runs count as "the same method" for the laws, and their readable labels.

A law belongs to one fine-tuning method *with its settings*: LoRA on every linear module and LoRA on
attention only are different methods (the paper's appendix treats them so). Runs are grouped by
their stored `method_config` minus the rank (each rank is one run of the same group), and each
group gets a short label such as `lora`, `lora[attn]`, `ia3`, `top_layers[k=3]` or `full`.

A label names a setting only when it tells groups apart or departs from the method's default, so
a single-method sweep keeps the plain method name. The defaults below mirror the method specs in
`forgetscale.methods` (kept here so that fitting never imports torch); tests/test_laws_methods.py
checks that they match every registered method.

laws.json stores a group's label under the key "variant" (a group's `key`, the cross_method block's
"variants" and "by_variant", a mitigation cell): the file format predates the name, and keeping the
key keeps laws.json files of every version readable.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MODULE_SETS = {frozenset(ALL_LINEAR): "all-linear", frozenset(ATTENTION): "attn", frozenset(MLP): "mlp"}

_LORA = {"target_modules": list(ALL_LINEAR), "scaling": "rslora", "alpha": 16.0, "dropout": 0.0, "layers": None,
         "lr": None}
DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": _LORA,
    "dora": _LORA,
    "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"], "lr": None},
    "top_layers": {"k": 3, "lr": None},
    "full": {"lr": None},
}
ALWAYS = {"top_layers": ("k",)}  # settings that are the method's identity: always in the label
NOT_SETTINGS = ("name", "rank", "ranks")  # stored beside the settings but not part of a group

GROUP, METHOD_KEY = "group", "method_key"  # the columns add_groups() adds


def settings(method_config: Any) -> dict[str, Any]:
    """A run's method settings without its rank, from the stored JSON (or a dict)."""
    if method_config is None or (isinstance(method_config, float) and pd.isna(method_config)):
        return {}
    cfg = json.loads(method_config) if isinstance(method_config, str) else dict(method_config)
    return {k: v for k, v in cfg.items() if k not in NOT_SETTINGS}


def method_key(method: str, method_config: Any) -> str:
    """Canonical identity of a group: the method name and its settings as sorted JSON."""
    return json.dumps({"method": str(method), **settings(method_config)}, sort_keys=True)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list) and all(isinstance(x, str) for x in a + b):
        return sorted(a) == sorted(b)  # module lists are sets
    return a == b


def _modules(names: list[str]) -> str:
    known = MODULE_SETS.get(frozenset(names))
    order = sorted(names, key=lambda n: (ALL_LINEAR.index(n) if n in ALL_LINEAR else len(ALL_LINEAR), n))
    return known or "+".join(n.removesuffix("_proj") for n in order)


def _part(key: str, value: Any) -> str:
    """One setting as a label fragment: 'attn', 'last:4', 'k=3', 'lr=0.01'."""
    if key == "target_modules" and isinstance(value, list):
        return _modules(value)
    if key == "feedforward_modules" and isinstance(value, list):
        return f"ff={_modules(value)}"
    if key == "layers" and isinstance(value, str):
        return value
    if key == "layers" and isinstance(value, list):
        return "layers=" + ",".join(str(i) for i in value)
    if key == "scaling":
        return str(value)
    if isinstance(value, float):
        return f"{key}={value:g}"
    if isinstance(value, list):
        return f"{key}=" + ",".join(str(v) for v in value)
    return f"{key}={value}"


def labels(keys: list[str]) -> dict[str, str]:
    """Readable, unique label for each group key (from method_key) among the groups of one sweep."""
    parsed = {k: json.loads(k) for k in set(keys)}
    by_method: dict[str, list[str]] = {}
    for k, cfg in parsed.items():
        by_method.setdefault(cfg["method"], []).append(k)
    out: dict[str, str] = {}
    for method, members in by_method.items():
        defaults = DEFAULTS.get(method, {})
        names = sorted({n for k in members for n in parsed[k] if n != "method"})
        varying = {n for n in names if any(not _same(parsed[a].get(n), parsed[members[0]].get(n)) for a in members)}
        for k in members:
            cfg = parsed[k]
            parts = []
            for n in names:
                if n not in cfg:
                    continue  # not stored for this run: nothing to name
                value = cfg[n]
                if n in ALWAYS.get(method, ()):
                    parts.append(_part(n, value))
                elif n in defaults and _same(value, defaults[n]):
                    continue  # the default says nothing, even where another group differs
                elif n in varying or (n in defaults and n != "lr"):
                    parts.append(_part(n, value))  # lr is a training setting: named only where it varies
            out[k] = f"{method}[{','.join(parts)}]" if parts else method
    seen: dict[str, int] = {}
    for label in out.values():
        seen[label] = seen.get(label, 0) + 1
    for k, label in out.items():  # settings that print alike (rare): tell them apart by a short hash
        if seen[label] > 1:
            out[k] = f"{label}#{hashlib.sha1(k.encode()).hexdigest()[:6]}"
    return out


def add_groups(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows with `method_key` and `group` columns (unchanged when they are already there).

    Labels depend on which groups the frame holds, so call this on a whole sweep's rows before
    splitting them; rows without a method_config column are one group per method name.
    """
    if GROUP in frame.columns and METHOD_KEY in frame.columns:
        return frame
    out = frame.copy()
    configs = out["method_config"] if "method_config" in out.columns else [None] * len(out)
    out[METHOD_KEY] = [method_key(m, c) for m, c in zip(out["method"].astype(str), configs, strict=True)]
    names = labels(list(out[METHOD_KEY].unique()))
    out[GROUP] = out[METHOD_KEY].map(names)
    return out


def non_default(method: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings that differ from the method's defaults (what a table needs to show)."""
    defaults = DEFAULTS.get(method, {})
    return {k: v for k, v in cfg.items() if not (k in defaults and _same(v, defaults[k]))}
