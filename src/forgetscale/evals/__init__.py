"""Capability checks on generations (`forgetscale eval`): what a fine-tuned model lost, next to how
much it moved. Suites: safety (refusals of harmful requests), choice (multiple-choice accuracy and
agreement with the base model, two scoring protocols), samples (side-by-side replies), and the
lm-eval:TASK family (lm-evaluation-harness tasks).

One module per suite holds its settings (the `evals.<suite>` key config validates) and its
functions, tied by one `register_suite` (or `register_family`) call; importing this package registers
them all, without torch (runner.py, generation.py and items.py do the torch and data work).

Adding a suite: one module here (settings class, load / evaluate / summarize, `register_suite`), its
import below, a test in tests/test_evals.py on the tiny model. The import order is the order of the
`evals:` keys and of the suites in messages.
"""

from forgetscale.evals import safety, choice, samples, lmeval  # noqa: F401, I001  (register, in this order)
from forgetscale.evals.suites import FAMILIES, SETTINGS, SUITES, register_family, register_suite, suite_for, suite_names

__all__ = ["FAMILIES", "SETTINGS", "SUITES", "register_family", "register_suite", "suite_for", "suite_names"]
