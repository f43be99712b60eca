"""The runner's working set for one migration, and the waits its actions share.

A :class:`Session` is the one mutable owner of everything a run touches: the two monitors, the
facts the guards read, the undo stack, the event sink. Actions (:mod:`livemig.fsm.steps`) and the
undo
interpreter (:mod:`livemig.fsm.reverter`) receive it; only the runner creates it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Container
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

from livemig.drivers import jobs
from livemig.drivers.host import Host
from livemig.drivers.qmp import EventStream, Monitor, QMPEvent
from livemig.drivers.status import JobStatus, MigrationStatus
from livemig.fsm.events import Event
from livemig.fsm.journal import Journal, JournalSink
from livemig.fsm.machine import Facts, State
from livemig.fsm.observations import Observation, observe
from livemig.fsm.plan import Plan
from livemig.fsm.policy import ConvergenceTracker
from livemig.fsm.prechecks import RootDisk
from livemig.fsm.undo import Side, UndoStack, UndoStep
from livemig.transports.endpoints import UnixEndpoint
from livemig.transports.errors import MigrationAborted, StepFailed

__all__ = ["Session", "wait_job", "wait_migration"]

#: Job events, for every wait on a block job.
JOB_EVENTS = (
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_READY",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_ERROR",
)


@attrs.define
class Session:
    plan: Plan
    source: Monitor
    target: Monitor
    facts: Facts
    emit: Callable[[Event], None]
    started_at: float
    exits: AsyncExitStack
    host: Host
    undo: UndoStack = attrs.field(factory=UndoStack)
    state: State = State.IDLE
    #: The source's MIGRATION events, open from just before ``migrate`` to the end of the run.
    source_migration: EventStream | None = None
    #: The target's MIGRATION events, likewise.
    target_migration: EventStream | None = None
    #: The root disk's image on the source: (filename, format), learnt at connect.
    base_image: tuple[str, str] | None = None
    base_size: int | None = None
    #: The root disk as the prechecks found it.
    root: RootDisk | None = None
    #: The root disk's node on each side (``--disk`` resolved at connect).
    disk_nodes: dict[Side, str] = attrs.field(factory=dict)
    #: The root disk's file on the target.
    target_image: str | None = None
    warnings: list[str] = attrs.field(factory=list)
    #: Filled from the final ``query-migrate``.
    downtime_ms: int | None = None
    ram_bytes: int | None = None
    disk_bytes: int | None = None
    #: The guest's base RAM in bytes, learnt at connect: the RAM phase's deadline scales by it.
    guest_ram: int | None = None
    #: The ``max-bandwidth`` set with the capabilities (``None``: uncapped), likewise.
    bandwidth: int | None = None
    #: The convergence policy's state while RAM streams (set with the capabilities).
    convergence: ConvergenceTracker | None = None
    #: Where the run is journalled (``None``: not journalled).
    journal: JournalSink | None = None
    #: The engine's nursery for the current action (see :meth:`spawn`).
    during: trio.Nursery | None = None
    #: The switchover window, while it is open: ``(ms since the run started, what)``.
    window: list[tuple[float, str]] | None = None
    #: The window once closed (the target's ``cont`` answered), for the result.
    switchover: tuple[tuple[float, str], ...] = ()

    def run_files(self) -> list[Path]:
        """Files this run may create: the overlay and the unix sockets of the target."""
        plan = self.plan
        sockets = [e.path for e in (plan.migrate_uri, plan.nbd) if isinstance(e, UnixEndpoint)]
        return [plan.overlay_path, *sockets]

    async def write_journal(self, *, durable: bool = True) -> None:
        """Journal where the run stands; see :mod:`livemig.fsm.journal`."""
        if self.journal is None:
            return
        plan = self.plan
        journal = Journal(
            run_id=plan.run_id,
            source_qmp=str(plan.source_qmp.path),
            target_qmp=str(plan.target_qmp.path),
            storage=plan.storage.value,
            state=self.state.value,
            undo=self.undo.snapshot(),
            files=tuple(str(f) for f in self.run_files()),
            target_resumed=self.facts.target_resumed,
            postcopy_committed=self.facts.postcopy_committed,
            stop_source=plan.policy.stop_source,
        )
        await self.journal.write(journal, durable=durable)

    def open_window(self, paused: QMPEvent) -> None:
        """The source paused the guest (its ``pre-switchover`` event is ``paused``): from now on
        every millisecond is downtime; record what happens until :meth:`close_window`."""
        self.window = [(self.now_ms(), "source pre-switchover event received")]
        lag_ms = (time.time() - paused.timestamp) * 1000.0  # QEMU stamps events on the host clock
        if 0.0 <= lag_ms < 10_000.0:
            self.window.insert(0, (self.now_ms() - lag_ms, "source emitted pre-switchover"))

    def mark(self, what: str) -> None:
        """Note ``what`` in the switchover window, if it is open."""
        if self.window is not None:
            self.window.append((self.now_ms(), what))

    def close_window(self) -> None:
        if self.window is None:
            return
        self.mark("window closed")
        origin = next(ms for ms, what in self.window if what.endswith("received"))
        self.switchover = tuple((ms - origin, what) for ms, what in self.window)
        self.window = None

    def monitor(self, side: Side) -> Monitor:
        return self.source if side is Side.SOURCE else self.target

    def now_ms(self) -> float:
        return (trio.current_time() - self.started_at) * 1000.0

    def spawn(self, task: Callable[[Session], Awaitable[None]]) -> None:
        """Run ``task`` beside the current action, in the engine's nursery: it is cancelled
        when the action is done, and its failure fails the action."""
        if self.during is None:
            raise RuntimeError("background tasks run only during an action")
        self.during.start_soon(task, self)

    def observe(self, observation: Observation) -> None:
        """Fold what an action saw into the facts (:func:`livemig.fsm.observations.observe`).

        :raise GuardFailed: when the table cannot have it here (an engine bug: the run reverts).
        """
        self.facts = observe(self.state, self.facts, observation)

    async def push_undo(self, *steps: UndoStep) -> None:
        """Push ``steps`` (in order) and journal the stack once, durably, before the things
        they undo are created."""
        for step in steps:
            self.undo.push(step)
        await self.write_journal()

    def fail(self, message: str) -> StepFailed:
        return StepFailed(message, state=self.state.value)


async def wait_job(
    stream: EventStream,
    monitor: Monitor,
    job_id: str,
    *,
    until: Literal["ready", "gone"],
    state: State,
    errors_fatal: bool = True,
    look_first: bool = True,
) -> None:
    """Wait until job ``job_id`` is READY, or gone (concluded and dismissed).

    ``stream`` must have been opened before the command that started or changed the job, so no
    event is missed. The job's present status is read once first, in case it is there already.

    :param errors_fatal: whether an error the job reports on its way fails the wait; a cancel
        only wants the job gone, whatever it says as it goes.
    :param look_first: ``False`` skips that first look, when the job is known to be there (a
        round trip saved where it counts: the switchover's mirror cancel).
    :raise StepFailed: when the job reports an error (if fatal), or ends while we wait for READY.
    """
    if look_first:
        present = {j.id: j for j in await jobs.query_jobs(monitor)}
        job = present.get(job_id)
        if job is None:
            if until == "gone":
                return
            raise StepFailed(f"job {job_id} does not exist", state=state.value)
        if until == "ready" and job.status is JobStatus.READY:
            return
    async for event in stream:
        if not _about_job(event, job_id):
            continue
        error = event.data.get("error") if event.name != "JOB_STATUS_CHANGE" else None
        if errors_fatal and (event.name == "BLOCK_JOB_ERROR" or error):
            detail = error or event.data.get("operation") or "I/O error"
            raise StepFailed(f"job {job_id}: {event.name}: {detail}", state=state.value)
        status = _job_status(event)
        if status is None:
            continue
        if until == "ready" and status is JobStatus.READY:
            return
        if until == "ready" and status.ending:
            raise StepFailed(
                f"job {job_id} ended ({status}) before it was ready", state=state.value
            )
        if until == "gone" and status is JobStatus.NULL:
            return
    raise StepFailed(f"event stream ended while waiting for job {job_id}", state=state.value)


def _about_job(event: QMPEvent, job_id: str) -> bool:
    """Whether ``event`` is one of :data:`JOB_EVENTS` about job ``job_id``."""
    key = "id" if event.name == "JOB_STATUS_CHANGE" else "device"
    return event.name in JOB_EVENTS and event.data.get(key) == job_id


#: The status each older ``BLOCK_JOB_*`` event means (``BLOCK_JOB_ERROR`` tells none).
_BLOCK_JOB_EVENT_STATUS = {
    "BLOCK_JOB_READY": JobStatus.READY,
    "BLOCK_JOB_COMPLETED": JobStatus.CONCLUDED,
    "BLOCK_JOB_CANCELLED": JobStatus.CONCLUDED,
}


def _job_status(event: QMPEvent) -> JobStatus | None:
    """The job status ``event`` reports; ``None`` when it tells none."""
    if event.name != "JOB_STATUS_CHANGE":
        return _BLOCK_JOB_EVENT_STATUS.get(event.name)
    word = event.data.get("status")
    return JobStatus.parse(word) if isinstance(word, str) else None


async def wait_migration(
    stream: EventStream, until: Container[MigrationStatus], *, state: State, side: str
) -> MigrationStatus:
    """Wait for a ``MIGRATION`` event whose status is in ``until``; return that status.
    Statuses this livemig does not know are waited past.

    :raise MigrationAborted: when the migration fails or is cancelled first.
    """
    event = await wait_migration_event(stream, until, state=state, side=side)
    return MigrationStatus.parse(str(event.data.get("status")))


async def wait_migration_event(
    stream: EventStream, until: Container[MigrationStatus], *, state: State, side: str
) -> QMPEvent:
    """:func:`wait_migration`, returning the event itself."""
    async for event in stream:
        word = event.data.get("status")
        if event.name != "MIGRATION" or not isinstance(word, str):
            continue
        status = MigrationStatus.parse(word)
        if status in until:
            return event
        if status.dead_end:
            raise MigrationAborted(f"{side} migration {status}", state=state.value)
    raise MigrationAborted(f"{side} migration event stream ended", state=state.value)


def plain(value: Any) -> Any:
    """JSON-friendly copy of a QMP value (for undo step arguments)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
