"""Cost of each forgetting.reference kind on an embedded model (default SmolLM2-135M-Instruct, 49,152-token
vocabulary; --model gemma3-270m: 262,144, 5.3x the bytes per token):
peak RSS, seconds to build the reference, seconds per checkpoint (one measure() over the forgetting set), and
the KL it gives. Each kind runs in a fresh process (peak RSS is per process). The tuned model is the base with
a LoRA r8 adapter whose B is small random noise, so KL is not 0; the same seed in every process.

    python benchmarks/bench_reference.py --tokens 4096 --batch 2 --kinds memory disk recompute
    python benchmarks/bench_reference.py --tokens 4096 --kinds memory disk recompute topk:16 topk:256 topk:4096
    (--tokens 65536 is the issue's size: 16x the time of 4096, and 12.9 GB for `memory`)
    python benchmarks/bench_reference.py --model gemma3-270m --tokens 2048 --kinds memory disk recompute topk:256

KL error of a topk:K row = its KL minus the exact KL (disk's, bit-equal to memory's) of the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(kind: str, tokens: int, block: int, batch: int, threads: int, folder: Path, name: str) -> dict:
    import torch

    from forgetscale.config import ForgettingConfig
    from forgetscale.data import build_forgetting_blocks
    from forgetscale.methods import METHODS
    from forgetscale.methods.attach import attach
    from forgetscale.metric import references
    from forgetscale.metric.sums import score as measure
    from forgetscale.models import cache_root, load_model

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    loaded = load_model(name)
    blocks = build_forgetting_blocks(ForgettingConfig(max_tokens=tokens), loaded.tokenizer, block,
                                     cache_root() / "data")
    torch.manual_seed(0)
    model = attach(loaded.model, METHODS.get("lora")(ranks=[8]), 8).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 2e-3)
    before = rss_mb()
    started = time.perf_counter()
    with model.disable_adapter():
        ref = references.build(kind, model, blocks, batch, device, None, folder)
    built = time.perf_counter() - started
    started = time.perf_counter()
    got = measure(model, blocks, batch, device, None, ref)
    checkpoint = time.perf_counter() - started
    return {"kind": kind, "tokens": got["tokens"], "projected_memory_gb": round(references.projected_bytes(model, blocks) / 1e9, 2),
            "model_loaded_mb": round(before), "peak_rss_mb": round(rss_mb()), "build_s": round(built, 1),
            "checkpoint_s": round(checkpoint, 1), "kl": got["kl"], "ce": got["ce"],
            "kl_error_bound": got.get("kl_error_bound")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model.name (gemma3-270m: extra [gemma])")
    parser.add_argument("--tokens", type=int, default=65536, help="forgetting.max_tokens (embedded:wikipedia)")
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", default=["disk", "recompute", "topk:16", "topk:256", "topk:4096"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.tokens, args.block, args.batch, args.threads, Path(args.folder),
                             args.model)))
        return
    print(f"{args.model}, {args.tokens} tokens of embedded:wikipedia in {args.block}-token blocks, "
          f"eval batch {args.batch}, {args.threads} thread(s)")
    scratch = Path(tempfile.mkdtemp(prefix="bench_reference-"))
    exact = None
    try:
        for kind in args.kinds:
            cmd = [sys.executable, __file__, "--child", kind, "--tokens", str(args.tokens), "--block", str(args.block),
                   "--batch", str(args.batch), "--threads", str(args.threads), "--folder", str(scratch / "ref"),
                   "--model", args.model]
            row = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            if not kind.startswith("topk"):
                exact = row["kl"]
            elif exact is not None:
                row["kl_error"] = row["kl"] - exact
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
