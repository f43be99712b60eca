"""The fault cases: every fault kind at every point where it has something to act on, on each
side it can strike, in each storage mode, and what a correct livemig ends in (:func:`expected`).

This is the one definition both campaigns use: the fake one (:mod:`livemig.testing.campaign_fake`,
the table-driven tests in ``tests/test_faults_fake.py``) runs every case; the real one
(:mod:`livemig.testing.campaign_real`) runs those it can aim at on real QEMU
(:func:`livemig.testing.campaign_real.aims_at`), and judges them by the same oracle.

A case is a storage mode, a fault kind and where it strikes:
:class:`~livemig.testing.faults.AtState` (a state, and the side whose first command in that state
it strikes; no side for the kinds that strike beside any operation, or on entering the state)
or, for ``crash`` only, one of the
:class:`~livemig.testing.faults.AtCommand` points around the target's ``cont``
(:func:`crash_points`).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from livemig.fsm.events import Outcome
from livemig.fsm.machine import State, StorageMode
from livemig.fsm.undo import Side
from livemig.testing.faults import HOST_OPERATIONS, AtCommand, AtState, Fault, FaultKind, Where

__all__ = [
    "COMMANDS",
    "FAULT_STATES",
    "OPERATIONS",
    "QMP_KINDS",
    "STORAGES",
    "Case",
    "applies",
    "cases",
    "crash_points",
    "expected",
    "outcome_names",
    "sides",
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
STORAGES: tuple[StorageMode, ...] = (StorageMode.NON_SHARED, StorageMode.SHARED)
QMP_KINDS = (FaultKind.QMP_ERROR, FaultKind.HANG, FaultKind.DISCONNECT, FaultKind.MALFORMED)
#: Every QMP command livemig sends, forward and back.
COMMANDS = (
    "query-status", "query-memory-size-summary", "query-version", "query-migrate", "query-jobs",
    "query-named-block-nodes", "query-migrate-capabilities", "migrate-set-capabilities",
    "query-migrate-parameters", "migrate-set-parameters", "blockdev-add", "blockdev-snapshot",
    "nbd-server-start", "block-export-add", "blockdev-mirror", "migrate-incoming", "migrate",
    "query-block-jobs", "block-job-cancel", "migrate-continue", "nbd-server-stop", "cont",
    "quit", "migrate_cancel", "blockdev-del", "block-commit", "job-complete",
    "query-block-exports", "block-export-del", "job-dismiss", "stop",
)  # fmt: skip
#: Every operation a fault can strike at: the QMP commands and the host operations.
OPERATIONS = COMMANDS + HOST_OPERATIONS


@attrs.frozen
class Case:
    """One fault of the table: in ``storage`` mode, ``kind`` striking at ``where``."""

    storage: StorageMode = attrs.field(converter=StorageMode)
    kind: FaultKind = attrs.field(converter=FaultKind)
    where: Where

    @property
    def fault(self) -> Fault:
        return Fault(self.kind, self.where)

    @property
    def state(self) -> State | None:
        """The state it strikes in; ``None`` for a crash at a command."""
        return self.where.state if isinstance(self.where, AtState) else None

    @property
    def side(self) -> Side | None:
        return self.where.side

    @property
    def name(self) -> str:
        """``storage/state/kind[/side]``, or ``storage/at-command/crash[/side]``."""
        where = self.where
        at = where.state.value if isinstance(where, AtState) else f"at-{where.command}"
        side = f"/{where.side.value}" if where.side else ""
        return f"{self.storage.value}/{at}/{self.kind.value}{side}"


def applies(storage: StorageMode, state: State, kind: FaultKind) -> bool:
    """Whether ``kind`` has something to act on in ``state`` (``crash`` has its own points:
    :func:`crash_points`)."""
    shared = storage is StorageMode.SHARED
    if shared and state in (State.SNAPSHOTTED, State.MIRRORING):
        return False  # never entered
    if kind is FaultKind.DISK_FULL:
        return not shared and state is State.CAPABILITIES_SET  # the overlay is created then
    if kind is FaultKind.CUT_NBD:
        return not shared  # a partition: it bites once NBD is used
    return kind is not FaultKind.CRASH


def sides(storage: StorageMode, state: State, kind: FaultKind) -> tuple[Side | None, ...]:
    """The sides a fault is aimed at: a QMP fault at each side that is sent a command in
    ``state``; any other kind strikes beside the first operation, whichever side (``None``)."""
    if kind not in QMP_KINDS:
        return (None,)
    # The target is sent nothing in state-transfer nor in switched-over, nor in capabilities-set
    # unless storage is shared (migrate-incoming).
    quiet = state in (State.STATE_TRANSFER, State.SWITCHED_OVER) or (
        state is State.CAPABILITIES_SET and storage is StorageMode.NON_SHARED
    )
    return (Side.SOURCE,) if quiet else (Side.SOURCE, Side.TARGET)


def crash_points(storage: StorageMode) -> list[Where]:
    """Where livemig may die: entering each state, just before the target's ``cont``, and after
    it (at the source's ``quit``)."""
    entering: list[Where] = [
        AtState(s) for s in FAULT_STATES if applies(storage, s, FaultKind.CANCEL)
    ]
    return [*entering, AtCommand("cont", side=Side.TARGET), AtCommand("quit", side=Side.SOURCE)]


def cases(storages: Sequence[StorageMode] = STORAGES) -> list[Case]:
    """The whole table, per storage mode: every (state, kind) that applies on each of its
    :func:`sides`, then livemig crashing at each of its :func:`crash_points`."""
    out: list[Case] = []
    for storage in storages:
        for state in FAULT_STATES:
            for kind in FaultKind:
                if applies(storage, state, kind):
                    out += [
                        Case(storage, kind, AtState(state, s)) for s in sides(storage, state, kind)
                    ]
        out += [Case(storage, FaultKind.CRASH, where) for where in crash_points(storage)]
    return out


def expected(case: Case) -> frozenset[Outcome]:
    """What a correct livemig ends in; both campaigns judge a case by this, and the invariants
    must hold for the side the outcome names.

    - Past the point of no return (``switched-over``, and a crash at the source's ``quit``) the
      guest runs on the target: whatever befalls the source or the cleanup is a warning, and a
      crash is rolled forward by ``livemig recover`` (its journal says ``switched-over``). Only
      losing the target loses the guest: ``failed``, the paused source kept for the operator.
    - Killing the source before the switchover kills the guest with its only QEMU: ``failed``,
      and nothing left behind but what holds the dead guest's data.
    - A crash before the target's ``cont`` was answered, entering ``pre-switchover`` included:
      the target does not hold the guest (the last of RAM and the device state are sent after
      ``migrate-continue``), so ``recover`` must revert. (The real campaign's SIGKILL lands
      within moments of the state's announcement, long before the downtime ends; the old real
      oracle's "either" would have passed a kill that landed late; on both storages it
      reverts.)
    - A hung progress poll in ``state-transfer`` races the pause against the command deadline:
      the pause first cancels the poll with the steering and the migration finalizes; the
      deadline first means a monitor that does not answer, and reverting is safe. Both are
      correct (the fake's timings always give the pause first; the old fake oracle took that
      for a rule, the real QEMU under load need not keep it).
    - The NBD link cut at ``pre-switchover``: the guest is paused and the mirror in sync, so
      if the mirror's cancel completes the target holds every write and finalizing loses
      nothing; if the source notices the cut first the mirror errs and livemig must revert,
      which is safe too. Which comes first is a race on real QEMU: either is correct.
    - Shared storage, a fault at the target's ``cont``: carried out but its reply lost
      (``hang``, ``malformed``) the guest runs there and livemig rolls forward; refused or never
      sent, reverting is safe.
    - Every other fault must revert.
    """
    either = frozenset({Outcome.REVERTED, Outcome.FINALIZED})
    kind, state, where = case.kind, case.state, case.where
    if kind is FaultKind.CRASH:
        forward = state is State.SWITCHED_OVER or (
            isinstance(where, AtCommand) and where.command == "quit"
        )
        return frozenset({Outcome.FINALIZED if forward else Outcome.REVERTED})
    if state is State.SWITCHED_OVER:
        return frozenset({Outcome.FAILED if kind is FaultKind.KILL_TARGET else Outcome.FINALIZED})
    if kind is FaultKind.KILL_SOURCE:
        return frozenset({Outcome.FAILED})
    if kind is FaultKind.HANG and state is State.STATE_TRANSFER:
        return either
    if kind is FaultKind.CUT_NBD and state is State.PRE_SWITCHOVER:
        return either
    if (
        case.storage is StorageMode.SHARED
        and state is State.PRE_SWITCHOVER
        and case.side is Side.TARGET
    ):
        lost_reply = kind in (FaultKind.HANG, FaultKind.MALFORMED)
        return frozenset({Outcome.FINALIZED if lost_reply else Outcome.REVERTED})
    return frozenset({Outcome.REVERTED})


def outcome_names(outcomes: frozenset[Outcome]) -> tuple[str, ...]:
    """Outcomes as a report spells them: their values, sorted."""
    return tuple(sorted(o.value for o in outcomes))
