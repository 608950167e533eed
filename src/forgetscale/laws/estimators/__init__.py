"""The laws as fit/predict estimators and their numerical machinery; reads rows, never files.

Importing the package imports every law module, so each has added itself to registry.LAWS.
"""

from forgetscale.laws.estimators import joint, linear, multiplicative, power  # noqa: F401  (register the laws)
from forgetscale.laws.estimators.registry import LAWS, ORDER

assert set(LAWS.names()) == set(ORDER), "every law in ORDER, every law registered"
