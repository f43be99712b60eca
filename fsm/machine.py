"""The migration machine as data: states, triggers, guards and revert edges.

This module is pure: no I/O, no clock. The runner (:mod:`livemig.fsm.runner`) owns a :class:`Facts`
record, performs the action of a trigger through the drivers, records what it observed in the
facts, then fires the trigger here. A trigger only moves the machine when its guard holds on the
facts, so an action that did not produce the fact its target state promises cannot advance it.

The same table drives the machine and draws the diagrams (:mod:`livemig.fsm.diagram`): the picture
cannot
drift from the code.

Forward path, non-shared storage::

    idle -connect-> connected -set_capabilities-> capabilities-set -snapshot-> snapshotted
      -mirror-> mirroring -transfer_state-> state-transfer -await_switchover-> pre-switchover
      -switch_over-> switched-over -finalize-> finalized

Shared storage skips ``snapshotted`` and ``mirroring``: ``capabilities-set -transfer_state->``.
When the plan allows post-copy and RAM does not converge, the switchover goes
``pre-switchover -switch_over_postcopy-> post-copy -finalize-> finalized``.

Stateful stop (asked for, or when live transfer is impossible) leaves the live route after the
disks are on the target (``mirroring``; shared storage: ``capabilities-set``)::

    -save_state-> state-saved -restore_state-> switched-over -finalize-> finalized

``save_state`` pauses the guest and writes its whole state to a file; ``restore_state`` loads it
into the target and resumes it there.

The table decides the order: each forward edge has a precondition (``when``) besides its guard,
and from every non-terminal state exactly one forward edge's precondition holds
(:func:`forward_trigger`): storage mode picks the branch at ``capabilities-set``, a started
post-copy the one at ``pre-switchover``. The runner performs that edge's action, records what
it observed, and fires it; the guard then checks the observation.

Every non-terminal state has a ``fail`` edge to ``failed`` (an undo step failed, or a fault came
after the point of no return). The point of no return is a state: ``switched-over`` (the
target's ``cont`` was answered: the guest runs there) or ``post-copy`` (the ``migrate-continue``
into it was sent: neither side alone holds the whole guest). Every state before them has a
``revert`` edge to ``reverted`` (all undo steps succeeded); they have none.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from livemig.drivers.status import MigrationStatus
from livemig.transports.errors import GuardFailed

if TYPE_CHECKING:
    from transitions import Machine

__all__ = [
    "FORWARD",
    "NO_RETURN",
    "TERMINAL",
    "TRANSITIONS",
    "Edge",
    "Facts",
    "MigrationMachine",
    "State",
    "StorageChoice",
    "StorageMode",
    "Transfer",
    "TransferChoice",
    "Trigger",
    "allows",
    "forward_trigger",
]


class State(enum.StrEnum):
    """The documented states. Each name is a fact that holds once it is entered."""

    IDLE = "idle"
    #: Both monitors answer; prechecks passed (source running, target waiting for -incoming).
    CONNECTED = "connected"
    #: Migration capabilities and parameters are set on both sides.
    CAPABILITIES_SET = "capabilities-set"
    #: The source's root disk writes go to a qcow2 overlay; the base is frozen.
    SNAPSHOTTED = "snapshotted"
    #: The frozen base is on the target and the overlay mirror is READY: writes reach the target.
    MIRRORING = "mirroring"
    #: RAM is streaming to the target; the guest still runs on the source.
    STATE_TRANSFER = "state-transfer"
    #: RAM converged (or post-copy was asked for); the source guest is paused before switchover.
    PRE_SWITCHOVER = "pre-switchover"
    #: Stateful stop: the source guest is paused and its whole state (RAM, devices) is in the
    #: state file; every copied disk's mirror completed, so the target holds each disk as of the
    #: pause. The source keeps the guest and every write: a revert resumes it there.
    STATE_SAVED = "state-saved"
    #: The point of no return: the target completed the migration and runs the guest (its
    #: ``cont`` was answered); the source is still there, paused, to be stopped.
    SWITCHED_OVER = "switched-over"
    #: The target runs the guest and pulls the RAM it still lacks from the source. No revert is
    #: possible any more: neither side alone has the whole guest until post-copy completes.
    POSTCOPY = "post-copy"
    #: The guest runs on the target only; nothing is left behind. Terminal.
    FINALIZED = "finalized"
    #: The guest runs on the source only, with every write it made; nothing left behind. Terminal.
    REVERTED = "reverted"
    #: A revert could not complete, or a fault came after the point of no return. Terminal.
    FAILED = "failed"


TERMINAL = frozenset({State.FINALIZED, State.REVERTED, State.FAILED})


class Trigger(enum.StrEnum):
    """Commands that move the machine (imperative: they name what the runner does)."""

    CONNECT = "connect"
    SET_CAPABILITIES = "set_capabilities"
    SNAPSHOT = "snapshot"
    MIRROR = "mirror"
    TRANSFER_STATE = "transfer_state"
    AWAIT_SWITCHOVER = "await_switchover"
    SWITCH_OVER = "switch_over"
    FINALIZE = "finalize"
    SWITCH_OVER_POSTCOPY = "switch_over_postcopy"
    SAVE_STATE = "save_state"
    RESTORE_STATE = "restore_state"
    REVERT = "revert"
    FAIL = "fail"


class StorageMode(enum.StrEnum):
    """The route a migration takes: whether any disk is copied."""

    #: Both QEMUs open the same images (Ceph-like); only RAM and device state move.
    SHARED = "shared"
    #: Disks are copied: each one's frozen base, then its overlay mirrored over NBD (the
    #: migration may still leave some disks shared: ``auto``).
    NON_SHARED = "non-shared"


class StorageChoice(enum.StrEnum):
    """What a plan asks for; the prechecks turn it into the route (:class:`StorageMode`)."""

    #: The target opens every disk's image as the same file.
    SHARED = "shared"
    #: Every disk is copied.
    NON_SHARED = "non-shared"
    #: Per disk: one the target opens as the same file is shared, every other one copied.
    AUTO = "auto"

    @property
    def route(self) -> StorageMode | None:
        """The route this choice takes whatever the disks (``None``: decided at connect)."""
        return None if self is StorageChoice.AUTO else StorageMode(self.value)


class Transfer(enum.StrEnum):
    """How the guest's state moves: whether the guest keeps running meanwhile."""

    #: RAM streams while the guest runs; it pauses only for the switchover.
    LIVE = "live"
    #: The guest is paused, its state saved to a file and restored on the target.
    STATEFUL_STOP = "stateful-stop"


class TransferChoice(enum.StrEnum):
    """What a plan asks for; the prechecks turn it into the route (:class:`Transfer`)."""

    LIVE = "live"
    STATEFUL_STOP = "stateful-stop"
    #: Live, and a stateful stop when live transfer is impossible (the result says why).
    AUTO = "auto"


@attrs.define
class Facts:
    """What the runner has observed so far. Guards read only this.

    The runner is the only writer; the machine never changes it.
    """

    #: The route; a plan's ``auto`` is decided at connect (:class:`PrechecksPassed`).
    storage: StorageMode | None
    #: How the state moves, decided at connect (``None`` before).
    transfer: Transfer | None = None
    prechecks_passed: bool = False
    capabilities_set: bool = False
    overlay_active: bool = False
    mirror_ready: bool = False
    #: Last migration status QEMU reported on the source (``None`` before ``migrate``).
    migration_status: MigrationStatus | None = None
    #: The target has been resumed (``cont``): the point of no return is behind us.
    target_resumed: bool = False
    #: Post-copy was started (``migrate-start-postcopy``): the switchover will go through
    #: ``post-copy``, and from ``migrate-continue`` on there is no way back.
    postcopy: bool = False
    #: ``migrate-continue`` was sent into post-copy: the source can no longer take the guest back.
    postcopy_committed: bool = False
    #: Stateful stop: the source saved the guest's whole state to the state file (and every
    #: copied disk's mirror completed while the guest was paused).
    state_saved: bool = False
    #: Every undo step that was needed ran without error.
    undo_clean: bool = True
    #: After the switchover, the run let go of the source: it was quit (or left paused, as the
    #: plan asked), and the run's files were removed or reported.
    source_released: bool = False


# Guards: pure predicates over the facts. Their names are what the diagram prints.


def prechecks_passed(facts: Facts) -> bool:
    return facts.prechecks_passed


def capabilities_set(facts: Facts) -> bool:
    return facts.capabilities_set


def non_shared_overlay_active(facts: Facts) -> bool:
    return facts.storage is StorageMode.NON_SHARED and facts.overlay_active


def mirror_ready(facts: Facts) -> bool:
    return facts.mirror_ready


def shared_storage_transfer_started(facts: Facts) -> bool:
    return facts.storage is StorageMode.SHARED and _transfer_started(facts)


def state_saved(facts: Facts) -> bool:
    return facts.state_saved


def mirror_ready_transfer_started(facts: Facts) -> bool:
    return facts.mirror_ready and _transfer_started(facts)


def status_pre_switchover(facts: Facts) -> bool:
    return facts.migration_status is MigrationStatus.PRE_SWITCHOVER


def switched_over(facts: Facts) -> bool:
    """The migration completed and the target runs the guest."""
    return facts.migration_status is MigrationStatus.COMPLETED and facts.target_resumed


def source_released(facts: Facts) -> bool:
    """Switched over, and the source let go of."""
    return switched_over(facts) and facts.source_released


def postcopy_running(facts: Facts) -> bool:
    """Post-copy is active and the target runs the guest."""
    return (
        facts.postcopy
        and facts.migration_status is MigrationStatus.POSTCOPY_ACTIVE
        and facts.target_resumed
    )


def non_shared(facts: Facts) -> bool:
    return facts.storage is StorageMode.NON_SHARED


def shared(facts: Facts) -> bool:
    return facts.storage is StorageMode.SHARED


def live(facts: Facts) -> bool:
    return facts.transfer is not Transfer.STATEFUL_STOP


def stateful(facts: Facts) -> bool:
    return facts.transfer is Transfer.STATEFUL_STOP


def shared_live(facts: Facts) -> bool:
    return shared(facts) and live(facts)


def shared_stateful(facts: Facts) -> bool:
    return shared(facts) and stateful(facts)


def postcopy_started(facts: Facts) -> bool:
    return facts.postcopy


def precopy(facts: Facts) -> bool:
    """Post-copy was not started: the switchover is the pre-copy one."""
    return not facts.postcopy


def revertible(facts: Facts) -> bool:
    """Before the point of no return, and every undo step ran clean."""
    return not facts.target_resumed and not facts.postcopy_committed and facts.undo_clean


def _transfer_started(facts: Facts) -> bool:
    status = facts.migration_status
    return (
        status is not None
        and status not in (MigrationStatus.NONE, MigrationStatus.CANCELLING)
        and not status.dead_end
    )


Guard = Callable[[Facts], bool]


def always(facts: Facts) -> bool:
    """No guard: the edge is drawn and fired without a condition."""
    del facts
    return True


@attrs.frozen
class Edge:
    """One edge of the table: ``trigger`` moves ``source`` to ``dest`` when ``guard`` holds.

    :param when: the precondition that picks this edge among the forward edges of ``source``
        (read before the action runs; checked again, with ``guard``, when it is fired).
    """

    trigger: Trigger
    source: State
    dest: State
    guard: Guard
    when: Guard = always


FORWARD: tuple[Edge, ...] = (
    Edge(Trigger.CONNECT, State.IDLE, State.CONNECTED, prechecks_passed),
    Edge(Trigger.SET_CAPABILITIES, State.CONNECTED, State.CAPABILITIES_SET, capabilities_set),
    Edge(
        Trigger.SNAPSHOT,
        State.CAPABILITIES_SET,
        State.SNAPSHOTTED,
        non_shared_overlay_active,
        when=non_shared,
    ),
    Edge(Trigger.MIRROR, State.SNAPSHOTTED, State.MIRRORING, mirror_ready),
    Edge(
        Trigger.TRANSFER_STATE,
        State.CAPABILITIES_SET,
        State.STATE_TRANSFER,
        shared_storage_transfer_started,
        when=shared_live,
    ),
    Edge(
        Trigger.TRANSFER_STATE,
        State.MIRRORING,
        State.STATE_TRANSFER,
        mirror_ready_transfer_started,
        when=live,
    ),
    Edge(
        Trigger.SAVE_STATE,
        State.CAPABILITIES_SET,
        State.STATE_SAVED,
        state_saved,
        when=shared_stateful,
    ),
    Edge(Trigger.SAVE_STATE, State.MIRRORING, State.STATE_SAVED, state_saved, when=stateful),
    Edge(Trigger.RESTORE_STATE, State.STATE_SAVED, State.SWITCHED_OVER, switched_over),
    Edge(
        Trigger.AWAIT_SWITCHOVER, State.STATE_TRANSFER, State.PRE_SWITCHOVER, status_pre_switchover
    ),
    Edge(
        Trigger.SWITCH_OVER, State.PRE_SWITCHOVER, State.SWITCHED_OVER, switched_over, when=precopy
    ),
    Edge(
        Trigger.SWITCH_OVER_POSTCOPY,
        State.PRE_SWITCHOVER,
        State.POSTCOPY,
        postcopy_running,
        when=postcopy_started,
    ),
    Edge(Trigger.FINALIZE, State.SWITCHED_OVER, State.FINALIZED, source_released),
    Edge(Trigger.FINALIZE, State.POSTCOPY, State.FINALIZED, source_released),
)

_NON_TERMINAL = tuple(s for s in State if s not in TERMINAL)


#: States past the point of no return: no revert edge leaves them.
NO_RETURN = frozenset({State.SWITCHED_OVER, State.POSTCOPY})
#: States a revert can start from: every non-terminal one before the point of no return.
_REVERTIBLE = tuple(s for s in _NON_TERMINAL if s not in NO_RETURN)


def _revert_edges() -> tuple[Edge, ...]:
    revert = tuple(Edge(Trigger.REVERT, s, State.REVERTED, revertible) for s in _REVERTIBLE)
    # ``fail`` is unguarded: it records that the machine could not reach a safe terminal state.
    fail = tuple(Edge(Trigger.FAIL, s, State.FAILED, always) for s in _NON_TERMINAL)
    return revert + fail


TRANSITIONS: tuple[Edge, ...] = FORWARD + _revert_edges()


def forward_trigger(state: State, facts: Facts) -> Trigger | None:
    """The forward trigger from ``state`` whose precondition holds on ``facts``; ``None`` in a
    terminal state. The table has exactly one (tests check it for every state and route).
    """
    if state in TERMINAL:
        return None
    (edge,) = (e for e in FORWARD if e.source is state and e.when(facts))
    return edge.trigger


def machine_kwargs() -> dict[str, Any]:
    """Keyword arguments for a ``transitions`` machine (plain or graph) built from the table."""
    return {
        "states": [s.value for s in State],
        "transitions": [
            {
                "trigger": e.trigger.value,
                "source": e.source.value,
                "dest": e.dest.value,
                "conditions": [g for g in (e.when, e.guard) if g is not always],
            }
            for e in TRANSITIONS
        ],
        "initial": State.IDLE.value,
        "auto_transitions": False,
        "ignore_invalid_triggers": False,
        "send_event": False,
    }


class MigrationMachine:
    """The legal-order model: a plain synchronous ``transitions.Machine`` over the table.

    ``fire`` is the one typed entry point: it returns the new state, or raises
    :class:`~livemig.transports.errors.GuardFailed` when the trigger is not allowed from the current
    state or its guard does not hold on the facts.
    """

    def __init__(self) -> None:
        # transitions costs ~10 ms to import; only a running migration needs it, not ``--help``.
        from transitions import Machine  # noqa: PLC0415

        self._machine: Machine = Machine(model=self, **machine_kwargs())

    @property
    def current(self) -> State:
        return State(str(self._machine.get_model_state(self).value))

    def forward(self, facts: Facts) -> Trigger | None:
        """The forward trigger the table picks from here (:func:`forward_trigger`)."""
        return forward_trigger(self.current, facts)

    def allows(self, trigger: Trigger, facts: Facts) -> bool:
        """Would ``trigger`` move the machine now? Pure: reads the table, changes nothing."""
        return allows(self.current, trigger, facts)

    def fire(self, trigger: Trigger, facts: Facts) -> State:
        from transitions import MachineError  # noqa: PLC0415 - see __init__

        before = self.current
        try:
            moved = self._machine.events[trigger.value].trigger(self, facts)
        except MachineError as err:
            raise GuardFailed(
                f"{trigger.value} is not an edge of the table", state=before.value
            ) from err
        if not moved:
            raise GuardFailed(f"guard of {trigger.value} does not hold", state=before.value)
        return self.current


def allows(state: State, trigger: Trigger, facts: Facts) -> bool:
    """Whether the table has an edge for ``trigger`` from ``state`` whose guard holds."""
    return any(
        e.trigger is trigger and e.source is state and e.when(facts) and e.guard(facts)
        for e in TRANSITIONS
    )
