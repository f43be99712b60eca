"""Stateful stop on real QEMU: forced (both storage modes) and by fallback (a source whose vdi
disk blocks live migration), and faults in the save, in the saved state and in the restore —
the guest resumes on the source with every record, nothing left behind."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
import trio
from support.guest_fixtures import guest_image_fixture  # noqa: F401 - provides "guest_image"
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401 - provides "aio_loop"

from livemig.drivers import runstate
from livemig.drivers.qmp import open_monitor
from livemig.drivers.status import RunState
from livemig.fsm.events import Event, MigrationResult, Outcome, StateEntered
from livemig.fsm.plan import Plan
from livemig.fsm.runner import migrate
from livemig.guest import GuestImage
from livemig.guest._lab import Lab, Storage, migration_lab, realistic_migration_lab

pytestmark = pytest.mark.qemu

NON_SHARED_PATH = (
    "idle", "connected", "capabilities-set", "snapshotted", "mirroring", "state-saved",
    "switched-over", "finalized",
)  # fmt: skip
SHARED_PATH = tuple(s for s in NON_SHARED_PATH if s not in ("snapshotted", "mirroring"))


def plan_for(lab: Lab, work_dir: Path, transfer: str) -> Plan:
    return Plan.create(
        source_qmp=lab.source_qmp,
        target_qmp=lab.target_qmp,
        storage=lab.storage,
        work_dir=work_dir,
        run_id="ss1",
        transfer=transfer,
    )


@pytest.mark.parametrize(
    ("storage", "path"), [("non-shared", NON_SHARED_PATH), ("shared", SHARED_PATH)]
)
async def test_a_forced_stateful_stop_moves_the_guest_with_every_write(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path, storage: Storage, path: tuple[str]
) -> None:
    with trio.fail_after(180):
        async with migration_lab(guest_image, tmp_path, storage=storage, dirty_mib_s=20) as lab:
            result = await migrate(plan_for(lab, tmp_path, "stateful-stop"))
            assert result.outcome is Outcome.FINALIZED, result.error
            assert result.states == path
            assert (result.transfer, result.fallback) == ("stateful-stop", None)
            verdict = await lab.verify(expect="target")
    assert verdict.ok, verdict.problems
    assert verdict.records.checked > 0
    # The downtime is the whole pause, from the source's stop to the target's cont.
    assert result.downtime_ms is not None
    assert result.downtime_ms > 0
    whats = [what for _, what in result.switchover]
    assert whats[0] == "source stop answered", whats
    assert "source saved the state" in whats
    assert "target loaded the state" in whats
    assert whats[-2:] == ["← target cont", "window closed"]
    assert result.downtime_ms >= result.switchover[-1][0] - 50


async def test_a_vdi_disk_blocks_live_migration_and_falls_back_to_a_stateful_stop(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path
) -> None:
    """QEMU refuses to migrate a vdi disk live (its blocker, in ``query-migrate``): ``auto``
    saves the state in mode cpr-reboot instead, which that blocker does not stop, and the
    result says why."""
    with trio.fail_after(180):
        async with migration_lab(
            guest_image, tmp_path, storage="non-shared", dirty_mib_s=20, disk_format="vdi"
        ) as lab:
            result = await migrate(plan_for(lab, tmp_path, "auto"))
            assert result.outcome is Outcome.FINALIZED, result.error
            assert result.states == NON_SHARED_PATH
            assert result.transfer == "stateful-stop"
            assert result.fallback is not None
            assert "The vdi format used by node" in result.fallback, result.fallback
            assert "does not support live migration" in result.fallback
            verdict = await lab.verify(expect="target")
    assert verdict.ok, verdict.problems
    assert verdict.records.checked > 0


async def test_a_vdi_disk_with_live_asked_for_is_refused_untouched(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        async with migration_lab(guest_image, tmp_path, disk_format="vdi") as lab:
            result = await migrate(plan_for(lab, tmp_path, "live"))
            assert result.outcome is Outcome.REFUSED, result
            assert result.error is not None
            assert "--mode stateful-stop" in result.error
            # Untouched: the guest runs on, the target still waits for an incoming migration.
            before = lab.source_console.last_acked
            await lab.source_console.wait_heartbeat(before + 3)
            async with open_monitor(lab.target_qmp, name="target") as target:
                assert (await runstate.query_status(target)).status is RunState.INMIGRATE


def _at(state: str, act: Callable[[], None]) -> Callable[[Event], None]:
    def on_event(event: Event) -> None:
        if isinstance(event, StateEntered) and event.state == state:
            act()

    return on_event


async def _reverts(lab: Lab, tmp_path: Path, result: MigrationResult) -> None:
    assert result.outcome is Outcome.REVERTED, result
    assert result.undo_failures == ()
    before = lab.source_console.last_acked
    with trio.fail_after(15):
        await lab.source_console.wait_heartbeat(before + 5)
    verdict = await lab.verify(expect="source")
    assert verdict.ok, verdict.problems
    assert verdict.records.checked > 0
    assert not (tmp_path / "lm-ss1-state").exists()


@pytest.mark.parametrize("storage", ["non-shared", "shared"])
async def test_a_save_that_fails_resumes_the_guest_on_the_source(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path, storage: Storage
) -> None:
    """QEMU cannot write the state file (its path is a directory: as a full or broken disk
    would): the save fails, and the guest resumes on the source."""
    (tmp_path / "lm-ss1-state").mkdir()
    (tmp_path / "lm-ss1-state" / "theirs").write_text("not livemig's")
    with trio.fail_after(180):
        async with migration_lab(guest_image, tmp_path, storage=storage, dirty_mib_s=20) as lab:
            result = await migrate(plan_for(lab, tmp_path, "stateful-stop"))
            assert "state-saved" not in result.states
            assert result.failed_in == (
                "mirroring" if storage == "non-shared" else "capabilities-set"
            )
            # What livemig did not make is left as it was.
            assert (tmp_path / "lm-ss1-state" / "theirs").read_text() == "not livemig's"
            shutil.rmtree(tmp_path / "lm-ss1-state")
            await _reverts(lab, tmp_path, result)


async def test_a_state_file_damaged_in_transfer_fails_the_restore_and_resumes_the_source(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path
) -> None:
    """The saved state is cut short before the target reads it: the target's load fails (it
    exits), and the guest resumes on the source with every write."""
    state = tmp_path / "lm-ss1-state"
    with trio.fail_after(180):
        async with migration_lab(guest_image, tmp_path, dirty_mib_s=20) as lab:
            result = await migrate(
                plan_for(lab, tmp_path, "stateful-stop"),
                on_event=_at("state-saved", lambda: os.truncate(state, 4096)),
            )
            assert result.failed_in == "state-saved", result
            await _reverts(lab, tmp_path, result)


@pytest.mark.parametrize("storage", ["non-shared", "shared"])
async def test_an_interrupt_with_the_state_saved_resumes_the_source(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path, storage: Storage
) -> None:
    interrupt = trio.Event()
    with trio.fail_after(180):
        async with migration_lab(guest_image, tmp_path, storage=storage, dirty_mib_s=20) as lab:
            result = await migrate(
                plan_for(lab, tmp_path, "stateful-stop"),
                on_event=_at("state-saved", interrupt.set),
                interrupt=interrupt,
            )
            assert result.states[-2:] == ("state-saved", "reverted"), result
            assert result.error_type == "Interrupted"
            await _reverts(lab, tmp_path, result)


@pytest.mark.parametrize("syntax", ["blockdev", "drive"])
async def test_a_stateful_stop_of_the_realistic_vm_keeps_every_disk(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path, syntax: Literal["blockdev", "drive"]
) -> None:
    """q35, 2 vCPUs, 1 GiB, a qcow2 root on a backing file, a raw data disk, a CD-ROM, a NIC:
    both writable disks copied, the guest restored from the saved state with every record."""
    with trio.fail_after(240):
        async with realistic_migration_lab(
            guest_image, tmp_path, storage="non-shared", syntax=syntax, dirty_mib_s=20
        ) as lab:
            result = await migrate(plan_for(lab, tmp_path / "work", "stateful-stop"))
            assert result.outcome is Outcome.FINALIZED, result.error
            assert result.states == NON_SHARED_PATH
            assert [d.copied for d in result.disks] == [True, True]
            verdict = await lab.verify(expect="target")
    assert verdict.ok, verdict.problems
    assert verdict.records.checked > 0
