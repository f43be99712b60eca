"""Suite-wide settings. Fixtures live in ``tests/support`` and are imported where used."""

from __future__ import annotations

from hypothesis import settings

# Deterministic property tests everywhere: a failure reproduces on every run and machine.
settings.register_profile("livemig", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("livemig")
