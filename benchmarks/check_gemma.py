"""Is the dequantised Gemma 3 270M sane? Load time (first: reassemble + dequantise + cache; then the cached
folder), a greedy continuation, and the perplexity of a Wikipedia paragraph (the embedded set's first article,
2,000 characters, up to 512 tokens) with and without BOS, beside SmolLM2-135M-Instruct's. One thread.

    FORGETSCALE_CACHE=/tmp/fresh-cache python benchmarks/check_gemma.py   # a cold cache times the conversion
"""

from __future__ import annotations

import math
import resource
import time

import torch

from forgetscale.data.embedded import wikipedia_articles
from forgetscale.models import EMBEDDED, GEMMA, load_model


def nll(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_model(GEMMA)
    print(f"first load {time.perf_counter() - started:.1f} s (conversion, unless already cached)")
    started = time.perf_counter()
    gemma = load_model(GEMMA)
    print(f"cached load {time.perf_counter() - started:.1f} s")
    tok, model = gemma.tokenizer, gemma.model
    print(f"parameters {sum(p.numel() for p in model.parameters()):,}; chat template: {tok.chat_template is not None}")
    ids = tok("The history of the Roman Empire", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    print("greedy:", repr(tok.decode(out[0][ids["input_ids"].shape[1]:])))
    para = next(a for a in wikipedia_articles() if len(a) > 2000)[:2000]
    for bos in (True, False):
        x = tok(para, add_special_tokens=bos, return_tensors="pt")["input_ids"][:, :512]
        loss = nll(model, x)
        print(f"gemma3-270m, BOS {bos}: {x.shape[1]} tokens, NLL {loss:.4f}, perplexity {math.exp(loss):.2f}")
    smol = load_model(EMBEDDED)
    x = smol.tokenizer(para, return_tensors="pt")["input_ids"][:, :512]
    loss = nll(smol.model, x)
    print(f"{EMBEDDED}: {x.shape[1]} tokens, NLL {loss:.4f}, perplexity {math.exp(loss):.2f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


if __name__ == "__main__":
    main()
