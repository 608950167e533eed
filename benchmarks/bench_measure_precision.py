"""Which precision to measure forgetting in: the error against fp64 and the cost of each way of measuring.

The same tuned model (SmolLM2 + a seeded LoRA, two strengths) is measured against the same base with
forgetscale's ForgettingMeter in
- fp32 (no autocast),
- bf16 autocast with the output head in fp32 (what a bf16 measurement does: forgetscale.metric.sums),
- bf16 autocast with the head in bf16 too (the stock model under autocast),
and the truth is computed here apart from the metric's code: the model in fp64, log-softmax in fp64.
Prints KL, soft CE and hard CE per mode, their error against fp64 (absolute, and relative for KL), and the
seconds of one measuring pass (median of --repeats).

    python benchmarks/bench_measure_precision.py --threads 1             # SmolLM2, 512 tokens
    python benchmarks/bench_measure_precision.py --model tiny-random-llama --tokens 256
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch

from forgetscale.config import ForgettingConfig
from forgetscale.data import build_forgetting_blocks
from forgetscale.data.blocks import IGNORE
from forgetscale.metric import ForgettingMeter
from forgetscale.models import cache_root, load_model


def lora(model: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    tuned = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale)
    return tuned


def truth(model: torch.nn.Module, blocks, batch: int) -> dict[str, float]:
    """KL, CE and hard CE with the model in fp64 and fp64 log-softmax (independent of forgetscale.metric)."""
    model = copy.deepcopy(model).double()
    sums, count = {"kl": 0.0, "ce": 0.0, "ce_hard": 0.0}, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch):
            part = blocks.select(slice(start, start + batch))
            keep = part.labels[:, 1:] != IGNORE
            with model.disable_adapter():
                log_p = torch.log_softmax(model(input_ids=part.input_ids, attention_mask=part.attention_mask)
                                          .logits[:, :-1][keep], -1)
            log_q = torch.log_softmax(model(input_ids=part.input_ids, attention_mask=part.attention_mask)
                                      .logits[:, :-1][keep], -1)
            p = log_p.exp()
            sums["kl"] += float((p * (log_p - log_q)).sum())
            sums["ce"] += float(-(p * log_q).sum())
            sums["ce_hard"] += float(-log_q.gather(1, log_p.argmax(-1, keepdim=True)).sum())
            count += int(keep.sum())
    return {k: v / count for k, v in sums.items()}


@contextlib.contextmanager
def bf16_head():
    """The head inside autocast, as the stock model runs it: no plain-head path, no fp32 head."""
    from forgetscale.metric import sums

    saved = sums.plain_head, sums.fp32_output_head
    sums.plain_head = lambda model: None
    sums.fp32_output_head = lambda model, device, dtype: contextlib.nullcontext()
    try:
        yield
    finally:
        sums.plain_head, sums.fp32_output_head = saved


MODES = {
    "fp32": (None, contextlib.nullcontext),
    "bf16 autocast, fp32 head": (torch.bfloat16, contextlib.nullcontext),
    "bf16 autocast, bf16 head": (torch.bfloat16, bf16_head),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--block-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.002, 0.01])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model(args.model)
    blocks = build_forgetting_blocks(ForgettingConfig(dataset="embedded:wikipedia", max_tokens=args.tokens),
                                     base.tokenizer, args.block_length, cache_root() / "data")
    print(f"{args.model}: {blocks.loss_tokens} forgetting tokens, {torch.get_num_threads()} threads")
    for scale in args.scales:
        model = lora(load_model(args.model).model, scale)
        true = truth(model, blocks, args.batch)
        print(f"\nLoRA B ~ N(0, {scale}^2): fp64 KL {true['kl']:.6f}  CE {true['ce']:.6f}  CE hard {true['ce_hard']:.6f}")
        print(f"{'mode':<26} {'KL':>10} {'KL err':>10} {'KL rel':>9} {'CE err':>10} {'hard err':>10} {'s/pass':>7}")
        for name, (dtype, context) in MODES.items():
            with context():
                meter = ForgettingMeter.build(model, forgetting=blocks, batch_size=args.batch, dtype=dtype)
                seconds = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    result = meter.measure(model)
                    seconds.append(time.perf_counter() - start)
            err = {k: getattr(result, k) - true[k] for k in true}
            print(f"{name:<26} {result.kl:>10.6f} {err['kl']:>+10.2e} {abs(err['kl']) / true['kl']:>9.2e} "
                  f"{err['ce']:>+10.2e} {err['ce_hard']:>+10.2e} {statistics.median(seconds):>7.2f}")


if __name__ == "__main__":
    main()
