"""Real migrations of the real test guest, both storage modes, with every invariant checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from support.guest_fixtures import guest_image_fixture  # noqa: F401 - provides "guest_image"
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401 - provides "aio_loop"

from livemig.fsm.events import Event, Outcome, StateEntered, Steered
from livemig.fsm.plan import Plan, Policy
from livemig.fsm.runner import migrate
from livemig.guest import GuestImage
from livemig.guest._lab import Lab, Storage, migration_lab

pytestmark = pytest.mark.qemu

NON_SHARED_PATH = [
    "idle",
    "connected",
    "capabilities-set",
    "snapshotted",
    "mirroring",
    "state-transfer",
    "pre-switchover",
    "switched-over",
    "finalized",
]
SHARED_PATH = [s for s in NON_SHARED_PATH if s not in ("snapshotted", "mirroring")]


def plan_for(lab: Lab, work_dir: Path, policy: Policy | None = None) -> Plan:
    """A plan migrating the lab's guest in its own storage mode."""
    return Plan.create(
        source_qmp=lab.source_qmp,
        target_qmp=lab.target_qmp,
        storage=lab.storage,
        work_dir=work_dir,
        policy=policy,
    )


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
            result = await migrate(plan_for(lab, tmp_path), on_event=events.append)
            assert result.outcome is Outcome.FINALIZED, result.error
            assert list(result.states) == path
            assert [e.state for e in events if isinstance(e, StateEntered)] == path
            verdict = await lab.verify(expect="target")
    assert verdict.ok, verdict.problems
    assert verdict.records.checked > 0
    assert result.downtime_ms is not None
    assert result.ram_bytes
    # The downtime window, as livemig lived it: QEMU's own stamp of the pause comes first (a
    # moment before livemig received the event), and the target's cont closes it.
    whats = [what for _, what in result.switchover]
    assert whats[0] == "source emitted pre-switchover", result.switchover
    assert -1000.0 < result.switchover[0][0] <= 0.0
    assert whats[-2:] == ["← target cont", "window closed"]
    print(json.dumps(result.to_json()["switchover"]))


async def test_guest_dirtying_flat_out_converges_under_the_default_policy(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path
) -> None:
    with trio.fail_after(180):
        async with migration_lab(
            guest_image, tmp_path, dirty_mib_s="max", dirty_buf_mib=128
        ) as lab:
            result = await migrate(plan_for(lab, tmp_path))
            assert result.outcome is Outcome.FINALIZED, result.error
            verdict = await lab.verify(expect="target")
    assert verdict.ok, verdict.problems


async def test_postcopy_finishes_a_migration_that_cannot_converge(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path
) -> None:
    # 16 MiB/s cannot keep up with a guest dirtying flat out; with no downtime raise and no
    # throttle on the ladder, the first stall switches to post-copy.
    policy = Policy(
        max_bandwidth=16 << 20,
        auto_converge=False,
        max_downtime_ms=300,
        stall_seconds=1.0,
        stall_passes=1,
        postcopy=True,
    )
    events: list[Event] = []
    with trio.fail_after(180):
        async with migration_lab(
            guest_image, tmp_path, dirty_mib_s="max", dirty_buf_mib=128
        ) as lab:
            result = await migrate(plan_for(lab, tmp_path, policy), on_event=events.append)
            assert result.outcome is Outcome.FINALIZED, result.error
            assert result.states[-3:] == ("pre-switchover", "post-copy", "finalized")
            assert any(isinstance(e, Steered) and e.action == "StartPostcopy" for e in events)
            verdict = await lab.verify(expect="target")
    assert verdict.ok, verdict.problems
