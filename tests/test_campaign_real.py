"""The real fault campaign: every fault kind at every state where it applies, on the real guest,
with the invariants checked for real. One test per case."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from support.guest_fixtures import guest_image_fixture  # noqa: F401 - provides "guest_image"
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401 - provides "aio_loop"

from livemig.fsm.machine import State, StorageMode
from livemig.guest import GuestImage
from livemig.testing.campaign_real import cases, run_case
from livemig.testing.cases import FAULT_STATES, Case
from livemig.testing.faults import FaultKind

pytestmark = pytest.mark.qemu

CASES = cases()


def test_every_kind_and_every_state_is_covered() -> None:
    non_shared = [c for c in CASES if c.storage is StorageMode.NON_SHARED]
    assert {c.kind for c in non_shared} == set(FaultKind)
    assert {c.state for c in non_shared} == set(FAULT_STATES) - {State.IDLE}
    # Each kind at every state but idle (prechecks), QMP faults on each side sent a command
    # there; but where it cannot apply: the NBD export exists from mirroring to the switchover,
    # and the work directory is written once, when the overlay is created.
    states = len(FAULT_STATES) - 1
    target_sent = 4  # connected, snapshotted, mirroring, pre-switchover
    assert len(non_shared) == 4 * (states + target_sent) + 4 * states + 3 + 1
    shared = [c for c in CASES if c.storage is StorageMode.SHARED]
    assert {c.state for c in shared} == set(FAULT_STATES) - {
        State.IDLE,
        State.SNAPSHOTTED,
        State.MIRRORING,
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_fault_case(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path, case: Case
) -> None:
    with trio.fail_after(150):
        report = await run_case(guest_image, tmp_path, case)
    assert report.fired, f"the fault never struck: {report}"
    assert report.outcome in report.expected, report
    assert not report.problems, report.problems


#: The cases the realistic VM runs too (two writable disks, a qcow2 root on a backing file, a
#: CD-ROM, a NIC, …): every disk's overlay, mirror and export under the fault; a ``cut-nbd``
#: tears down the second disk's export.
REALISTIC = (
    "non-shared/snapshotted/kill-target",
    "non-shared/mirroring/kill-target",
    "non-shared/mirroring/cut-nbd",
    "non-shared/state-transfer/cut-nbd",
    "non-shared/state-transfer/cancel",
    "non-shared/pre-switchover/cancel",
    "non-shared/mirroring/crash",
    "non-shared/pre-switchover/crash",
    "shared/state-transfer/cancel",
)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in REALISTIC], ids=lambda c: c.name)
async def test_fault_case_on_the_realistic_vm(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path, case: Case
) -> None:
    with trio.fail_after(150):
        report = await run_case(guest_image, tmp_path, case, vm="realistic")
    assert report.fired, f"the fault never struck: {report}"
    assert report.outcome in report.expected, report
    assert not report.problems, report.problems


def test_the_realistic_cases_exist() -> None:
    assert {c.name for c in CASES} >= set(REALISTIC)
