"""Shared test configuration: Hypothesis profiles.

`ci` (the default) is deterministic: derandomized, no example database, no deadline.
`thorough` draws >= 20,000 examples per property; choose it with
`NANLAB_HYPOTHESIS_PROFILE=thorough pytest`.
"""

import os

from hypothesis import HealthCheck, settings

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
