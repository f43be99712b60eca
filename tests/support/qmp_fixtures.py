"""Fixtures for tests that talk QMP through `livemig.drivers.qmp`.

The driver runs qemu.qmp on a trio-asyncio loop. pytest-trio runs a trio fixture in the test's
context only when the test names it in its signature (autouse and ``usefixtures`` fixtures run
elsewhere, and their loop is not seen inside the test). So import the fixture under its Python name
and request it by its fixture name::

    from support.qmp_fixtures import aio_loop_fixture  # noqa: F401  (provides "aio_loop")

    async def test_something(aio_loop: object) -> None: ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio_asyncio

__all__ = ["aio_loop_fixture"]


@pytest.fixture(name="aio_loop")
async def aio_loop_fixture() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    """The trio-asyncio loop for the test, open for its whole duration."""
    async with trio_asyncio.open_loop() as loop:
        yield loop
