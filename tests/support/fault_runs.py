"""The pytest side of fake fault runs (the runs themselves are :mod:`livemig.model.runs`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from livemig.model.runs import without_fsync

__all__ = ["no_fsync_fixture"]


@pytest.fixture(name="no_fsync", autouse=True)
def no_fsync_fixture() -> Iterator[None]:
    """No ``fsync`` in fake runs (see :func:`livemig.model.runs.without_fsync`). Import it to use
    it (autouse)::

        from support.fault_runs import no_fsync_fixture  # noqa: F401 - autouse
    """
    with without_fsync():
        yield
