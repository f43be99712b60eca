"""Suite-wide settings. Fixtures live in ``tests/support`` and are imported where used."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from hypothesis import settings

# Deterministic property tests everywhere: a failure reproduces on every run and machine.
settings.register_profile("livemig", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("livemig")


@pytest.fixture(autouse=True)
def _no_thread_under_a_mock_clock(request: pytest.FixtureRequest) -> Iterator[None]:
    """A worker thread under trio's autojump clock lets virtual time leap past every deadline
    while the thread runs, so a busy machine changes how a test ends: a test on the mock clock
    that starts one fails at once, saying so (pass ``journal=MemoryJournal()`` to a fake run)."""
    if "autojump_clock" not in request.fixturenames:
        yield
        return

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError(
            f"a worker thread under the autojump clock (a FileJournal in a fake run?): {args[:1]}"
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trio.to_thread, "run_sync", refuse)
        yield
