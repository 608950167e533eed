"""Cost and accuracy of the exact forgetting metric's dot products, against one fp32 dot per token (the old way),
measured side by side in one process on the embedded model (SmolLM2-135M-Instruct, 49,152-token vocabulary).

For each arithmetic: seconds per measure() call over the same blocks (median of interleaved repeats) and the
mean |error| of soft CE, entropy and KL against fp64 on the same logits. A tuned model is the base with
small random weight noise, so KL is not 0.

    python benchmarks/bench_metric.py [--tokens 1024] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from forgetscale.data.blocks import pack_documents
from forgetscale.data.embedded import wikipedia_articles
from forgetscale.metric import references, sums
from forgetscale.models import EMBEDDED, load_model


def legacy(monkey: bool) -> None:
    """Switch metric/sums.py's dot product to one fp32 dot per token, or back (the logit shift stays)."""
    sums.DOT_CHUNK = 1 << 30 if monkey else 256


def truth(base, tuned, blocks, batch: int) -> dict[str, float]:
    ce = ent = 0.0
    n = 0
    device = torch.device("cpu")
    for (_, zb, _, _), (_, zt, _, _) in zip(sums.batches(base, blocks, batch, device, None),
                                      sums.batches(tuned, blocks, batch, device, None), strict=True):
        logp, logq = torch.log_softmax(zb.double(), -1), torch.log_softmax(zt.double(), -1)
        p = logp.exp()
        ent += float(-(p * logp).sum())
        ce += float(-(p * logq).sum())
        n += zb.shape[0]
    return {"ce": ce / n, "entropy": ent / n, "kl": (ce - ent) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(EMBEDDED)
    base = loaded.model
    blocks = pack_documents(wikipedia_articles(None), loaded.tokenizer, 128, max_tokens=args.tokens)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "layers" in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.abs().mean())
    device, batch = torch.device("cpu"), 8
    exact = truth(base, tuned, blocks, batch)
    times: dict[str, list[float]] = {"exact (256-col fp64 sums)": [], "single fp32 dot": []}
    errors: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for name in times:
            legacy(name == "single fp32 dot")
            ref = references.memory_reference(base, blocks, batch, device)
            started = time.perf_counter()
            got = sums.score(tuned, blocks, batch, device, None, ref)
            times[name].append(time.perf_counter() - started)
            errors[name] = {k: abs(got[k] - exact[k]) for k in exact}
    legacy(False)
    base_time = statistics.median(times["single fp32 dot"])
    print(f"{blocks.input_ids.numel()} forgetting tokens, KL {exact['kl']:.4f}, vocabulary {base.config.vocab_size}")
    print("| arithmetic | measure() s | x single dot | CE error | entropy error | KL error |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in times.items():
        t = statistics.median(values)
        e = errors[name]
        print(f"| {name} | {t:.2f} | {t / base_time:.3f} | {e['ce']:.1e} | {e['entropy']:.1e} | {e['kl']:.1e} |")


if __name__ == "__main__":
    main()
