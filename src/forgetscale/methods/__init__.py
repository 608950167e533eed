"""Fine-tuning methods. The specs (config, torch-free) are re-exported here; `attach` and
`trainable_parameters`, which need torch, live in forgetscale.methods.attach.

Adding a method: a spec class in forgetscale/config/methods.py (registered in METHODS), an attach function in attach.py
(registered in ATTACH under the same name), and a row in tests/test_contracts.py.
"""

from forgetscale.config.methods import (
    ALL_LINEAR,
    ATTENTION,
    METHODS,
    DoraSpec,
    FullSpec,
    IA3Spec,
    LoraSpec,
    MethodSpec,
    TopLayersSpec,
    adapter_methods,
)

__all__ = ["ALL_LINEAR", "ATTENTION", "METHODS", "DoraSpec", "FullSpec", "IA3Spec", "LoraSpec", "MethodSpec",
           "TopLayersSpec", "adapter_methods"]
