"""Capability checks on generations (`forgetscale eval`): what a fine-tuned model lost, next to how
much it moved. Suites: safety (refusals of harmful requests), choice (multiple-choice accuracy and
agreement with the base model, two scoring protocols), samples (side-by-side replies).

Their settings are config (forgetscale.config.evals); the suites register when
forgetscale.evals.runner is imported.
"""
