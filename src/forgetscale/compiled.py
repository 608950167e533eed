"""torch.compile (inductor) for the training step (`train.compile`), and this machine's matmul rate, the yardstick
a step's speed is judged against (`benchmarks/bench_compile.py`, `benchmarks/bench_sweep.py`).

What is compiled is the model's decoder body (each decoder layer by default: one graph, compiled once and reused
by every layer, so compiling costs seconds to a minute where the whole body costs minutes); the chunked output
head (forgetscale.metric.head) stays eager, and so does every measuring pass (`compiled(False)`): the base
predictions a checkpoint is compared with are computed eagerly, and a compiled pass rounds differently in bf16,
which would put a floor under every KL (docs/performance.md#measuring-precision). Compiled training rounds
differently too, within the precision's own rounding (tests/test_compiled.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KINDS = ("layers", "model")


def body(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder body (embeddings, layers, final norm) of a causal LM, through a PEFT wrapper."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(causal, getattr(causal, "base_model_prefix", "model"), None)
    if inner is None:
        raise ValueError(f"train.compile: cannot find the decoder body of {type(causal).__name__}")
    return inner


def compile_model(model: torch.nn.Module, kind: str = "layers") -> int:
    """Compile the model's decoder layers (`layers`) or its whole decoder body (`model`) in place, for static shapes;
    returns how many modules were wrapped. The KV cache is turned off (training and measuring never read it,
    and a cache passed into each layer would be one recompilation per layer)."""
    from forgetscale.methods.attach import decoder_layers

    if kind not in KINDS:
        raise ValueError(f"compile kind must be one of {KINDS}; got {kind!r}")
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = list(decoder_layers(causal)) if kind == "layers" else [body(model)]
    for module in modules:
        module.compile(dynamic=False)
    return len(modules)


@contextlib.contextmanager
def compiled(on: bool) -> Iterator[None]:
    """Inside, compiled modules run their compiled graphs (`on`) or their plain eager forward (not `on`)."""
    import torch

    if on:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """GFLOP/s of [m, k] @ [k, n] in `dtype` on the CPU at torch's current thread count (best of ~`seconds`)."""
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
    return 2 * m * k * n / best / 1e9
