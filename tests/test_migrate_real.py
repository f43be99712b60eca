"""Real migrations of the real test guest, both storage modes, with every invariant checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from support.guest_fixtures import guest_image_fixture  # noqa: F401 - provides "guest_image"
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401 - provides "aio_loop"

from fsm.events import Event, Outcome, StateEntered
from fsm.plan import Plan
from fsm.runner import migrate
from guest import GuestImage
from guest._lab import Storage, migration_lab

pytestmark = pytest.mark.qemu

NON_SHARED_PATH = [
    "idle",
    "connected",
    "capabilities-set",
    "snapshotted",
    "mirroring",
    "state-transfer",
    "pre-switchover",
    "finalized",
]
SHARED_PATH = [s for s in NON_SHARED_PATH if s not in ("snapshotted", "mirroring")]


@pytest.mark.parametrize(
    ("storage", "dirty", "path"),
    [("non-shared", 50, NON_SHARED_PATH), ("shared", 50, SHARED_PATH)],
)
async def test_live_migration_keeps_every_write(
    guest_image: GuestImage,
    aio_loop: object,
    tmp_path: Path,
    storage: Storage,
    dirty: int,
    path: list[str],
) -> None:
    events: list[Event] = []
    with trio.fail_after(120):
        async with migration_lab(
            guest_image,
            tmp_path,
            storage=storage,
            dirty_mib_s=dirty,
        ) as lab:
            plan = Plan.create(
                source_qmp=lab.source_qmp,
                target_qmp=lab.target_qmp,
                storage=storage,
                work_dir=tmp_path,
            )
            result = await migrate(plan, on_event=events.append)
            assert result.outcome is Outcome.FINALIZED, result.error
            assert list(result.states) == path
            assert [e.state for e in events if isinstance(e, StateEntered)] == path
            verdict = await lab.verify(expect="target")
    assert verdict.ok, verdict.problems
    assert verdict.records.checked > 0
    assert result.downtime_ms is not None
    assert result.ram_bytes
