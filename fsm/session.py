"""The engine's working set for one migration, and the event waits it performs.

A :class:`Session` is the one mutable owner of everything a run touches: the two monitors, the
facts the guards read, the undo stack, the open event streams, the event sink. The engine
(:mod:`livemig.fsm.engine`) performs the scripts' effects on it; only the runner creates it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Literal

import attrs
import trio

from livemig.drivers import jobs
from livemig.drivers.host import Host
from livemig.drivers.qmp import EventStream, Monitor, QMPEvent
from livemig.drivers.status import JobStatus, MigrationStatus
from livemig.fsm.effects import JobGone, Stream
from livemig.fsm.events import Event
from livemig.fsm.journal import Journal, JournalSink
from livemig.fsm.machine import Facts, State
from livemig.fsm.observations import Observation, observe
from livemig.fsm.plan import Plan
from livemig.fsm.script import Context
from livemig.fsm.undo import Side, UndoStack, UndoStep
from livemig.transports.errors import MigrationAborted, StepFailed

__all__ = ["Session", "wait_job", "wait_jobs", "wait_migration"]

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
    """The engine's working set for one run (see the module docstring).

    :param ctx: what the pure scripts read and learn (:class:`~livemig.fsm.script.Context`).
    """

    plan: Plan
    ctx: Context
    source: Monitor
    target: Monitor
    facts: Facts
    emit: Callable[[Event], None]
    started_at: float
    exits: AsyncExitStack
    host: Host
    undo: UndoStack = attrs.field(factory=UndoStack)
    #: The event streams the scripts opened (:class:`~livemig.fsm.effects.Listen`).
    #: Each with the exit that closes it.
    streams: dict[tuple[Side, Stream], tuple[EventStream, AsyncExitStack]] = attrs.field(
        factory=dict
    )
    #: Where the run is journalled (``None``: not journalled).
    journal: JournalSink | None = None
    #: The engine's nursery for the current action (what is spawned beside it).
    during: trio.Nursery | None = None
    #: The switchover window, while it is open: ``(ms since the run started, what)``.
    window: list[tuple[float, str]] | None = None
    #: The window once closed (the target's ``cont`` answered), for the result.
    switchover: tuple[tuple[float, str], ...] = ()

    @property
    def state(self) -> State:
        return self.ctx.state

    @state.setter
    def state(self, state: State) -> None:
        self.ctx.state = state

    @property
    def warnings(self) -> list[str]:
        return self.ctx.warnings

    def run_files(self) -> list[Path]:
        return self.ctx.run_files()

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
            remote=plan.remote,
        )
        await self.journal.write(journal, durable=durable)

    def open_window(
        self, emitted_at: float | None, what: str = "source pre-switchover event received"
    ) -> None:
        """The source paused the guest (QEMU emitted its ``pre-switchover`` at ``emitted_at``,
        host clock; ``None``: unknown; ``what`` names the moment livemig learnt it): from now on
        every millisecond is downtime; record what happens until :meth:`close_window`."""
        self.window = [(self.now_ms(), what)]
        if emitted_at is None:
            return
        lag_ms = (time.time() - emitted_at) * 1000.0  # QEMU stamps events on the host clock
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
        origin = next(ms for ms, what in self.window if not what.startswith("source emitted"))
        self.switchover = tuple((ms - origin, what) for ms, what in self.window)
        self.window = None

    def monitor(self, side: Side) -> Monitor:
        return self.source if side is Side.SOURCE else self.target

    def now_ms(self) -> float:
        return (trio.current_time() - self.started_at) * 1000.0

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


async def wait_job(
    stream: EventStream,
    monitor: Monitor,
    job_id: str,
    *,
    until: Literal["ready", "gone"],
    state: State,
    errors_fatal: bool = True,
    look_first: bool = True,
) -> JobGone | None:
    """Wait until job ``job_id`` is READY (``None``), or gone (concluded and dismissed: how it
    ended, as the events on the way told): :func:`wait_jobs` for one job."""
    (reply,) = await wait_jobs(
        stream,
        monitor,
        (job_id,),
        until=until,
        state=state,
        errors_fatal=errors_fatal,
        look_first=look_first,
    )
    return reply


async def wait_jobs(
    stream: EventStream,
    monitor: Monitor,
    job_ids: Sequence[str],
    *,
    until: Literal["ready", "gone"],
    state: State,
    errors_fatal: bool = True,
    look_first: bool = True,
) -> tuple[JobGone | None, ...]:
    """Wait until every job of ``job_ids`` is READY (``None`` each), or gone (a `JobGone` each:
    how it ended, as the events on the way told), in ``job_ids`` order. One stream serves them
    all, so an event about one job is never lost while another is waited for (the mirrors of a
    VM's disks get ready in any order).

    ``stream`` must have been opened before the commands that started or changed the jobs, so
    no event is missed. The jobs' present status is read once first, in case they are there
    already.

    :param errors_fatal: whether an error a job reports on its way fails the wait; a cancel
        only wants the job gone, whatever it says as it goes.
    :param look_first: ``False`` skips that first look, when the jobs are known to be there (a
        round trip saved where it counts: the switchover's mirror cancel).
    :raise StepFailed: when a job reports an error (if fatal), or ends while we wait for READY.
    """
    replies: dict[str, JobGone | None] = {}
    if look_first:
        present = {j.id: j for j in await jobs.query_jobs(monitor)}
        for job_id in job_ids:
            job = present.get(job_id)
            if job is None:
                if until == "ready":
                    raise StepFailed(f"job {job_id} does not exist", state=state.value)
                replies[job_id] = JobGone(completed=None)
            elif until == "ready" and job.status is JobStatus.READY:
                replies[job_id] = None
    completed = dict.fromkeys(job_ids, True)
    offsets: dict[str, object] = {}
    waiting = [j for j in job_ids if j not in replies]
    if waiting:
        async for event in stream:
            about = _job_of(event)
            if about is None or about not in waiting:
                continue
            job_id = about
            error = event.data.get("error") if event.name != "JOB_STATUS_CHANGE" else None
            if errors_fatal and (event.name == "BLOCK_JOB_ERROR" or error):
                detail = error or event.data.get("operation") or "I/O error"
                raise StepFailed(f"job {job_id}: {event.name}: {detail}", state=state.value)
            if event.name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                offsets[job_id] = event.data.get("offset")
            status = _job_status(event)
            if status is None:
                continue
            if status is JobStatus.ABORTING or event.name == "BLOCK_JOB_CANCELLED":
                completed[job_id] = False
            if until == "ready" and status is JobStatus.READY:
                replies[job_id] = None
            elif until == "ready" and status.ending:
                raise StepFailed(
                    f"job {job_id} ended ({status}) before it was ready", state=state.value
                )
            elif until == "gone" and status is JobStatus.NULL:
                offset = offsets.get(job_id)
                replies[job_id] = JobGone(
                    completed[job_id], offset if isinstance(offset, int) else None
                )
            if job_id in replies:
                waiting.remove(job_id)
                if not waiting:
                    break
        else:
            raise StepFailed(
                f"event stream ended while waiting for job {waiting[0]}", state=state.value
            )
    return tuple(replies[j] for j in job_ids)


def _job_of(event: QMPEvent) -> str | None:
    """The job :data:`JOB_EVENTS` ``event`` is about (``None``: another event)."""
    if event.name not in JOB_EVENTS:
        return None
    value = event.data.get("id" if event.name == "JOB_STATUS_CHANGE" else "device")
    return value if isinstance(value, str) else None


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
