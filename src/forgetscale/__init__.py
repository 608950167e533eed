"""forgetscale: measure, explain and forecast forgetting when fine-tuning language models."""

__version__ = "0.1.0"
