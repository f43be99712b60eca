"""The systematic fault table on the fake QEMUs: every fault kind at every state where it has
something to act on, on each side it can strike, and what a correct livemig ends in; and the
points where livemig itself may crash (then ``livemig recover`` runs).

The table-driven tests (``tests/test_faults_fake.py``) and ``livemig faults`` both run it.
"""

from __future__ import annotations

import itertools

from livemig.fsm.events import Outcome
from livemig.fsm.machine import State
from livemig.fsm.undo import Side
from livemig.testing.faults import HOST_OPERATIONS, AtCommand, AtState, FaultKind, Where
from livemig.testing.model.world import Storage

__all__ = [
    "COMMANDS",
    "FAULT_STATES",
    "OPERATIONS",
    "QMP_KINDS",
    "STORAGES",
    "Row",
    "applies",
    "crash_expected",
    "crash_points",
    "expected",
    "table",
]

#: States a fault can strike in on the default path (post-copy needs a policy that asks for it).
FAULT_STATES = (
    State.IDLE,
    State.CONNECTED,
    State.CAPABILITIES_SET,
    State.SNAPSHOTTED,
    State.MIRRORING,
    State.STATE_TRANSFER,
    State.PRE_SWITCHOVER,
    State.SWITCHED_OVER,
)
STORAGES: tuple[Storage, ...] = ("non-shared", "shared")
QMP_KINDS = (FaultKind.QMP_ERROR, FaultKind.HANG, FaultKind.DISCONNECT, FaultKind.MALFORMED)
#: Every QMP command livemig sends, forward and back.
COMMANDS = (
    "query-status", "query-memory-size-summary", "query-version", "query-migrate", "query-jobs",
    "query-named-block-nodes", "query-migrate-capabilities", "migrate-set-capabilities",
    "query-migrate-parameters", "migrate-set-parameters", "blockdev-add", "blockdev-snapshot",
    "nbd-server-start", "block-export-add", "blockdev-mirror", "migrate-incoming", "migrate",
    "query-block-jobs", "block-job-cancel", "migrate-continue", "nbd-server-stop", "cont",
    "quit", "migrate_cancel", "blockdev-del", "block-commit", "job-complete",
    "query-block-exports", "block-export-del", "job-dismiss",
)  # fmt: skip
#: Every operation a fault can strike at: the QMP commands and the host operations.
OPERATIONS = COMMANDS + HOST_OPERATIONS

#: One row of the table: storage, the state the fault strikes in, its kind, its side.
Row = tuple[Storage, State, FaultKind, Side | None]


def applies(storage: Storage, state: State, kind: FaultKind) -> bool:
    """Whether ``kind`` has something to act on in ``state`` (``crash`` has its own points:
    :func:`crash_points`)."""
    if storage == "shared" and state in (State.SNAPSHOTTED, State.MIRRORING):
        return False  # never entered
    if kind is FaultKind.DISK_FULL:
        return storage == "non-shared" and state is State.CAPABILITIES_SET  # the overlay
    if kind is FaultKind.CUT_NBD:
        return storage == "non-shared"  # a partition: it bites once NBD is used
    return kind is not FaultKind.CRASH


def expected(storage: Storage, state: State, kind: FaultKind, side: Side | None) -> set[Outcome]:
    """What a correct livemig ends in, and why."""
    if state is State.SWITCHED_OVER:
        # Past the point of no return the guest runs on the target: whatever befalls the source
        # or the cleanup is a warning. Only losing the target loses the guest.
        return {Outcome.FAILED} if kind is FaultKind.KILL_TARGET else {Outcome.FINALIZED}
    if kind is FaultKind.KILL_SOURCE:
        return {Outcome.FAILED}  # the guest died with its only QEMU: say so, leave nothing
    if kind is FaultKind.CUT_NBD and state is State.PRE_SWITCHOVER:
        return {Outcome.FINALIZED}  # the guest is paused and the mirror in sync: nothing lost
    if state is State.STATE_TRANSFER and kind is FaultKind.HANG:
        return {Outcome.FINALIZED}  # it strikes the progress poll, which the switchover ends
    executed_then_lost = kind in (FaultKind.HANG, FaultKind.MALFORMED)
    if storage == "shared" and state is State.PRE_SWITCHOVER and side is Side.TARGET:
        # It strikes the target's cont: carried out, the guest runs there and livemig rolls
        # forward; refused or never sent, it is safe to revert.
        return {Outcome.FINALIZED} if executed_then_lost else {Outcome.REVERTED}
    return {Outcome.REVERTED}


def table(storages: tuple[Storage, ...] = STORAGES) -> list[Row]:
    """Every row that applies: QMP faults on each side that is sent a command in the state."""
    rows: list[Row] = []
    for storage, state, kind in itertools.product(storages, FAULT_STATES, FaultKind):
        if not applies(storage, state, kind):
            continue
        sides: tuple[Side | None, ...] = (
            (Side.SOURCE, Side.TARGET) if kind in QMP_KINDS else (None,)
        )
        for side in sides:
            # The target is sent nothing in state-transfer, nor in capabilities-set unless
            # storage is shared (migrate-incoming).
            quiet = state in (State.STATE_TRANSFER, State.SWITCHED_OVER) or (
                state is State.CAPABILITIES_SET and storage == "non-shared"
            )
            if not (side is Side.TARGET and quiet):
                rows.append((storage, state, kind, side))
    return rows


def crash_points(storage: Storage) -> list[Where]:
    """Where livemig may die: entering each state, just before the target's cont, and after
    it."""
    entering: list[Where] = [
        AtState(s) for s in FAULT_STATES if applies(storage, s, FaultKind.CANCEL)
    ]
    return [*entering, AtCommand("cont", side=Side.TARGET), AtCommand("quit", side=Side.SOURCE)]


def crash_expected(where: Where) -> Outcome:
    """What ``livemig recover`` must end in after livemig died at ``where``: once the target
    runs the guest (its ``cont`` was answered), forward; before, back."""
    after_cont = (isinstance(where, AtCommand) and where.command == "quit") or (
        isinstance(where, AtState) and where.state is State.SWITCHED_OVER
    )
    return Outcome.FINALIZED if after_cont else Outcome.REVERTED
