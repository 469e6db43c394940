"""Suite-wide settings: a hypothesis profile fit for a shared, noisy 2-core machine.

Profiles (docs/TESTING.md): ``fast`` (15 examples, ``scripts/test --fast``), ``ci`` (the
default, 60 examples), ``dev`` (100) and ``thorough`` (2000), chosen with
``HYPOTHESIS_PROFILE=...`` or ``--hypothesis-profile=...``. The others inherit ``ci``'s
deadline, health-check and blob settings.

The profile is loaded here, before pytest imports any test module, because the stateful
machines in tests/crdt read ``settings().max_examples`` at import time. scripts/soak_crdt.py
imports this module for the same reason.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("fast", parent=settings.get_profile("ci"), max_examples=15)
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=100)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
