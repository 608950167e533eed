"""Fine-tuning methods: one module per method holding its spec (the settings config validates) and its
attach function (what training calls), tied by one `register_method` call. Torch-free to import: torch and
peft are imported inside the attach functions, so config validates `method:` entries without them.

Adding a method: one module here (spec class, attach function, `register_method(Spec, attach=fn)`), its
import below, and a row in tests/test_contracts.py.
"""

from forgetscale.methods.base import (
    ALL_LINEAR,
    ATTENTION,
    METHODS,
    MethodSpec,
    adapter_methods,
    register_method,
)
from forgetscale.methods.full import FullSpec
from forgetscale.methods.ia3 import IA3Spec
from forgetscale.methods.lora import DoraSpec, LoraSpec
from forgetscale.methods.top_layers import TopLayersSpec

__all__ = ["ALL_LINEAR", "ATTENTION", "METHODS", "DoraSpec", "FullSpec", "IA3Spec", "LoraSpec", "MethodSpec",
           "TopLayersSpec", "adapter_methods", "register_method"]
