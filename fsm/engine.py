"""The engine: performs what a pure script (:mod:`livemig.fsm.script`) yields.

:func:`perform` drives one script to its end on a :class:`~livemig.fsm.session.Session`: it takes
the next effect, performs it through the drivers, the host and the session, and sends back the
reply — or throws the error it raised into the script, which handles it or lets it go. Every
command goes through the session's monitors, which bound it by the command deadline; the runner
bounds the whole action. The only concurrency a script gets is what it asks for: a
:class:`~livemig.fsm.effects.Gather` of read-only queries, a
:class:`~livemig.fsm.effects.Spawn` in the action's nursery (which the runner owns).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import attrs
import trio

from livemig.drivers import migration
from livemig.drivers.qapi import EventStream
from livemig.drivers.status import MigrationStatus
from livemig.fsm.effects import (
    AskRuns,
    AwaitJob,
    AwaitMigration,
    Call,
    ClearUndo,
    Clock,
    CloseWindow,
    DropUndo,
    Effect,
    Emit,
    Gather,
    Listen,
    Mark,
    MigrationEvent,
    Observe,
    OnHost,
    OnHostAll,
    OpenWindow,
    PushUndo,
    Script,
    Shielded,
    Sleep,
    Spawn,
    Stream,
    WriteJournal,
)
from livemig.fsm.reverter import Liveness, guest_runs
from livemig.fsm.session import JOB_EVENTS, Session, wait_jobs, wait_migration_event
from livemig.fsm.undo import Side
from livemig.transports.errors import LivemigError, MigrationAborted, StepFailed

__all__ = ["perform"]

_STREAM_EVENTS = {Stream.MIGRATION: ("MIGRATION",), Stream.JOBS: JOB_EVENTS}


async def perform(session: Session, script: Script) -> None:
    """Run ``script`` to its end, performing each effect it yields."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            if error is None:
                effect = script.send(reply)
            else:
                effect, error = script.throw(error), None
        except StopIteration:
            return
        try:
            reply = await _perform(session, effect)
        except BaseException as err:  # thrown into the script: it decides
            reply, error = None, err


async def _perform(session: Session, effect: Effect) -> Any:
    match effect:
        case Call(side=side, op=op, args=args, kwargs=kwargs):
            return await op(session.monitor(side), *args, **kwargs)
        case Gather(calls=calls):
            return await _gather(session, calls)
        case OnHost(op=op, args=args, kwargs=kwargs):
            return await getattr(session.host, op)(*args, **kwargs)
        case OnHostAll(ops=ops):
            await _on_host_all(session, ops)
        case PushUndo(steps=steps):
            await session.push_undo(*steps)
        case DropUndo(kind=kind, side=side):
            session.undo.discard(kind, side)
        case ClearUndo():
            session.undo.clear()
        case Observe(observation=observation):
            session.observe(observation)
        case Listen():
            await _listen(session, effect)
        case AwaitJob(side=side, jobs=job_ids, until=until, look_first=look_first):
            return await wait_jobs(
                _stream(session, side, Stream.JOBS),
                session.monitor(side),
                job_ids,
                until=until,
                state=session.state,
                look_first=look_first,
            )
        case AwaitMigration(side=side, until=until):
            try:
                event = await wait_migration_event(
                    _stream(session, side, Stream.MIGRATION),
                    until,
                    state=session.state,
                    side=side.value,
                )
            except MigrationAborted as err:
                raise await _with_qemus_reason(session, side, err) from err
            return MigrationEvent(MigrationStatus.parse(str(event.data["status"])), event.timestamp)
        case AskRuns(side=side):
            with trio.CancelScope(shield=True):
                liveness = await guest_runs(
                    session.monitor(side), patience=session.plan.deadlines.liveness
                )
            return None if liveness is Liveness.UNKNOWN else liveness is Liveness.RUNS
        case Shielded(effect=inner):
            with trio.CancelScope(shield=True):
                return await _perform(session, inner)
        case Spawn(script=make):
            if session.during is None:
                raise RuntimeError("a script spawns only during an action")
            session.during.start_soon(perform, session, make())
        case Emit(event=event):
            session.emit(attrs.evolve(event, at_ms=session.now_ms()))
        case Clock():
            return trio.current_time()
        case Sleep(seconds=seconds):
            await trio.sleep(seconds)
        case Mark(what=what):
            session.mark(what)
        case OpenWindow(emitted_at=emitted_at, what=what):
            session.open_window(emitted_at, what)
        case CloseWindow():
            session.close_window()
        case WriteJournal():
            await session.write_journal()
    return None


async def _gather(session: Session, calls: tuple[Call, ...]) -> tuple[Any, ...]:
    """The calls of each side in order, the two sides at once: one QEMU's commands keep the
    order the script gave (what it sees does not depend on trio's scheduling), and the two
    QEMUs' round trips overlap. A side stops at its first failure (what follows on that side
    may rely on it); the other side runs to its end. The first failure *in ``calls`` order* is
    raised, so which reply came first does not change the outcome."""
    replies: list[Any] = [None] * len(calls)
    errors: list[Exception | None] = [None] * len(calls)

    async def lane(side: Side) -> None:
        for i, c in enumerate(calls):
            if c.side is side:
                try:
                    replies[i] = await c.op(session.monitor(side), *c.args, **c.kwargs)
                except Exception as err:
                    errors[i] = err
                    return

    async with trio.open_nursery() as nursery:
        for side in dict.fromkeys(c.side for c in calls):
            nursery.start_soon(lane, side)
    for err in errors:
        if err is not None:
            raise err
    return tuple(replies)


async def _on_host_all(session: Session, ops: tuple[OnHost, ...]) -> None:
    """Every op at once, each to its end; the first failure in ``ops`` order is raised."""
    errors: list[Exception | None] = [None] * len(ops)

    async def one(i: int, effect: OnHost) -> None:
        try:
            await getattr(session.host, effect.op)(*effect.args, **effect.kwargs)
        except Exception as err:
            errors[i] = err

    async with trio.open_nursery() as nursery:
        for i, effect in enumerate(ops):
            nursery.start_soon(one, i, effect)
    for err in errors:
        if err is not None:
            raise err


async def _listen(session: Session, effect: Listen) -> None:
    key = (effect.side, effect.stream)
    if (old := session.streams.pop(key, None)) is not None:
        await old[1].aclose()
    exits = AsyncExitStack()
    session.exits.push_async_callback(exits.aclose)  # at the run's end (closing twice is fine)
    monitor = session.monitor(effect.side)
    stream = await exits.enter_async_context(monitor.listen(*_STREAM_EVENTS[effect.stream]))
    session.streams[key] = (stream, exits)


async def _with_qemus_reason(
    session: Session, side: Side, err: MigrationAborted
) -> MigrationAborted:
    """``err`` with QEMU's own reason (``error-desc``), when it still tells in a moment."""
    with trio.move_on_after(_REASON_PATIENCE):
        try:
            stats = await migration.query_migrate(session.monitor(side))
        except LivemigError:
            return err
        if stats.error_desc:
            said = str(err).removeprefix(f"in state {err.state}: ")
            return MigrationAborted(f"{said}: {stats.error_desc}", state=err.state)
    return err


#: Seconds to ask a QEMU why its migration failed.
_REASON_PATIENCE = 2.0


def _stream(session: Session, side: Side, stream: Stream) -> EventStream:
    try:
        return session.streams[(side, stream)][0]
    except KeyError:
        raise StepFailed(
            f"no {stream} events of the {side} are being listened to", state=session.state.value
        ) from None
