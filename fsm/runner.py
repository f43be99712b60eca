"""The runner: the one owner of the machine, the monitors, every deadline and all concurrency.

For each step it asks the table for the next trigger, awaits that trigger's action under the
plan's deadline, then fires the trigger, whose guard checks what the action observed. Any fault
before the point of no return unwinds the undo stack (shielded from cancellation) and ends in
``reverted``; an undo step that fails, or a fault after the point of no return, ends in
``failed`` with a report of what is where.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import trio
import trio_asyncio

from livemig.drivers import migration, qmp
from livemig.drivers.host import Host, LocalHost
from livemig.drivers.qmp import EventStream, Monitor
from livemig.fsm.engine import perform
from livemig.fsm.events import (
    DiskResult,
    Event,
    MigrationResult,
    Outcome,
    Reverting,
    StateEntered,
)
from livemig.fsm.journal import FileJournal, JournalSink
from livemig.fsm.machine import NO_RETURN, Facts, MigrationMachine, State, Trigger
from livemig.fsm.observations import UndoFinished
from livemig.fsm.plan import Deadlines, Plan
from livemig.fsm.reverter import Liveness, guest_runs, unwind
from livemig.fsm.script import DURING, SCRIPTS, Context
from livemig.fsm.session import Session
from livemig.fsm.undo import Side
from livemig.transports.errors import (
    ConnectFailed,
    ConnectionLost,
    DeadlineExceeded,
    Interrupted,
    LinkLost,
    LivemigError,
    QemuGone,
    StepFailed,
    UsageError,
)

__all__ = ["Connector", "ReconnectingMonitor", "asyncio_loop", "connect_monitor", "migrate"]

log = logging.getLogger("livemig.runner")

#: Opens a monitor: ``(socket path, name) -> Monitor``. Fault injection wraps this.
Connector = Callable[[Path, str], Awaitable[Monitor]]


async def connect_monitor(path: Path, name: str) -> Monitor:
    return await qmp.connect(path, name=name)


async def migrate(
    plan: Plan,
    *,
    on_event: Callable[[Event], None] | None = None,
    connector: Connector = connect_monitor,
    host: Host | None = None,
    interrupt: trio.Event | None = None,
    journal: JournalSink | None = None,
    give_up: Callable[[], Awaitable[str]] | None = None,
) -> MigrationResult:
    """Migrate the guest as ``plan`` says, and report how it ended.

    Never raises for a migration fault: the result says ``reverted`` or ``failed`` and why. If
    ``interrupt`` is set while the migration runs, it reverts and ends ``reverted`` with an
    :class:`~livemig.transports.errors.Interrupted` error. If the caller cancels the surrounding
    scope,
    the revert still runs (shielded) before the cancellation goes on.

    :param on_event: called synchronously with every :class:`~livemig.fsm.events.Event`, as
        it happens — ``pre-switchover``'s while the guest is paused, so keep it cheap (queue
        the event, do not log it to a remote store inline): its time is guest downtime. (Fault
        injection relies on seeing each state the moment it is entered.)
    :param connector: how to open a monitor (tests and fault campaigns pass their own).
    :param host: files and ``qemu-img`` on this machine (fault campaigns pass their own).
    :param journal: where the run is journalled for ``livemig recover`` (default: a
        :class:`~livemig.fsm.journal.FileJournal` in the plan's work dir).
    :param give_up: returns (with the reason) when the migration cannot go on, such as the
        target's host unreachable for too long (`livemig.remote`): before the point of no
        return it reverts with :class:`~livemig.transports.errors.LinkLost`; after it, it is
        ignored (the target runs the guest, or post-copy must finish).
    """
    async with asyncio_loop():
        runner = _Runner(plan, on_event or _ignore, connector, host or LocalHost())
        runner.journal = journal if journal is not None else FileJournal(plan.work_dir)
        runner.give_up = give_up
        return await runner.run(interrupt)


def _ignore(event: Event) -> None:
    del event


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """qemu.qmp needs an asyncio loop; open one on top of trio unless the caller has."""
    if trio_asyncio.current_loop.get(None) is not None:
        yield
        return
    async with trio_asyncio.open_loop():
        yield


class _Runner:
    def __init__(
        self, plan: Plan, emit: Callable[[Event], None], connector: Connector, host: Host
    ) -> None:
        self.plan = plan
        self.host = host
        self.machine = MigrationMachine()
        self.connector = connector
        self._emit = emit
        self.states: list[str] = []
        self.entered_at: dict[str, float] = {}
        self.failures: tuple[str, ...] = ()
        self.failed_in: str | None = None
        self.refused = False
        self.journal: JournalSink | None = None
        self.give_up: Callable[[], Awaitable[str]] | None = None
        self.gave_up: LinkLost | None = None

    def emit(self, event: Event) -> None:
        try:
            self._emit(event)
        except Exception:
            log.exception("an event callback raised; the migration goes on")

    async def run(self, interrupt: trio.Event | None) -> MigrationResult:
        started = trio.current_time()
        async with AsyncExitStack() as exits:
            session = Session(
                plan=self.plan,
                ctx=Context(self.plan),
                source=_Unconnected("source"),
                target=_Unconnected("target"),
                facts=Facts(storage=self.plan.storage.route),
                emit=self.emit,
                started_at=started,
                exits=exits,
                host=self.host,
            )
            session.journal = self.journal
            await self._enter(session, State.IDLE)
            error = await self._forward(session, interrupt)
            if error is not None:
                self.failed_in = session.state.value
                if _refused(error, session):
                    # Bad input, seen before anything was touched: nothing to undo, nothing
                    # journalled, no terminal state entered.
                    self.refused = True
                    return self._result(session, error)
                await self._back(session, error)
            if self.journal is not None and self.machine.current is not State.FAILED:
                # A failed run keeps its journal: ``livemig recover`` can try again later.
                with trio.CancelScope(shield=True):
                    await self.journal.remove(self.plan.run_id)
            return self._result(session, error)

    async def _forward(
        self, session: Session, interrupt: trio.Event | None
    ) -> BaseException | None:
        """Run forward to ``finalized``; return the fault that stopped it, if any."""
        try:
            async with trio.open_nursery() as nursery:
                if interrupt is not None:
                    nursery.start_soon(_cancel_on, interrupt, nursery.cancel_scope)
                if self.give_up is not None:
                    nursery.start_soon(self._give_up_on, session, nursery.cancel_scope)
                _check_work_dir(self.plan.work_dir)
                await self._connect(session)
                while (trigger := self.machine.forward(session.facts)) is not None:
                    await self._step(session, trigger)
                nursery.cancel_scope.cancel()
        except BaseException as exc:
            fault = _primary(exc)
            if isinstance(fault, Exception):
                return fault  # every fault, even a bug of ours, reverts
            # Cancelled from outside, or KeyboardInterrupt: revert anyway (shielded), then let
            # it go on.
            self.failed_in = session.state.value
            await self._back(session, Interrupted("cancelled", state=session.state.value))
            raise
        if self.gave_up is not None:
            return self.gave_up
        if (
            interrupt is not None
            and interrupt.is_set()
            and self.machine.current is not State.FINALIZED
        ):
            return Interrupted("interrupted by the operator", state=session.state.value)
        return None

    async def _give_up_on(self, session: Session, scope: trio.CancelScope) -> None:
        """Revert when :attr:`give_up` returns before the point of no return; in post-copy,
        pause it instead (its link is gone: finalize resumes it once the link is back)."""
        assert self.give_up is not None
        while True:
            reason = await self.give_up()
            if session.state is State.POSTCOPY:
                log.warning("%s; pausing post-copy to resume it later", reason)
                with suppress(LivemigError):  # already paused: QEMU saw it first
                    await migration.migrate_pause(session.source)
                await trio.sleep(self.plan.deadlines.link)
                continue
            if session.state in NO_RETURN or session.state is State.FINALIZED:
                log.warning("%s; past the point of no return, the migration goes on", reason)
                return
            self.gave_up = LinkLost(reason, state=session.state.value)
            scope.cancel()
            return

    async def _connect(self, session: Session) -> None:
        """Open both monitors at once; each is closed on the way out once it is open."""
        plan = self.plan

        async def open_one(name: str, path: Path) -> None:
            monitor = ReconnectingMonitor(
                self.connector,
                path,
                name,
                plan.deadlines,
                state=lambda: session.state,
                mark=session.mark,
            )
            await monitor.open()
            session.exits.push_async_callback(_close, monitor, plan.deadlines.close)
            if name == "source":
                session.source = monitor
            else:
                session.target = monitor

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_one, "source", plan.source_qmp.path)
            nursery.start_soon(open_one, "target", plan.target_qmp.path)

    async def _step(self, session: Session, trigger: Trigger) -> None:
        script = SCRIPTS[trigger]
        seconds = _action_deadline(trigger, self.plan.deadlines, session)
        # Past the point of no return a cancel (the operator's ^C) cannot take the guest back:
        # the run finishes (bounded by its deadline) rather than stop half-way.
        with (
            trio.CancelScope(shield=self.machine.current in NO_RETURN),
            _deadline(seconds, trigger.value, session.state),
        ):
            # The engine's one nursery for the action: what runs beside it (DURING, and what
            # the action spawns) ends with it.
            async with trio.open_nursery() as during:
                session.during = during
                if (beside := DURING.get(self.machine.current)) is not None:
                    during.start_soon(perform, session, beside(session.ctx))
                try:
                    await perform(session, script(session.ctx))
                finally:
                    session.during = None
                    during.cancel_scope.cancel()
            await self._enter(session, self.machine.fire(trigger, session.facts))

    async def _enter(self, session: Session, state: State) -> None:
        now = session.now_ms()
        session.state = state
        self.states.append(state.value)
        self.entered_at[state.value] = now
        if state not in _UNJOURNALLED and len(session.undo) > 0:
            await session.write_journal(durable=state is State.SWITCHED_OVER)
        self.emit(StateEntered(state.value, now))

    async def _back(self, session: Session, error: BaseException) -> None:
        """Unwind the undo stack and end in ``reverted`` or ``failed``."""
        with trio.CancelScope(shield=True):
            self.emit(
                Reverting(
                    session.state.value, session.now_ms(), _describe(error), len(session.undo)
                )
            )
            failures: list[str] = []
            if not (session.facts.target_resumed or session.facts.postcopy_committed):
                monitors: Mapping[Side, Monitor] = {
                    Side.SOURCE: session.source,
                    Side.TARGET: session.target,
                }
                touched = len(session.undo) > 0
                failures = await unwind(
                    session.undo,
                    monitors,
                    self.host,
                    state=session.state,
                    step_deadline=self.plan.deadlines.undo_step,
                    patience=self.plan.deadlines.liveness,
                )
                if not failures:
                    # A socket a QEMU bound while its command was being cancelled can appear
                    # after its undo step ran: sweep the run's files once everything is undone.
                    # (Not after a failed undo: the overlay may still hold guest writes.)
                    for path in session.run_files():
                        try:
                            await self.host.remove(path)
                        except Exception as err:  # the guest is safe: a warning
                            session.warnings.append(f"could not remove {path}: {err}")
                failures += await self._source_safe(session, touched=touched)
            else:
                failures = [
                    "past the point of no return (the target was or may have been resumed, or "
                    "post-copy was committed): nothing was undone; the source must not be "
                    "resumed while the target may run the guest"
                ]
            self.failures = tuple(failures)
            session.observe(UndoFinished(clean=not failures))
            if len(session.undo) > 0:
                await session.write_journal()  # the steps that failed, for ``livemig recover``
            trigger = (
                Trigger.REVERT
                if self.machine.allows(Trigger.REVERT, session.facts)
                else Trigger.FAIL
            )
            await self._enter(session, self.machine.fire(trigger, session.facts))

    async def _source_safe(self, session: Session, *, touched: bool) -> list[str]:
        """``reverted`` promises the guest is safe on the source: look before saying so.

        After a revert that touched something, the guest must run there. A run stopped before
        touching anything leaves the source as it was (a paused guest stays paused), but a source
        that is gone is no safe end either.
        """
        if isinstance(session.source, _Unconnected):
            return []  # never reached: nothing was touched and nothing can be known
        liveness = await guest_runs(session.source, patience=self.plan.deadlines.liveness)
        if liveness is Liveness.RUNS or (not touched and liveness is Liveness.STOPPED):
            return []
        return [f"the source guest is not safe after the revert: its QEMU {liveness.value}"]

    def _result(self, session: Session, error: BaseException | None) -> MigrationResult:
        session.close_window()  # still open when the switchover failed
        total = session.now_ms()
        outcome = Outcome.REFUSED if self.refused else Outcome(self.machine.current.value)
        return MigrationResult(
            outcome=outcome,
            states=tuple(self.states),
            total_ms=total,
            downtime_ms=session.ctx.downtime_ms,
            ram_bytes=session.ctx.ram_bytes,
            disk_bytes=session.ctx.disk_bytes,
            error=_describe(error) if error is not None else None,
            error_type=type(error).__name__ if error is not None else None,
            failed_in=self.failed_in,
            warnings=tuple(session.warnings),
            undo_failures=self.failures,
            phases_ms=tuple(_phases(self.states, self.entered_at, total)),
            interrupted=isinstance(error, Interrupted),
            switchover=session.switchover,
            disks=_disk_results(session.ctx),
            transfer=verdict.transfer.value if (verdict := session.ctx.verdict) else None,
            fallback=verdict.fallback if verdict else None,
        )


#: States entered without a journal write: the terminal ones (the runner keeps or removes the
#: journal as it was), and ``pre-switchover`` and ``state-saved``, where the guest is paused and
#: every millisecond is downtime (what a revert needs is on the journalled undo stack).
_UNJOURNALLED = frozenset(
    {State.PRE_SWITCHOVER, State.STATE_SAVED, State.FINALIZED, State.REVERTED, State.FAILED}
)


def _disk_results(ctx: Context) -> tuple[DiskResult, ...]:
    if ctx.verdict is None:
        return ()
    return tuple(
        DiskResult(
            name=d.name,
            copied=d.copied,
            source=d.base_image[0],
            target=d.target_image,
            bytes_sent=ctx.disk_sent.get(d.name) if d.copied else None,
        )
        for d in ctx.verdict.disks
    )


def _refused(error: BaseException, session: Session) -> bool:
    """Whether ``error`` refuses the run: bad input (a :class:`UsageError`, or a monitor that
    cannot be reached) found before the first undo step was pushed, so nothing was touched."""
    return isinstance(error, UsageError | ConnectFailed) and len(session.undo) == 0


def _check_work_dir(work_dir: Path) -> None:
    """The work dir exists (it is created if need be) and this process can write to it.

    Inline syscalls, not a worker thread: a mkdir and an access check are metadata calls, and a
    thread hop here let a test's autojump clock leap past every deadline while the thread ran
    (a busy machine made a fake run time out).

    :raise UsageError: when it cannot be created or written; nothing is left in it.
    """
    try:
        os.makedirs(work_dir, mode=0o700, exist_ok=True)
    except OSError as err:
        raise UsageError(f"work dir {work_dir} cannot be created: {err.strerror}") from err
    if not os.access(work_dir, os.W_OK | os.X_OK):
        raise UsageError(f"work dir {work_dir} is not writable")


def _phases(
    states: list[str], entered: Mapping[str, float], total: float
) -> list[tuple[str, float]]:
    out = []
    for here, after in zip(states, [*states[1:], None], strict=True):
        end = entered[after] if after is not None else total
        out.append((here, end - entered[here]))
    return out


def _action_deadline(trigger: Trigger, d: Deadlines, session: Session) -> float:
    """The one deadline of ``trigger``'s action. The RAM phase's scales by the guest's RAM and
    the bandwidth cap, both known by then (connect, set-capabilities)."""
    if trigger is Trigger.AWAIT_SWITCHOVER:
        return d.ram_phase(session.ctx.guest_ram or 0, session.ctx.bandwidth)
    return {
        Trigger.CONNECT: d.command * 4,
        Trigger.SET_CAPABILITIES: d.command * 4,
        Trigger.SNAPSHOT: d.command * 3,
        Trigger.MIRROR: d.base_copy + d.mirror_ready,
        Trigger.TRANSFER_STATE: d.command * 2,
        Trigger.SWITCH_OVER: d.completion,
        # From post-copy, with time to resume it after a broken link.
        Trigger.FINALIZE: d.completion
        + (d.link + d.postcopy_recover if session.state is State.POSTCOPY else 0.0),
        Trigger.SWITCH_OVER_POSTCOPY: d.completion,
        # The whole RAM is written to a file, then read back: the RAM phase's budget each.
        Trigger.SAVE_STATE: d.completion + d.ram_phase(session.ctx.guest_ram or 0),
        Trigger.RESTORE_STATE: d.completion + d.ram_phase(session.ctx.guest_ram or 0),
    }[trigger]


class _deadline:  # noqa: N801 - used like trio.fail_after
    """``trio.fail_after`` that raises :class:`DeadlineExceeded` naming what was waited for."""

    def __init__(self, seconds: float, what: str, state: State) -> None:
        self._scope = trio.fail_after(seconds)
        self._seconds, self._what, self._state = seconds, what, state

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(self, *exc: Any) -> bool:
        try:
            return bool(self._scope.__exit__(*exc))
        except trio.TooSlowError as err:
            message = f"{self._what} took longer than {self._seconds:g} s"
            raise DeadlineExceeded(message, state=self._state.value) from err


class ReconnectingMonitor:
    """A monitor that bounds every command by the command deadline, and opens a new connection
    when the old one dropped (the runner's and ``livemig recover``'s).

    A dropped connection is not a dead QEMU: the command that saw the drop still fails (it may
    or may not have run, so the forward path reverts), but the next command reconnects. If
    QEMU is really gone, the reconnect fails and raises :class:`QemuGone`. Without this, a
    flaky socket would turn into a guest stuck half-migrated.

    :param state: the state to name in a deadline's error.
    :param mark: told of every command sent and answered (the switchover timeline).
    """

    def __init__(
        self,
        connector: Connector,
        path: Path,
        name: str,
        deadlines: Deadlines,
        *,
        state: Callable[[], State],
        mark: Callable[[str], None] = lambda what: None,
    ) -> None:
        self._connector, self._path, self.name = connector, path, name
        self._deadlines, self._state, self._mark = deadlines, state, mark
        self._inner: Monitor | None = None
        self._dropped: Monitor | None = None
        self._reconnecting = trio.Lock()

    async def open(self) -> None:
        """The first connection: a socket that accepts but does not greet is bad input.

        :raise ConnectFailed: when the greeting does not come within the connect deadline.
        """
        seconds = self._deadlines.connect
        try:
            with trio.fail_after(seconds):
                self._inner = await self._connector(self._path, self.name)
        except trio.TooSlowError as err:
            raise ConnectFailed(
                f"{self._path} gave no QMP greeting within {seconds:g} s: is it a QEMU monitor?",
                monitor=self.name,
            ) from err

    async def _current(self) -> Monitor:
        if self._inner is not None:
            return self._inner
        # Commands run at once (a gather of queries) must not each open a connection.
        async with self._reconnecting:
            return await self._reconnect()

    async def _reconnect(self) -> Monitor:
        if self._inner is not None:
            return self._inner  # another command reconnected while this one waited
        if self._dropped is not None:
            await _close(self._dropped, self._deadlines.close)
            self._dropped = None
        log.info("%s: the monitor connection dropped; reconnecting", self.name)
        try:
            with trio.fail_after(self._deadlines.connect):
                self._inner = await self._connector(self._path, self.name)
        except (LivemigError, trio.TooSlowError) as err:
            raise QemuGone(f"gone: cannot reconnect ({err})", monitor=self.name) from err
        return self._inner

    def _lost(self, monitor: Monitor) -> None:
        if monitor is self._inner:
            self._dropped, self._inner = monitor, None

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        monitor = await self._current()
        mark = self._mark
        with _deadline(self._deadlines.command, f"{self.name} {command}", self._state()):
            mark(f"→ {self.name} {command}")
            try:
                reply = await monitor.execute(command, arguments)
            except ConnectionLost:
                self._lost(monitor)
                mark(f"✗ {self.name} {command}")
                raise
            except BaseException:
                mark(f"✗ {self.name} {command}")
                raise
            mark(f"← {self.name} {command}")
            return reply

    def listen(self, *names: str) -> AbstractAsyncContextManager[EventStream]:
        return self._listen(names)

    @asynccontextmanager
    async def _listen(self, names: tuple[str, ...]) -> AsyncIterator[EventStream]:
        monitor = await self._current()
        async with monitor.listen(*names) as stream:
            yield stream

    async def aclose(self) -> None:
        for monitor in (self._inner, self._dropped):
            if monitor is not None:
                await _close(monitor, self._deadlines.close)
        self._inner = self._dropped = None


class _Unconnected:
    """Stands in for a monitor before connect, so an early revert has nothing to act on."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        raise StepFailed(f"{self.name} monitor never connected", state=State.IDLE.value)

    def listen(self, *names: str) -> Any:
        raise StepFailed(f"{self.name} monitor never connected", state=State.IDLE.value)

    async def aclose(self) -> None:
        return None


async def _close(monitor: Monitor, seconds: float) -> None:
    """Close ``monitor``, shielded, giving up after ``seconds`` (``Deadlines.close``)."""
    with trio.CancelScope(shield=True), trio.move_on_after(seconds):
        await monitor.aclose()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _primary(err: BaseException) -> BaseException:
    """The one error that matters in a (possibly nested) exception group."""
    while isinstance(err, BaseExceptionGroup):
        leaves = [e for e in err.exceptions if not isinstance(e, trio.Cancelled)]
        if not leaves:
            return err.exceptions[0]
        # A livemig error says more than whatever it caused elsewhere (a Cancelled, a bug).
        err = next((e for e in leaves if isinstance(e, LivemigError)), leaves[0])
    return err


def _describe(err: BaseException) -> str:
    if isinstance(err, LivemigError):
        return str(err)
    return f"{type(err).__name__}: {err}"
