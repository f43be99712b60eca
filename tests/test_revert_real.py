"""A migration stopped in each state reverts: the guest runs on the source with every write it
made (the overlay merged back), and nothing is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from support.guest_fixtures import guest_image_fixture  # noqa: F401 - provides "guest_image"
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401 - provides "aio_loop"

from livemig.fsm.events import Event, Outcome, StateEntered
from livemig.fsm.plan import Plan
from livemig.fsm.runner import migrate
from livemig.guest import GuestImage
from livemig.guest._lab import Storage, migration_lab

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize(
    ("storage", "stop_in"),
    [
        ("non-shared", "connected"),
        ("non-shared", "snapshotted"),
        ("non-shared", "mirroring"),
        ("non-shared", "state-transfer"),
        ("non-shared", "pre-switchover"),
        ("shared", "state-transfer"),
        ("shared", "pre-switchover"),
    ],
)
async def test_interrupt_in_state_reverts_to_source(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path, storage: Storage, stop_in: str
) -> None:
    interrupt = trio.Event()

    def on_event(event: Event) -> None:
        if isinstance(event, StateEntered) and event.state == stop_in:
            interrupt.set()

    with trio.fail_after(120):
        async with migration_lab(guest_image, tmp_path, storage=storage, dirty_mib_s=20) as lab:
            plan = Plan.create(
                source_qmp=lab.source_qmp,
                target_qmp=lab.target_qmp,
                storage=storage,
                work_dir=tmp_path,
            )
            result = await migrate(plan, on_event=on_event, interrupt=interrupt)
            assert result.outcome is Outcome.REVERTED, result
            assert result.states[-2:] == (stop_in, "reverted")
            assert result.error_type == "Interrupted"
            assert result.undo_failures == ()
            # The guest keeps writing on the source after the revert.
            before = lab.source_console.last_acked
            with trio.fail_after(10):
                await lab.source_console.wait_heartbeat(before + 5)
            verdict = await lab.verify(expect="source")
    assert verdict.ok, verdict.problems
    assert verdict.records.checked > 0
