"""How finely a sweep's held-out set resolves changes in L_ft: the paired standard error of each run's drop
from the base to its last saved adapter, over held-out blocks (same tokens, so only the per-block spread of
the drop counts), beside the drop itself and the absolute standard error of L_ft.

    python benchmarks/heldout_noise.py runs/demo
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from forgetscale.config import parse_config
from forgetscale.data import build_finetune_data
from forgetscale.data.blocks import IGNORE
from forgetscale.metric import block_se
from forgetscale.metric.sums import batches as _batches
from forgetscale.models import cache_root, compute_dtype, load_configured_model, resolve_device
from forgetscale.store import Store


def block_nll(model: torch.nn.Module, blocks, batch: int, device, dtype) -> torch.Tensor:
    """Per-block sums of the next-token NLL (the same batches and arithmetic as a checkpoint's ft_loss)."""
    sums = []
    for part, z, lse, labels in _batches(model, blocks, batch, device, dtype):
        nll = (lse - z.gather(1, labels[:, None]).view(-1)).double()
        counts = (part.labels[:, 1:] != IGNORE).sum(1)
        index = torch.repeat_interleave(torch.arange(len(counts)), counts)
        sums.append(torch.zeros(len(counts), dtype=torch.float64).index_add_(0, index, nll.cpu()))
    return torch.cat(sums)


def se(sums: torch.Tensor, counts: torch.Tensor) -> float:
    return block_se(sums, counts)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    from peft import PeftModel

    with Store(args.run_dir, create=False) as store:
        cfg = parse_config(json.loads(store.get_meta("sweep_config")))
        runs = [r for r in store.runs() if r["status"] == "finished"]
    device = resolve_device(cfg.train.device)
    dtype = compute_dtype(cfg, device)
    loaded = load_configured_model(cfg, device)  # in model.dtype, as the sweep measured
    data = build_finetune_data(cfg.finetune, loaded.tokenizer, cfg.train.context_length, cache_root() / "data")
    blocks, batch = data.heldout, cfg.train.eval_batch_size
    counts = (blocks.labels[:, 1:] != IGNORE).sum(1)
    keep = counts > 0
    base = block_nll(loaded.model, blocks, batch, device, dtype)[keep]
    counts = counts[keep]
    n = int(counts.sum())
    print(f"{args.run_dir}: {n} held-out tokens in {len(counts)} blocks; base L_ft {float(base.sum()) / n:.4f} "
          f"(absolute SE {se(base, counts):.4f})")
    for run in sorted(runs, key=lambda r: (r["method"], r["rank"] or 0)):
        folder = args.run_dir / "runs" / run["run_id"]
        adapters = sorted(folder.glob("adapter-step*"), key=lambda p: int(p.name.removeprefix("adapter-step")))
        if not adapters:
            continue
        step = int(adapters[-1].name.removeprefix("adapter-step"))
        torch.manual_seed(0)
        model = PeftModel.from_pretrained(load_configured_model(cfg, device).model, adapters[-1]).eval()
        tuned = block_nll(model, blocks, batch, device, dtype)[keep]
        drop = base - tuned
        paired = se(drop, counts)
        mean = float(drop.sum()) / n
        print(f"  {run['method']} rank {run['rank']}, step {step}: L_ft {float(tuned.sum()) / n:.4f}, drop {mean:.4f} "
              f"(paired SE {paired:.4f}, {mean / paired if paired > 0 else math.inf:.0f} SE)")


if __name__ == "__main__":
    main()
