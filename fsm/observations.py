"""What the engine saw QEMU (or itself) do, as values: the only input of the machine's facts.

A script of :mod:`livemig.fsm.script` asks for QMP commands and event waits; what it learns it
reports as one of these frozen values (``yield Observe(MirrorReady("lm-mirror"))``). The
machine folds it into its :class:`~livemig.fsm.machine.Facts` with :func:`observe`, which is pure
(no I/O, no clock) and refuses an observation the table cannot have at that point — the mirror
ready before any overlay, the target resumed while RAM still streams — so an engine bug that
reports out of order stops the run (it reverts) instead of moving the machine on a false fact.
The guards of the table read only the facts these observations built.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from livemig.drivers.status import MigrationStatus
from livemig.fsm.machine import TERMINAL, Facts, State, StorageMode, Transfer
from livemig.transports.errors import GuardFailed

__all__ = [
    "CapabilitiesSet",
    "MigrationStatusChanged",
    "MirrorReady",
    "Observation",
    "OverlayActive",
    "PostcopyCommitted",
    "PostcopyStarted",
    "PrechecksPassed",
    "SourceReleased",
    "StateSaved",
    "TargetResumed",
    "UndoFinished",
    "legal_states",
    "observe",
]


@attrs.frozen
class PrechecksPassed:
    """Both QEMUs answered and every precheck passed; nothing was touched. ``storage`` is the
    route the disks take (``None``: the one the plan named); ``transfer`` how the guest's state
    moves (``None``: live) and, for a stateful stop the plan did not ask for, ``why``."""

    storage: StorageMode | None = None
    transfer: Transfer | None = None
    why: str | None = None


@attrs.frozen
class CapabilitiesSet:
    """Migration capabilities and parameters are set on both sides."""


def _names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class OverlayActive:
    """The snapshot answered: the source's writes go to the overlay ``nodes`` (one per copied
    disk)."""

    nodes: tuple[str, ...] = attrs.field(converter=_names)


@attrs.frozen
class MirrorReady:
    """Every mirror of ``jobs`` (one per copied disk) reported READY: every new write reaches
    the target."""

    jobs: tuple[str, ...] = attrs.field(converter=_names)


@attrs.frozen
class MigrationStatusChanged:
    """QEMU reported ``status`` for the migration (an event, or a command's answer)."""

    status: MigrationStatus


@attrs.frozen
class StateSaved:
    """Stateful stop: the source paused the guest and saved its whole state to the state file;
    every copied disk's mirror completed meanwhile."""


@attrs.frozen
class PostcopyStarted:
    """``migrate-start-postcopy`` answered: the switchover will go through ``post-copy``."""


@attrs.frozen
class PostcopyCommitted:
    """``migrate-continue`` into post-copy is about to be sent: no way back from here."""


@attrs.frozen
class TargetResumed:
    """The target runs the guest: its ``cont`` was answered, or it was seen running."""


@attrs.frozen
class SourceReleased:
    """After the switchover, the run let go of the source (quit, or left as the plan asked)."""


@attrs.frozen
class UndoFinished:
    """The undo stack ran; ``clean``: every step that was needed succeeded."""

    clean: bool


Observation = (
    PrechecksPassed
    | CapabilitiesSet
    | OverlayActive
    | MirrorReady
    | MigrationStatusChanged
    | StateSaved
    | PostcopyStarted
    | PostcopyCommitted
    | TargetResumed
    | SourceReleased
    | UndoFinished
)

_MIGRATING = frozenset(
    {State.CAPABILITIES_SET, State.MIRRORING, State.STATE_TRANSFER, State.PRE_SWITCHOVER}
)
#: In which states (during the action that leaves them) each observation can be made.
_LEGAL: Mapping[type, frozenset[State]] = {
    PrechecksPassed: frozenset({State.IDLE}),
    CapabilitiesSet: frozenset({State.CONNECTED}),
    OverlayActive: frozenset({State.CAPABILITIES_SET}),
    MirrorReady: frozenset({State.SNAPSHOTTED}),
    MigrationStatusChanged: _MIGRATING | {State.POSTCOPY, State.STATE_SAVED},
    StateSaved: frozenset({State.CAPABILITIES_SET, State.MIRRORING}),
    PostcopyStarted: frozenset({State.STATE_TRANSFER}),
    PostcopyCommitted: frozenset({State.PRE_SWITCHOVER}),
    TargetResumed: frozenset({State.PRE_SWITCHOVER, State.STATE_SAVED}),
    SourceReleased: frozenset({State.SWITCHED_OVER, State.POSTCOPY}),
    UndoFinished: frozenset(s for s in State if s not in TERMINAL),
}
#: Observations of the disk copy: only a non-shared migration makes them.
_NON_SHARED_ONLY = (OverlayActive, MirrorReady)


def legal_states(observation: Observation) -> frozenset[State]:
    """The states in which ``observation`` can be made."""
    return _LEGAL[type(observation)]


def observe(state: State, facts: Facts, observation: Observation) -> Facts:
    """The facts once ``observation`` was made in ``state``. Pure: ``facts`` is not changed.

    :raise GuardFailed: when the table cannot have ``observation`` in ``state`` (nor with this
        storage mode).
    """
    name = type(observation).__name__
    if state not in legal_states(observation) or (
        isinstance(observation, _NON_SHARED_ONLY) and facts.storage is not StorageMode.NON_SHARED
    ):
        raise GuardFailed(f"{name} cannot be observed in {state.value}", state=state.value)
    match observation:
        case PrechecksPassed(storage=storage, transfer=transfer):
            route = storage if storage is not None else facts.storage
            if route is None:
                raise GuardFailed("the prechecks decided no storage route", state=state.value)
            return attrs.evolve(
                facts,
                prechecks_passed=True,
                storage=route,
                transfer=transfer if transfer is not None else Transfer.LIVE,
            )
        case StateSaved():
            if facts.transfer is not Transfer.STATEFUL_STOP:
                raise GuardFailed("a live migration saves no state file", state=state.value)
            return attrs.evolve(facts, state_saved=True)
        case CapabilitiesSet():
            return attrs.evolve(facts, capabilities_set=True)
        case OverlayActive():
            return attrs.evolve(facts, overlay_active=True)
        case MirrorReady():
            return attrs.evolve(facts, mirror_ready=True)
        case MigrationStatusChanged(status=status):
            return attrs.evolve(facts, migration_status=status)
        case PostcopyStarted():
            return attrs.evolve(facts, postcopy=True)
        case PostcopyCommitted():
            return attrs.evolve(facts, postcopy_committed=True)
        case TargetResumed():
            return attrs.evolve(facts, target_resumed=True)
        case SourceReleased():
            return attrs.evolve(facts, source_released=True)
        case UndoFinished(clean=clean):
            return attrs.evolve(facts, undo_clean=clean)
