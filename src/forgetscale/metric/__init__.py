"""The forgetting metric, the project's central number, in one package: cross-entropy (and its KL part) of a
tuned model against the base model's own predictions on general text.

- `sums`: the one loop that adds up every stored number from a batch's logits (`score`);
- `references`: where the base predictions live (memory, disk, recompute, topk:K) and which fits (`choose`);
- `head`: the output head a few rows at a time (the training loss and the measuring logits, no [tokens x
  vocabulary] tensor per batch);
- `meter`: the notebook API, `ForgettingMeter` (build once on the base, `measure` any tuned model, intervals
  over blocks), used by the Trainer callback and `forgetscale measure`.
"""

from forgetscale.metric.meter import ForgettingMeter, ForgettingResult, block_interval, block_se

__all__ = ["ForgettingMeter", "ForgettingResult", "block_interval", "block_se"]
