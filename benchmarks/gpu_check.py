"""The CUDA path at 8B scale: one prepared run of every GPU figure docs/distributed.md quotes.

Models are built from configs with random weights (`model.init: random`; nothing is downloaded), so their
numbers mean nothing and their speed and memory are real. Sections (each prints its figures as it ends; a
failing one prints its error and the next runs):

  matmul   the bf16 matmul rate of this device, measured now (the MFU denominator beside the datasheet's)
  train    a forgetscale LoRA sweep on a Llama-3-8B-shaped model (r16, all linear layers, 8 x 1,024 tokens
           per step): seconds per step from the stored rows (steps 2..N, so warm-up is out), MFU, peak memory,
           KL at step 0 (exactly 0 expected)
  profile  where one such step's GPU time goes (matrix products, attention, the rest, idle), torch.profiler
  measure  one forgetting measurement of the 8B model with the memory, disk and recompute references,
           against one plain forward pass over the same tokens (the physical minimum)
  memory   peak CUDA memory of a Llama-2-7B-shaped LoRA r8 step (8 x 512) per precision mode, beside
           docs/distributed.md's computed table
  resume   a 2-run sweep of a Llama-3.2-1B-shaped model killed mid-way (SIGKILL) and resumed, its rows
           compared with an uninterrupted sweep's (and two uninterrupted sweeps with each other: the floor)
  trainer  a transformers Trainer (bf16) with PEFT LoRA and the ForgettingCallback on the 1B shape: rows
           stored, log_history, one measurement against a plain forward

    python benchmarks/gpu_check.py --export-inputs gpu_inputs     # here: tokenizer + text, to carry
    (--export-inputs gpu_inputs --shape gemma3-270m adds Gemma 3's tokenizer, for --shape gemma3-270m there)
    bash benchmarks/gpu_check.sh --inputs gpu_inputs --out OUT     # there (CUDA), ~5 min on an H200
    python benchmarks/gpu_check.py --inputs gpu_inputs --device cpu --scale smoke --out /tmp/g   # CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "L40S": 362e12}
VALUES = ("ft_loss", "ft_loss_train", "forget_ce", "forget_ce_hard", "forget_kl", "ft_kl")
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
         "attention_bias": False, "mlp_bias": False}
SHAPES = {  # the published configs' shapes (Meta's Llama 3 8B, Llama 3.2 1B, Llama 2 7B)
    "llama3-8b": {**LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False},
    "llama3-1b": {**LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": True},
    "llama2-7b": {**LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                  "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False},
    # Gemma 3 270M's own shape (the [gemma] extra's model): another architecture, a 262,144-token vocabulary
    "gemma3-270m": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
                    "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
                    "num_key_value_heads": 1, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
                    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                    "query_pre_attn_scalar": 256, "sliding_window": 512, "rope_theta": 1000000.0,
                    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3},
}
TOKENIZERS = {"gemma3-270m": "tokenizer-gemma"}  # the rest read SmolLM2's (`tokenizer`)
SMOKE = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}
# docs/distributed.md's computed table (GB = 1e9 B): Llama 2 7B, LoRA r8, 8 x 512 tokens
COMPUTED_7B = {"fp32": (27.0, 46.3), "bf16": (13.5, 32.8), "bf16+checkpointing": (13.5, 16.1)}


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.perf_counter(), budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


def say(clock: Clock, text: str) -> None:
    print(f"[{clock.elapsed():6.1f} s] {text}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def export_inputs(folder: Path, with_gemma: bool = False) -> None:
    """Here, where the embedded model and data are: the tokenizer and the texts the GPU run reads."""
    from transformers import AutoTokenizer

    from forgetscale.data.embedded import news_articles, wikipedia_articles
    from forgetscale.errors import ModelError
    from forgetscale.models import EMBEDDED, GEMMA, resolve_source

    folder.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(resolve_source(EMBEDDED)[0]).save_pretrained(folder / "tokenizer")
    if with_gemma:  # the [gemma] extra's tokenizer, for --shape gemma3-270m (its first use converts the GGUF)
        try:
            AutoTokenizer.from_pretrained(resolve_source(GEMMA)[0]).save_pretrained(folder / "tokenizer-gemma")
        except ModelError as err:
            print(f"no gemma3-270m tokenizer ({err}); --shape gemma3-270m will not run")
    for name, texts in (("news", news_articles()), ("wikipedia", wikipedia_articles()[:400])):
        with open(folder / f"{name}.jsonl", "w") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    print(f"wrote {folder}: " + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(folder.rglob("*"))
                                          if p.is_file()))


def model_dir(root: Path, inputs: Path, shape: str, smoke: bool) -> Path:
    """A folder with a config.json of that shape and the carried tokenizer: what `model.init: random` reads."""
    from transformers import AutoTokenizer

    folder = root / "models" / shape
    if (folder / "config.json").is_file():
        return folder
    shutil.copytree(inputs / TOKENIZERS.get(shape, "tokenizer"), folder)
    config = {**SHAPES[shape], **(SMOKE if smoke else {})}
    if smoke and "layer_types" in config:
        config["layer_types"] = config["layer_types"][: config["num_hidden_layers"]]
    tok = AutoTokenizer.from_pretrained(folder)
    config |= {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def sweep_config(model: Path, inputs: Path, device: str, *, ranks: list[int], steps: int, checkpoints: list[int],
                 batch: int, context: int, forgetting_tokens: int, reference: str = "memory") -> dict:
    return {
        "name": "gpu-check", "model": {"name": str(model), "init": "random", "dtype": "auto"},
        "finetune": {"dataset": str(inputs / "news.jsonl"), "heldout_max_tokens": 4 * context},
        "forgetting": {"dataset": str(inputs / "wikipedia.jsonl"), "max_tokens": forgetting_tokens,
                       "reference": reference},
        "method": {"name": "lora", "ranks": ranks},
        "train": {"steps": steps, "checkpoints": checkpoints, "batch_size": batch, "context_length": context,
                  "lr": 1e-4, "optimizer": "adafactor", "seed": 0, "device": device, "dtype": "auto",
                  "eval_batch_size": batch, "save_adapters": "none"},
    }


def rows(out: Path) -> dict[tuple[str, int], dict]:
    from forgetscale.store import Store

    with Store(out, create=False) as store:
        return {(r["run_id"], int(r["step"])): dict(r) for r in store.checkpoints()}


def linear_params(model: torch.nn.Module) -> int:
    """Parameters that enter a matrix product per token: every linear layer with the output head, not the
    embedding lookup (the adapters' own are negligible and left out)."""
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in name)


def step_flops(shape: dict, linear: int, batch: int, context: int) -> tuple[float, float]:
    """(4 x linear params x tokens: forward + the input gradients, no weight gradients of the frozen base;
    the causal attention scores and mixing, forward 2 x T x L x h per layer and backward twice that)."""
    tokens = batch * context
    width = shape["num_attention_heads"] * shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    attention = 6 * tokens * context * width * shape["num_hidden_layers"]  # sliding windows counted as full
    return 4 * linear * tokens, attention


# -- sections --------------------------------------------------------------------------------------------------

def section_matmul(args, device, results, clock) -> float:
    n, repeats = (8192, 20) if device.type == "cuda" else (1024, 5)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    rate = 2 * n**3 * repeats / (time.perf_counter() - started)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    datasheet = next((v for k, v in PEAK_BF16.items() if k in name), None)
    results["device"] = {"name": name, "torch": torch.__version__, "bf16_matmul_tflops": rate / 1e12,
                         "datasheet_tflops": datasheet and datasheet / 1e12}
    say(clock, f"device: {name}, torch {torch.__version__}; bf16 {n}x{n} matmul {rate / 1e12:.1f} TFLOP/s"
        + (f" (datasheet dense bf16 {datasheet / 1e12:.0f})" if datasheet else ""))
    return rate


def section_train(args, device, results, clock, rate: float) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from forgetscale.config import parse_config
    from forgetscale.sweep import run_sweep

    shape = args.shape
    folder = model_dir(args.work, args.inputs, shape, args.smoke)
    steps = args.steps
    batch, context = (8, 1024) if not args.smoke else (2, 64)
    cfg = sweep_config(folder, args.inputs, args.device, ranks=[16], steps=steps, checkpoints=[0, 2, steps],
                       batch=batch, context=context, forgetting_tokens=4 * context)
    out = args.work / "train"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    run_sweep(parse_config(cfg), out, progress=False)
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    stored = {step: row for (_, step), row in rows(out).items()}
    step_s = (stored[steps]["wall_s"] - stored[2]["wall_s"]) / (steps - 2)
    with torch.device("meta"):  # the shapes need no weights
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    total = sum(p.numel() for p in meta.parameters())
    linear = linear_params(meta)
    spec = json.loads((folder / "config.json").read_text())
    dense, attention = step_flops(spec, linear, batch, context)
    datasheet = results["device"]["datasheet_tflops"]
    figures = {"shape": shape, "params": total, "linear_params": linear, "batch": batch, "context": context,
               "steps": steps, "s_per_step": step_s, "tokens_per_s": batch * context / step_s,
               "mfu_measured": (dense + attention) / step_s / rate, "mfu_dense_only": dense / step_s / rate,
               "mfu_datasheet": datasheet and (dense + attention) / step_s / (datasheet * 1e12),
               "peak_gib": peak and peak / 2**30, "kl_step0": stored[0]["forget_kl"],
               "kl_last": stored[steps]["forget_kl"], "ft_loss": [stored[s]["ft_loss"] for s in sorted(stored)],
               "sweep_wall_s": wall}
    results["train"] = figures
    say(clock, f"train: {shape} ({total / 1e9:.2f}B params, {linear / 1e9:.2f}B in matmuls), LoRA r16 all linear, "
        f"{batch} x {context} tokens: {step_s * 1e3:.0f} ms/step over steps 3-{steps}, "
        f"{batch * context / step_s:,.0f} tokens/s")
    say(clock, f"train: MFU {figures['mfu_measured']:.1%} of the measured matmul rate "
        f"({(dense + attention) / step_s / 1e12:.0f} TFLOP/s of {rate / 1e12:.0f}; {figures['mfu_dense_only']:.1%} "
        "counting only 4 x linear params x tokens)"
        + (f", {figures['mfu_datasheet']:.1%} of the datasheet" if datasheet else ""))
    say(clock, f"train: peak CUDA memory {peak / 2**30:.1f} GiB ({peak / 1e9:.1f} GB)" if peak else "train: (no CUDA)")
    say(clock, f"train: KL at step 0 {stored[0]['forget_kl']!r} (exactly 0 expected), at step {steps} "
        f"{stored[steps]['forget_kl']:.5f}; ft_loss {', '.join(f'{v:.3f}' for v in figures['ft_loss'])}; "
        f"whole sweep {wall:.0f} s")


def lora_trainee(folder: Path, device: torch.device, dtype: torch.dtype, rank: int, checkpointing: bool = False):
    """A random base in `dtype` with LoRA on all linear layers, prepared as train_run prepares it."""
    from forgetscale.methods.attach import attach, skip_lora_input_casts, upcast_trainable
    from forgetscale.methods.lora import LoraSpec
    from forgetscale.models import enable_gradient_checkpointing, load_model
    from forgetscale.train import make_optimizer

    base = load_model(str(folder), device=device, dtype=dtype, init="random").model
    if checkpointing:
        enable_gradient_checkpointing(base)
    model = attach(base, LoraSpec(ranks=[rank]), rank).to(device)
    upcast_trainable(model)
    skip_lora_input_casts(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, make_optimizer("adafactor", params, 1e-4, 0.0)


def train_steps(model, optimizer, device: torch.device, vocab: int, batch: int, context: int, n: int) -> None:
    from forgetscale.metric.head import next_token_loss
    from forgetscale.metric.sums import autocast

    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
        mask = torch.ones_like(ids)
        with autocast(device, torch.bfloat16):
            loss = next_token_loss(model, ids, mask, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)


def cuda_kernels(prof) -> list:
    """The GPU kernels of a torch.profiler run (its CPU ops' device time would count them twice)."""
    return [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_seconds(prof, rules: list[tuple[str, tuple[str, ...]]]) -> dict[str, float]:
    """GPU seconds per group: a kernel joins the first group one of whose words its name holds, else
    'other kernels'."""
    seconds = {group: 0.0 for group, _ in rules} | {"other kernels": 0.0}
    for event in cuda_kernels(prof):
        name = event.key.lower()
        group = next((g for g, words in rules if any(w in name for w in words)), "other kernels")
        seconds[group] += (event.self_device_time_total or 0) / 1e6
    return seconds


def section_profile(args, device, results, clock) -> None:
    from torch.profiler import ProfilerActivity, profile

    folder = model_dir(args.work, args.inputs, args.shape, args.smoke)
    batch, context = (8, 1024) if not args.smoke else (2, 64)
    model, optimizer = lora_trainee(folder, device, torch.bfloat16, 16)
    vocab = model.get_input_embeddings().weight.shape[0]
    train_steps(model, optimizer, device, vocab, batch, context, 2)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        train_steps(model, optimizer, device, vocab, batch, context, 2)
    wall = time.perf_counter() - started
    found = kernel_seconds(prof, [("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
                                  ("matrix products", ("gemm", "cutlass", "sm90", "nvjet", "cublas", "matmul"))])
    optimizer_s = sum((e.self_device_time_total or 0) / 1e6 for e in prof.key_averages() if "Optimizer.step" in e.key)
    busy = sum(found.values())
    groups = {"matrix products": found["matrix products"], "attention": found["attention"],
              "optimizer (Adafactor)": optimizer_s,  # its kernels are elementwise: shown apart from the rest
              "other kernels": found["other kernels"] - optimizer_s}
    top = sorted(((e.self_device_time_total or 0) / 1e6, e.key) for e in cuda_kernels(prof))[-8:]
    results["profile"] = {"wall_s_two_steps": wall, "busy_s": busy, "groups_s": groups,
                          "top_kernels": [(k, s) for s, k in reversed(top)]}
    say(clock, f"profile (2 steps, {wall:.2f} s wall under the profiler): GPU busy {busy:.2f} s = "
        + ", ".join(f"{k} {v:.2f} s ({v / max(wall, 1e-9):.0%})" for k, v in groups.items())
        + f", idle {max(wall - busy, 0):.2f} s")
    for seconds, key in reversed(top):
        if seconds > 0:
            say(clock, f"profile:   {seconds * 1e3:8.1f} ms  {key[:110]}")
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


def section_measure(args, device, results, clock) -> None:
    from forgetscale.config import parse_config
    from forgetscale.methods.attach import attach, skip_lora_input_casts, upcast_trainable
    from forgetscale.metric.sums import autocast, score
    from forgetscale.sweep import build_context

    folder = model_dir(args.work, args.inputs, args.shape, args.smoke)
    batch, context = (8, 1024) if not args.smoke else (2, 64)
    tokens = args.measure_tokens if not args.smoke else 8 * context
    figures = {}
    for kind in ("memory", "disk", "recompute"):
        cfg = parse_config(sweep_config(folder, args.inputs, args.device, ranks=[16], steps=2, checkpoints=[0, 2],
                                        batch=batch, context=context, forgetting_tokens=tokens, reference=kind))
        out = args.work / f"measure-{kind}"
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        ctx = build_context(cfg, out)
        sync(device)
        built = time.perf_counter() - started
        model = attach(ctx.load_base(), cfg.methods[0], 16).to(device)
        upcast_trainable(model)
        skip_lora_input_casts(model)
        model.eval()
        space = ctx.workspace.on(device)
        timings = []
        for _ in range(2):  # the second is the figure (the first pays allocator and kernel warm-up)
            sync(device)
            started = time.perf_counter()
            value = score(model, ctx.forgetting, batch, device, ctx.measure_dtype, ctx.forgetting_ref, space)
            sync(device)
            timings.append(time.perf_counter() - started)
        plain = []
        for _ in range(2):
            sync(device)
            started = time.perf_counter()
            with torch.no_grad(), autocast(device, ctx.measure_dtype):
                for start in range(0, len(ctx.forgetting), batch):
                    part = ctx.forgetting.select(slice(start, start + batch))
                    model(input_ids=part.input_ids.to(device), attention_mask=part.attention_mask.to(device))
            sync(device)
            plain.append(time.perf_counter() - started)
        breakdown = None
        if device.type == "cuda":  # a third pass under the profiler: where the measuring time goes
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                score(model, ctx.forgetting, batch, device, ctx.measure_dtype, ctx.forgetting_ref, space)
                sync(device)
            breakdown = kernel_seconds(prof, [
                ("matrix products", ("gemm", "cutlass", "sm90", "nvjet", "cublas", "flash", "fmha")),
                ("host-to-device copies", ("htod", "memcpy"))])
            say(clock, f"measure ({kind}) on the GPU: " + ", ".join(f"{k} {v:.2f} s" for k, v in breakdown.items()))
        figures[kind] = {"breakdown_s": breakdown, "measure_s": timings[-1], "plain_forward_s": plain[-1], "ratio": timings[-1] / plain[-1],
                         "reference_build_s": built, "kl_step0": value["kl"], "tokens": ctx.forgetting.loss_tokens}
        say(clock, f"measure ({kind}): {ctx.forgetting.loss_tokens:,} forgetting tokens in {timings[-1]:.2f} s vs a "
            f"plain forward {plain[-1]:.2f} s ({timings[-1] / plain[-1]:.2f}x); KL {value['kl']!r} (0 expected: "
            f"the adapter starts at zero); context + reference built in {built:.1f} s")
        del model, ctx, space
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shutil.rmtree(out, ignore_errors=True)
    results["measure"] = figures


def section_memory(args, device, results, clock) -> None:
    folder = model_dir(args.work, args.inputs, "llama2-7b", args.smoke)
    batch, context = (8, 512) if not args.smoke else (2, 64)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    figures = {}
    for mode, dtype, checkpointing in (("bf16", torch.bfloat16, False), ("bf16+checkpointing", torch.bfloat16, True),
                                       ("fp32", torch.float32, False)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        model, optimizer = lora_trainee(folder, device, dtype, 8, checkpointing)
        weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        train_steps(model, optimizer, device, vocab, batch, context, 1)
        sync(device)
        timed = time.perf_counter()
        train_steps(model, optimizer, device, vocab, batch, context, 1)
        step_s = time.perf_counter() - timed
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        computed = COMPUTED_7B[mode]
        figures[mode] = {"weights_gb": weights / 1e9, "peak_gb": peak / 1e9, "computed_weights_gb": computed[0],
                         "computed_total_gb": computed[1], "s_per_step": step_s, "total_s": time.perf_counter() - started}
        say(clock, f"memory ({mode}): weights {weights / 1e9:.1f} GB (computed {computed[0]}), peak "
            f"{peak / 1e9:.1f} GB (computed {computed[1]}), {step_s:.2f} s/step")
        del model, optimizer
    results["memory"] = figures


def section_resume(args, device, results, clock) -> None:
    from forgetscale.config import parse_config
    from forgetscale.sweep import run_sweep

    folder = model_dir(args.work, args.inputs, "llama3-1b", args.smoke)
    steps, checkpoints = 16, [0, 4, 8, 16]
    batch, context = (8, 512) if not args.smoke else (2, 64)
    cfg = sweep_config(folder, args.inputs, args.device, ranks=[4, 16], steps=steps, checkpoints=checkpoints,
                       batch=batch, context=context, forgetting_tokens=4 * context)
    started = time.perf_counter()
    run_sweep(parse_config(cfg), args.work / "clean", progress=False)
    clean = rows(args.work / "clean")
    clean_s = time.perf_counter() - started
    run_sweep(parse_config(cfg), args.work / "again", progress=False)  # the floor: two uninterrupted sweeps
    again = rows(args.work / "again")
    path = args.work / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = args.work / "resumed"
    cmd = [sys.executable, "-m", "forgetscale", "sweep", str(path), "--out", str(out), "--no-progress"]
    kill_after = len(checkpoints) + 2  # the first run whole, the second's step 0 and its first trained checkpoint
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    stored: list = []
    while proc.poll() is None:
        if (out / "results.sqlite").exists():
            try:
                stored = sorted(rows(out))
            except Exception:  # noqa: BLE001 - the store is being created
                stored = []
            if len(stored) >= kill_after:
                break
        time.sleep(0.1)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if not killed:
        raise RuntimeError(f"the sweep ended (exit {proc.returncode}) before it could be killed: "
                           f"{proc.stderr.read().decode()[-500:]}")
    stored = sorted(rows(out))
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    resume_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"resume exited {done.returncode}: {done.stderr[-500:]}")
    resumed = rows(out)
    if sorted(resumed) != sorted(clean):
        raise RuntimeError(f"resume: rows {sorted(resumed)} vs {sorted(clean)}")
    worst = {c: max(abs(resumed[k][c] - clean[k][c]) for k in clean) for c in VALUES}
    floor = {c: max(abs(again[k][c] - clean[k][c]) for k in clean) for c in VALUES}
    per_row = {f"{k[0][:8]}@{k[1]}": {"resumed": abs(resumed[k]["forget_kl"] - clean[k]["forget_kl"]),
                                      "again": abs(again[k]["forget_kl"] - clean[k]["forget_kl"])} for k in sorted(clean)}
    results["resume"] = {"rows": len(clean), "stored_at_kill": len(stored), "max_abs_difference": worst,
                         "two_clean_sweeps_max_abs_difference": floor, "forget_kl_difference_per_row": per_row,
                         "clean_sweep_s": clean_s, "resume_s": resume_s}

    def shown(diff: dict) -> str:
        return ("bit-identical" if all(v == 0 for v in diff.values()) else
                "max |difference| " + ", ".join(f"{c} {v:.1e}" for c, v in diff.items()))

    say(clock, f"resume: killed with {len(stored)} of {len(clean)} rows stored, resumed in {resume_s:.0f} s "
        f"(uninterrupted sweep {clean_s:.0f} s): resumed vs uninterrupted {shown(worst)}; two uninterrupted "
        f"sweeps: {shown(floor)}")
    for key, diff in per_row.items():
        say(clock, f"resume:   forget_kl |difference| at {key}: resumed {diff['resumed']:.1e}, again {diff['again']:.1e}")


def section_trainer(args, device, results, clock) -> None:
    """The path of users who train elsewhere: a transformers Trainer (bf16) with PEFT LoRA and the
    ForgettingCallback on a Llama-3.2-1B-shaped model, its rows stored, then one measurement timed."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from forgetscale.data.blocks import pack_documents
    from forgetscale.integrations import ForgettingCallback
    from forgetscale.metric.sums import autocast
    from forgetscale.models import load_model

    folder = model_dir(args.work, args.inputs, "llama3-1b", args.smoke)
    batch, context, steps = (8, 512, 20) if not args.smoke else (2, 64, 4)
    loaded = load_model(str(folder), device=device, dtype=torch.bfloat16 if device.type == "cuda" else
                        torch.float32, init="random")
    texts = [json.loads(line)["text"] for line in open(args.inputs / "news.jsonl")]
    blocks = pack_documents(texts, loaded.tokenizer, context)
    train = [{"input_ids": blocks.input_ids[i], "attention_mask": blocks.attention_mask[i],
              "labels": blocks.labels[i]} for i in range(len(blocks))]
    model = get_peft_model(loaded.model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
    run_dir = args.work / "trainer"
    callback = ForgettingCallback(str(args.inputs / "wikipedia.jsonl"), max_tokens=8 * context,
                                  block_length=context, every_steps=steps // 2, on_evaluate=False, run_dir=run_dir,
                                  tokenizer=loaded.tokenizer)
    training = TrainingArguments(output_dir=str(args.work / "trainer-out"), per_device_train_batch_size=batch,
                                 max_steps=steps, learning_rate=1e-4, bf16=device.type == "cuda",
                                 logging_steps=steps // 2, save_strategy="no", report_to=[], seed=0,
                                 use_cpu=device.type != "cuda", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training, train_dataset=train, callbacks=[callback])
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    stored = {step: row for (_, step), row in rows(run_dir).items()}
    measured = []
    for _ in range(2):
        sync(device)
        began = time.perf_counter()
        callback.meter.measure(model)
        sync(device)
        measured.append(time.perf_counter() - began)
    part = callback.meter.blocks
    sync(device)
    began = time.perf_counter()
    with torch.no_grad(), autocast(device, callback.meter.dtype):
        for start in range(0, len(part), 8):
            chunk = part.select(slice(start, start + 8))
            model(input_ids=chunk.input_ids.to(device), attention_mask=chunk.attention_mask.to(device))
    sync(device)
    plain = time.perf_counter() - began
    logged = [entry for entry in trainer.state.log_history if "forgetting/kl" in entry]
    results["trainer"] = {"steps": steps, "train_wall_s": wall, "rows": {s: stored[s]["forget_kl"] for s in stored},
                          "logged": len(logged), "measure_s": measured[-1], "plain_forward_s": plain,
                          "measure_dtype": str(callback.meter.dtype)}
    say(clock, f"trainer: Trainer(bf16) + PEFT LoRA r16 + ForgettingCallback(every {steps // 2} steps), {steps} "
        f"steps of {batch} x {context} in {wall:.1f} s; stored KL by step "
        + ", ".join(f"{s}: {v['forget_kl']:.3g}" for s, v in sorted(stored.items()))
        + f"; {len(logged)} measurements in log_history; one measurement {measured[-1]:.2f} s vs a plain forward "
        f"{plain:.2f} s ({measured[-1] / plain:.2f}x), measuring in {callback.meter.dtype}")


SECTIONS = {"matmul": None, "train": section_train, "profile": section_profile, "measure": section_measure,
            "memory": section_memory, "resume": section_resume, "trainer": section_trainer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, default=Path("gpu_inputs"), help="from --export-inputs")
    parser.add_argument("--export-inputs", type=Path, metavar="DIR", help="write the tokenizer and texts, then stop")
    parser.add_argument("--out", type=Path, default=None, help="where gpu_check.json is written")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", choices=("full", "smoke"), default="full", help="smoke: tiny shapes, for CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--shape", choices=("llama3-8b", "gemma3-270m"), default="llama3-8b",
                        help="the model of the train, profile and measure sections")
    parser.add_argument("--steps", type=int, default=12, help="training steps of the 8B sweep (2..N are timed)")
    parser.add_argument("--measure-tokens", type=int, default=8192)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; a section is skipped once it is spent")
    args = parser.parse_args()
    if args.export_inputs:
        export_inputs(args.export_inputs, args.shape == "gemma3-270m")
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
                 "pass --device cpu --scale smoke for a rehearsal")
    if not (args.inputs / "tokenizer").is_dir():
        sys.exit(f"gpu_check: {args.inputs}/tokenizer is missing; run --export-inputs {args.inputs} where the "
                 "embedded model is installed")
    args.smoke = args.scale == "smoke"
    args.inputs = args.inputs.resolve()
    clock = Clock(args.budget)
    results: dict = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-work-") as work:
        args.work = Path(work)
        rate = section_matmul(args, device, results, clock)
        for name in args.sections.split(","):
            if name == "matmul":
                continue
            if clock.left() <= 0:
                say(clock, f"{name}: skipped, the {args.budget:.0f} s budget is spent")
                results.setdefault("skipped", []).append(name)
                continue
            say(clock, f"{name}: starting")
            try:
                if name == "train":
                    section_train(args, device, results, clock, rate)
                else:
                    SECTIONS[name](args, device, results, clock)
            except Exception as err:  # noqa: BLE001 - report and go on: one broken section must not hide the rest
                results.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
                say(clock, f"{name}: FAILED: {type(err).__name__}: {str(err)[:600]}")
                traceback.print_exc(file=sys.stdout)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    say(clock, f"done; figures in {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
