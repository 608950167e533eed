"""Configuration: a sweep is one YAML file validated in one pass into frozen pydantic sections.

sweep.py holds every section and key (defaults live there and nowhere else), evals.py the `evals:` section,
loading.py reading YAML, `--set` overrides and the one error formatter. The specs it validates with come
from below: forgetscale.schema (the base classes, the keys every data source shares) and the method, arm
and suite registrations (forgetscale.methods, forgetscale.mitigations, forgetscale.evals). Torch-free:
`import forgetscale.config` never loads a model library.
"""

from forgetscale.config.evals import EvalsConfig
from forgetscale.config.loading import (
    apply_overrides,
    error_message,
    load_config,
    parse_config,
    parse_overrides,
    validate_section,
)
from forgetscale.config.sweep import (
    FinetuneConfig,
    ForgettingConfig,
    ModelConfig,
    ResourcesConfig,
    SweepConfig,
    TrainConfig,
)
from forgetscale.schema import Section, SourceSpec

__all__ = ["EvalsConfig", "FinetuneConfig", "ForgettingConfig", "ModelConfig", "ResourcesConfig", "Section",
           "SourceSpec", "SweepConfig", "TrainConfig", "apply_overrides", "error_message", "load_config",
           "parse_config", "parse_overrides", "validate_section"]
