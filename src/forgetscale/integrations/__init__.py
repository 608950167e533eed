"""Forgetting inside the trainers people already use: `ForgettingCallback` for transformers' Trainer and
TRL's trainers (SFTTrainer, DPOTrainer, ... all run the same callback events). See docs/integrations.md."""

from forgetscale.integrations.callback import ForgettingCallback

__all__ = ["ForgettingCallback"]
