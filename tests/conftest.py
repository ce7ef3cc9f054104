"""Shared test configuration: Hypothesis profiles, and no writes into the user's cache directory.

`ci` (the default) is deterministic: derandomized, no example database, no deadline.
`thorough` draws >= 20,000 examples per property; choose it with
`NANLAB_HYPOTHESIS_PROFILE=thorough pytest`.
"""

import os

from hypothesis import HealthCheck, settings

# The CLIs turn on JAX's persistent compilation cache in ~/.cache/nanlab by default; the tests that
# want one set their own (tests/test_train.py), the others leave JAX's configuration alone.
os.environ.setdefault("NANLAB_COMPILE_CACHE", "off")

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("NANLAB_HYPOTHESIS_PROFILE", "ci"))
