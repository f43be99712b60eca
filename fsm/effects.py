"""What the pure scripts (:mod:`livemig.fsm.script`) ask the engine to do, as values.

A script is a generator: it yields one effect, the engine (:mod:`livemig.fsm.engine`) performs it
and sends back what it gave (a driver's typed reply, an event, ``None``), or throws in the error
it raised, so the script reads like the sequence it is and handles faults with ``try``. The
scripts hold no monitor, no clock and no trio: a test drives one by hand with the replies it
wants and reads every command it would have sent (``tests/test_script.py``).

=====================  ======================================================  ================
effect                 the engine                                              sends back
=====================  ======================================================  ================
`Call`                 runs one driver operation on one QEMU                   its reply
`Gather`               runs `Call` s to the two QEMUs at once                  their replies
`OnHost`               runs one file or ``qemu-img`` operation on this host    ``None``
`OnHostAll`            runs several of them at once                            ``None``
`PushUndo`             pushes undo steps and journals the stack, durably       ``None``
`DropUndo`             drops the undo step of something the script ended
`ClearUndo`            empties the stack (the source was released)
`Observe`              folds an observation into the machine's facts
`Listen`               opens one QEMU's event stream until the run ends
`AwaitJob`             waits for block jobs to be READY or gone                a `JobGone` each
`AwaitMigration`       waits for a ``MIGRATION`` status                        `MigrationEvent`
`AskRuns`              asks (shielded) whether a QEMU runs the guest           ``bool | None``
`Shielded`             performs one effect safe from cancellation              its reply
`Spawn`                runs a script beside the current action
`Emit`                 stamps an event's time and hands it to the caller
`Clock` / `Sleep`      reads the engine's clock / sleeps on it                 seconds
`Mark`, `OpenWindow`,  the switchover window's timeline
`CloseWindow`
`WriteJournal`         journals where the run stands, durably
=====================  ======================================================  ================
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, Literal

import attrs

from livemig.drivers.status import MigrationStatus
from livemig.fsm.events import Event
from livemig.fsm.observations import Observation
from livemig.fsm.undo import Side, UndoKind, UndoStep

__all__ = [
    "AskRuns",
    "AwaitJob",
    "AwaitMigration",
    "Call",
    "ClearUndo",
    "Clock",
    "CloseWindow",
    "DropUndo",
    "Effect",
    "Emit",
    "Gather",
    "JobGone",
    "Listen",
    "Mark",
    "MigrationEvent",
    "Observe",
    "OnHost",
    "OnHostAll",
    "OpenWindow",
    "Operation",
    "PushUndo",
    "Script",
    "Shielded",
    "Sleep",
    "Spawn",
    "Stream",
    "WriteJournal",
    "call",
]

#: A driver operation: an async function of the monitor first (``migration.query_migrate``).
Operation = Callable[..., Awaitable[Any]]


@attrs.frozen
class Call:
    """``await op(monitor_of(side), *args, **kwargs)``, bounded by the command deadline."""

    side: Side
    op: Operation
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def name(self) -> str:
        """The operation's name (``query_migrate``), for tests and logs."""
        return getattr(self.op, "__name__", repr(self.op))


def call(side: Side, op: Operation, *args: Any, **kwargs: Any) -> Call:
    return Call(side, op, args, kwargs)


@attrs.frozen
class Gather:
    """Run ``calls``, each QEMU's in the order given, the two QEMUs at once: for commands to two
    QEMUs that do not depend on each other (the queries at connect, the switchover's
    ``migrate-continue`` and the target's ``nbd-server-stop``). Every call runs to its end; if
    any failed, the first failed one *in ``calls`` order* is raised, so a run does not depend on
    which reply came first."""

    calls: tuple[Call, ...]


@attrs.frozen
class OnHost:
    """``await host.<op>(*args, **kwargs)`` (:class:`~livemig.drivers.host.Host`)."""

    op: Literal["make_dir", "create_image", "copy_to_nbd", "remove"]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class OnHostAll:
    """Run every one of ``ops`` at once (the base copies of a VM's disks): each runs to its end;
    if any failed, the first failed one *in ``ops`` order* is raised."""

    ops: tuple[OnHost, ...]


@attrs.frozen
class PushUndo:
    """Push ``steps`` in order, then journal the stack durably: yielded *before* creating what
    they undo, so a crash at any point leaves every step needed to get back."""

    steps: tuple[UndoStep, ...]


@attrs.frozen
class DropUndo:
    """Drop the ``kind`` step of ``side``: what it undid is gone by the script's own doing."""

    kind: UndoKind
    side: Side


@attrs.frozen
class ClearUndo:
    """Empty the stack: past the point of no return, nothing is to be undone."""


@attrs.frozen
class Observe:
    """Fold ``observation`` into the facts the guards read; the table refuses one it cannot have
    here (:func:`livemig.fsm.observations.observe`)."""

    observation: Observation


class Stream(enum.StrEnum):
    """The event streams a script may wait on."""

    MIGRATION = "migration"
    JOBS = "jobs"


@attrs.frozen
class Listen:
    """Open ``side``'s ``stream`` now, before the command whose events it must not miss; it
    stays open to the end of the run. Opening one that is open opens it afresh: the events
    before are dropped (and a stream of a connection that dropped is replaced)."""

    side: Side
    stream: Stream


@attrs.frozen
class AwaitJob:
    """Wait on ``side``'s job stream until every block job of ``jobs`` is READY (the reply is a
    ``None`` per job), or gone (a `JobGone` per job), in ``jobs`` order. An error a job reports
    on the way fails the wait.

    :param look_first: read the jobs' present status first (``False`` when it is known).
    """

    side: Side
    jobs: tuple[str, ...] = attrs.field(converter=tuple[str, ...])
    until: Literal["ready", "gone"]
    look_first: bool = True


@attrs.frozen
class JobGone:
    """How a job waited for until gone ended, as its events on the way told.

    :param completed: it completed: for a READY mirror cancelled softly, the target holds a
        consistent copy. ``False``: it was cancelled (``aborting``, ``BLOCK_JOB_CANCELLED``).
        ``None``: it was gone before the wait, nothing was seen.
    :param offset: the bytes it had copied, from its last event (``None``: not told).
    """

    completed: bool | None
    offset: int | None = None


@attrs.frozen
class MigrationEvent:
    """A ``MIGRATION`` event waited for: its status, and when QEMU emitted it (host clock)."""

    status: MigrationStatus
    emitted_at: float


@attrs.frozen
class AwaitMigration:
    """Wait on ``side``'s migration stream for a status in ``until``; a dead end fails it."""

    side: Side
    until: frozenset[MigrationStatus]


@attrs.frozen
class AskRuns:
    """Whether ``side`` runs the guest: ``True``, ``False``, ``None`` when it cannot be told in
    time. Shielded: it answers while the action is being cancelled too."""

    side: Side


@attrs.frozen
class Shielded:
    """Perform ``effect`` shielded from cancellation (still bounded by its own deadline)."""

    effect: Effect


@attrs.frozen
class Spawn:
    """Run ``script()`` beside the current action; it ends with the action, its failure fails
    the action."""

    script: Callable[[], Script]


@attrs.frozen
class Emit:
    """Hand ``event`` to the caller, its ``at_ms`` set to now."""

    event: Event


@attrs.frozen
class Clock:
    """The engine's clock, in seconds (trio's: a test's mock clock is honoured)."""


@attrs.frozen
class Sleep:
    seconds: float


@attrs.frozen
class Mark:
    """Note ``what`` in the switchover window's timeline, if it is open."""

    what: str


@attrs.frozen
class OpenWindow:
    """The guest was paused for the switchover (QEMU emitted it at ``emitted_at``, host clock;
    ``None``: unknown): from now on every millisecond is downtime, and its timeline is recorded
    from ``what``."""

    emitted_at: float | None
    what: str = "source pre-switchover event received"


@attrs.frozen
class CloseWindow:
    """The target runs the guest: the switchover window closes."""


@attrs.frozen
class WriteJournal:
    """Journal where the run stands now, durably (the point of no return is about to pass)."""


Effect = (
    Call
    | Gather
    | OnHost
    | OnHostAll
    | PushUndo
    | DropUndo
    | ClearUndo
    | Observe
    | Listen
    | AwaitJob
    | AwaitMigration
    | AskRuns
    | Shielded
    | Spawn
    | Emit
    | Clock
    | Sleep
    | Mark
    | OpenWindow
    | CloseWindow
    | WriteJournal
)

#: What every script is: it yields effects, is sent their replies, and returns nothing.
Script = Generator[Effect, Any, None]
