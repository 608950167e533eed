"""What tests/test_distributed.py starts on 2 processes the way users do (`torchrun --nproc_per_node 2` or
`accelerate launch --cpu --num_processes 2`), on the tiny random Llama, gloo on CPU. Not collected by pytest.

    python tests/distributed_run.py MODE OUT_DIR

MODE:
- sft: TRL SFTTrainer + PEFT LoRA under DDP with the ForgettingCallback (every step, a run_dir), a checkpoint
  saved every step so one process can measure the same weights afterwards; TRL's default bf16=True, so the
  callback's measuring precision (fp32 weights: fp32) is checked against `forgetscale measure`'s too;
- fsdp: LoRA on the tiny model sharded with torch's fully_shard (FSDP2), the callback driven by a plain loop
  (accelerate 1.16 runs FSDP on GPUs only; see docs/integrations.md), one optimizer step per callback step;
- mismatch: rank 1 asks for another forgetting.max_tokens than rank 0;
- too-many: fewer forgetting blocks (1) than processes (2).
Each rank writes OUT_DIR/rank<R>.json: the callback's numbers per step (and the error it raised, if any).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

MAX_TOKENS, LENGTH = 224, 32  # 7 blocks: 2 ranks get 4 and 3 (a world size that does not divide them)


def seeded_lora(model, seed: int = 3):
    """A LoRA with non-zero B (so the model differs from the base), the same on every process."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    tuned = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return tuned


def texts() -> list[str]:
    from forgetscale.data.embedded import news_articles

    return [t[:300] for t in news_articles()[:16]]


def _results(callback) -> dict[str, dict]:
    return {str(step): r.as_dict() for step, r in callback.results.items()}


def sft(out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from forgetscale.integrations import ForgettingCallback
    from forgetscale.models import load_model

    base = load_model("tiny-random-llama")
    callback = ForgettingCallback(max_tokens=MAX_TOKENS, block_length=LENGTH, every_steps=1, run_dir=out / "run")
    args = SFTConfig(output_dir=str(out / "sft"), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-3,
                     logging_steps=1, report_to=[], use_cpu=True, save_strategy="steps", save_steps=1,
                     disable_tqdm=True, max_length=LENGTH, seed=0)  # TRL's default bf16=True: trains in bf16
    trainer = SFTTrainer(model=base.model, args=args, train_dataset=Dataset.from_dict({"text": texts()}),
                         processing_class=base.tokenizer, callbacks=[callback],
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "forgetting/kl" in e]
    return {"results": _results(callback), "logged": logged, "wrapped": type(trainer.model_wrapped).__name__,
            "bf16": bool(args.bf16), "measuring_dtype": str(callback.meter.dtype),
            "blocks": [callback.meter.shard.start, callback.meter.shard.stop], "reference_rows": callback.meter.ref.tokens}


def fsdp(out: Path) -> dict:
    from types import SimpleNamespace

    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState

    from forgetscale.integrations import ForgettingCallback
    from forgetscale.models import load_model

    base = load_model("tiny-random-llama")
    model = seeded_lora(base.model)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    callback = ForgettingCallback(max_tokens=MAX_TOKENS, block_length=LENGTH, every_steps=1, run_dir=out / "run")
    args = SimpleNamespace(output_dir=str(out / "fsdp"), run_name="fsdp", seed=0, max_steps=1, bf16=False, fp16=False)
    state, control = TrainerState(max_steps=1), TrainerControl()
    callback.on_train_begin(args, state, control, model=model, processing_class=base.tokenizer)
    state.global_step = 1
    callback.on_step_end(args, state, control, model=model)
    callback.on_train_end(args, state, control)
    from torch.distributed.tensor import DTensor

    from forgetscale.metric.head import sharded

    return {"results": _results(callback), "sharded": sharded(model),
            "dtensors": [sum(isinstance(p, DTensor) for p in model.parameters()), len(list(model.parameters()))]}


def bad(out: Path, mode: str, rank: int) -> dict:
    from forgetscale.integrations import ForgettingCallback
    from forgetscale.models import load_model

    base = load_model("tiny-random-llama")
    tokens = {"mismatch": MAX_TOKENS if rank == 0 else 2 * MAX_TOKENS, "too-many": LENGTH - 1}[mode]
    callback = ForgettingCallback(max_tokens=tokens, block_length=LENGTH, every_steps=1)
    from transformers import TrainerControl, TrainerState

    callback.on_train_begin(None, TrainerState(), TrainerControl(), model=base.model, processing_class=base.tokenizer)
    return {"results": {}}


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if not torch.distributed.is_initialized() and mode != "sft":  # the Trainer initialises its own
        torch.distributed.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0"))
    try:
        data = sft(out) if mode == "sft" else fsdp(out) if mode == "fsdp" else bad(out, mode, rank)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which checks every rank failed alike
        data = {"error": f"{type(exc).__name__}: {exc}"}
    (out / f"rank{rank}.json").write_text(json.dumps(data))
    return 0 if "error" not in data else 3


if __name__ == "__main__":
    sys.exit(main())
