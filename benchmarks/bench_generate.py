"""Batched generation and option scoring against a one-prompt-at-a-time loop, side by side.

The suites' settings on the embedded model (SmolLM2-135M-Instruct): the safety suite's greedy
replies (HarmBench prompts in the chat template, 64 new tokens) and the choice suite's loglik
scoring (4 options per item; batched with each question's context run once and its KV cache shared by
the options, batched as whole sequences, and one pair at a time). Each timing is the median of
interleaved repeats (batched, loop, batched, loop, ...), so machine drift hits all alike; the printed
figure is the ratio.

    python benchmarks/bench_generate.py [--prompts 16] [--tokens 64] [--batch 16] [--repeats 3] [--threads 2]
                                        [--no-generation]
    python benchmarks/bench_generate.py --frozen --prompts 50 --tokens 24 --batch 50 --threads 2

`--frozen` times transformers' own `generate` on the model in bf16 weights frozen (requires_grad False,
as a PEFT-wrapped base or an inference-only load has them), bf16 autocast, with and without the output
head reading a contiguous input (`evals.generation.contiguous_head_input`), interleaved. (fp32 weights under
bf16 autocast showed no difference, 4.79 s both ways at the settings below, so the bench loads bf16.)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from forgetscale.data.embedded import harmbench_prompts
from forgetscale.evals.choice_set import embedded_choice_items
from forgetscale.evals.generation import chat_prompt, contiguous_head_input, generate, option_logprobs
from forgetscale.models import EMBEDDED, load_model


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--items", type=int, default=32, help="choice items scored (x4 options)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-generation", action="store_true", help="time option scoring only")
    ap.add_argument("--frozen", action="store_true", help="frozen weights: stock generate with and without a "
                    "contiguous head input")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # --frozen: bf16 weights, as a sweep with model.dtype bfloat16 loads them (the safety study's base)
    loaded = load_model(EMBEDDED, dtype=torch.bfloat16) if args.frozen else load_model(EMBEDDED)
    model, tok = loaded.model, loaded.tokenizer
    prompts = [chat_prompt(tok, p) for p in harmbench_prompts()[: args.prompts]]
    if args.frozen:
        return frozen(model, tok, prompts, args)

    def batched():
        return generate(model, tok, prompts, max_new_tokens=args.tokens, batch_size=args.batch)

    def loop():
        return [generate(model, tok, [p], max_new_tokens=args.tokens, batch_size=1)[0] for p in prompts]

    items = embedded_choice_items()[: args.items]
    contexts, conts = [], []
    for item in items:
        ctx = list(tok(f"Question: {item.question}\nAnswer:")["input_ids"])
        for option in item.options:
            contexts.append(ctx)
            conts.append(list(tok(f" {option}", add_special_tokens=False)["input_ids"]))

    def score_batched():
        return option_logprobs(model, tok, contexts, conts, batch_size=2 * args.batch)

    def score_whole():
        return option_logprobs(model, tok, contexts, conts, batch_size=2 * args.batch, share_context=False)

    def score_loop():
        return [option_logprobs(model, tok, [c], [x], batch_size=1)[0] for c, x in zip(contexts, conts, strict=True)]

    variants = [("score_batched", score_batched), ("score_whole", score_whole), ("score_loop", score_loop)]
    if not args.no_generation:
        variants = [("gen_batched", batched), ("gen_loop", loop), *variants]
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    outs: dict[str, object] = {}
    for _ in range(args.repeats):
        for name, fn in variants:
            t, outs[name] = timed(fn)
            times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {EMBEDDED}, torch threads {torch.get_num_threads()}, median of {args.repeats} interleaved repeats")
    if not args.no_generation:
        new_tokens = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs["gen_batched"])
        same = sum(a == b for a, b in zip(outs["gen_batched"], outs["gen_loop"], strict=True))
        print(f"generation: {args.prompts} safety prompts x {args.tokens} new tokens (greedy), batch {args.batch}")
        print(f"  batched      {med['gen_batched']:7.2f} s  ({new_tokens / med['gen_batched']:6.1f} generated tokens/s)")
        print(f"  one by one   {med['gen_loop']:7.2f} s")
        print(f"  speed-up     {med['gen_loop'] / med['gen_batched']:7.2f}x   identical replies: {same}/{args.prompts}")

    def diff(name: str) -> float:
        return max(abs(a - b) for a, b in zip(outs[name], outs["score_loop"], strict=True))

    print(f"option scoring: {args.items} choice items x 4 options, batch {2 * args.batch}")
    print(f"  batched, shared context   {med['score_batched']:7.2f} s   max |log-prob difference| vs one by one: "
          f"{diff('score_batched'):.2e}")
    print(f"  batched, whole sequences  {med['score_whole']:7.2f} s   {diff('score_whole'):.2e}")
    print(f"  one by one                {med['score_loop']:7.2f} s")
    print(f"  speed-up: shared {med['score_loop'] / med['score_batched']:.2f}x, whole {med['score_loop'] / med['score_whole']:.2f}x"
          f" one by one; shared context {med['score_whole'] / med['score_batched']:.2f}x whole sequences")


def frozen(model: torch.nn.Module, tok, prompts: list[list[int]], args: argparse.Namespace) -> None:
    """Stock `model.generate` on frozen weights, one left-padded batch, with and without the contiguous head input."""
    from forgetscale.evals.generation import _left_pad
    from forgetscale.metric.sums import autocast

    model.requires_grad_(False).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = [_left_pad(prompts[i:i + args.batch], pad) for i in range(0, len(prompts), args.batch)]

    def run(contiguous: bool) -> list[list[int]]:
        out = []
        for ids, mask in batches:
            with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16), \
                    (contiguous_head_input(model) if contiguous else contextlib.nullcontext()):
                new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.tokens, do_sample=False,
                                     pad_token_id=pad)[:, ids.shape[1]:]
            out += new.tolist()
        return out

    times: dict[bool, list[float]] = {True: [], False: []}
    outs = {}
    for _ in range(args.repeats):
        for contiguous in (False, True):
            t, outs[contiguous] = timed(lambda c=contiguous: run(c))
            times[contiguous].append(t)
    stock, ours = statistics.median(times[False]), statistics.median(times[True])
    same = sum(a == b for a, b in zip(outs[False], outs[True], strict=True))
    print(f"model {EMBEDDED}, frozen bf16 weights, bf16 autocast, torch threads {torch.get_num_threads()}, median of "
          f"{args.repeats} interleaved repeats; {len(prompts)} safety prompts x {args.tokens} new tokens, batch {args.batch}")
    print(f"  transformers generate             {stock:7.2f} s")
    print(f"  with a contiguous head input      {ours:7.2f} s")
    print(f"  speed-up {stock / ours:.2f}x; identical replies {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
