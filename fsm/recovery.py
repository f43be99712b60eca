"""After livemig itself crashed: read the journal and bring the guest to safety.

The deciding question is whether the target runs the guest. It was started paused (``-S``) and
only livemig's ``cont`` makes it run, so a running target means the point of no return was
passed: roll forward (quit the source, remove the run's files). Otherwise revert: run the
journalled undo stack, exactly as the runner would have.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import attrs
import trio

from livemig.drivers import migration, runstate
from livemig.drivers.host import Host, LocalHost
from livemig.drivers.qmp import Monitor
from livemig.drivers.status import MigrationStatus
from livemig.fsm.events import MigrationResult, Outcome
from livemig.fsm.journal import FileJournal, Journal, JournalSink
from livemig.fsm.machine import State
from livemig.fsm.plan import Deadlines
from livemig.fsm.reverter import Liveness, guest_runs, unwind
from livemig.fsm.runner import Connector, ReconnectingMonitor, asyncio_loop, connect_monitor
from livemig.fsm.undo import Side, UndoStack
from livemig.transports.errors import LivemigError, QemuGone, QMPError

__all__ = ["recover"]

#: How often to look at a post-copy that is finishing.
_POLL = 0.05


#: How ``livemig recover`` reaches a target on another host (`livemig.remote.remote_target`):
#: given the journal's ``remote``, an async context in which the journalled target socket
#: reaches the target again, yielding what to do there once the run's outcome is known (remove
#: the target that never ran the guest, or hand its monitor back); that returns a warning or
#: ``None``.
RemoteTarget = Callable[
    [Mapping[str, Any]],
    AbstractAsyncContextManager[Callable[[Outcome], Awaitable[str | None]]],
]


async def recover(
    work_dir: Path,
    *,
    deadlines: Deadlines | None = None,
    connector: Connector = connect_monitor,
    host: Host | None = None,
    journal: JournalSink | None = None,
    remote_target: RemoteTarget | None = None,
) -> list[MigrationResult]:
    """Recover every run journalled in ``work_dir``; an empty list when there is none.

    Each connect, QMP command and undo step is bounded by ``deadlines.recover_step`` (default
    :class:`~livemig.fsm.plan.Deadlines`: 60 s), each
    question whether a QEMU runs the guest by ``deadlines.liveness``, and closing a monitor by
    ``deadlines.close``. (The journal keeps no deadlines: the crashed run's may not suit the
    recovery.)

    :param journal: where the runs were journalled (default: a
        :class:`~livemig.fsm.journal.FileJournal` in ``work_dir``); a recovered run's journal
        is removed, a failed one's kept.
    :param remote_target: how to reach a target on another host (a journal with ``remote``);
        ``None``: such a run is left alone, its journal kept.
    :raise UsageError: when a journal cannot be read.
    """
    deadlines = deadlines or Deadlines()
    sink = journal if journal is not None else FileJournal(work_dir)
    results = []
    async with asyncio_loop():
        for kept in await sink.read():
            if kept.remote is not None:
                result = await _recover_remote(
                    kept, deadlines, connector, host or LocalHost(), remote_target
                )
            else:
                result = await _recover_one(kept, deadlines, connector, host or LocalHost())
            if result.outcome is not Outcome.FAILED:
                await sink.remove(kept.run_id)
            results.append(result)
    return results


async def _recover_one(
    journal: Journal, deadlines: Deadlines, connector: Connector, host: Host
) -> MigrationResult:
    started = trio.current_time()
    problems: list[str] = []
    state = State(journal.state)
    source = await _try_connect(
        connector, journal.source_qmp, "source", state=state, deadlines=deadlines, problems=problems
    )
    target = await _try_connect(
        connector, journal.target_qmp, "target", state=state, deadlines=deadlines, problems=problems
    )
    try:
        on_target = await _liveness(target, deadlines)
        on_source = await _liveness(source, deadlines)
        target_runs = on_target is Liveness.RUNS
        if on_target is Liveness.UNKNOWN:
            outcome = Outcome.FAILED
            problems.append("cannot tell whether the target runs the guest (the journal is kept)")
        elif target_runs and on_source is Liveness.RUNS:
            outcome = Outcome.FAILED
            problems.append("both QEMUs run the guest: stop one by hand (the journal is kept)")
        elif not target_runs and (journal.target_resumed or journal.postcopy_committed):
            outcome = Outcome.FAILED
            problems.append(
                "the target ran the guest but no longer does: the source QEMU is kept as it is "
                "(the journal is kept)"
            )
        elif target_runs:
            outcome = await _roll_forward(
                journal, source, target, host, problems, deadlines=deadlines
            )
        elif source is None:
            outcome = Outcome.FAILED
            problems.append("the source is unreachable and the target does not run the guest")
        else:
            outcome = await _revert(journal, source, target, host, problems, deadlines=deadlines)
    finally:
        for monitor in (source, target):
            if monitor is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(deadlines.close):
                    await monitor.aclose()
    return MigrationResult(
        outcome=outcome,
        states=(journal.state, outcome.value),
        total_ms=(trio.current_time() - started) * 1000.0,
        error="; ".join(problems) or None,
        error_type="RecoveryProblem" if problems else None,
        failed_in=journal.state,
        undo_failures=tuple(problems) if outcome is Outcome.FAILED else (),
    )


async def _recover_remote(
    journal: Journal,
    deadlines: Deadlines,
    connector: Connector,
    host: Host,
    remote_target: RemoteTarget | None,
) -> MigrationResult:
    """:func:`_recover_one` with the target on another host reached again first."""
    assert journal.remote is not None
    problem = None
    if remote_target is None:
        problem = "the target is on another host and no way to reach it was given"
    else:
        try:
            async with remote_target(journal.remote) as finish:
                result = await _recover_one(journal, deadlines, connector, host)
                with trio.CancelScope(shield=True):
                    warning = await finish(result.outcome)
                if warning is None:
                    return result
                return attrs.evolve(result, warnings=(*result.warnings, warning))
        except LivemigError as err:
            problem = f"cannot reach the target's host: {err}"
    return MigrationResult(
        outcome=Outcome.FAILED,
        states=(journal.state, Outcome.FAILED.value),
        total_ms=0.0,
        error=f"{problem} (the journal is kept)",
        error_type="RecoveryProblem",
        failed_in=journal.state,
        undo_failures=(problem,),
    )


async def _try_connect(
    connector: Connector,
    path: str,
    name: str,
    *,
    state: State,
    deadlines: Deadlines,
    problems: list[str],
) -> Monitor | None:
    """A monitor that reconnects when its link drops (so a dropped link is not taken for a dead
    QEMU), each command and reconnect bounded by ``recover_step``; ``None`` when unreachable."""
    step = deadlines.recover_step
    monitor = ReconnectingMonitor(
        connector,
        Path(path),
        name,
        attrs.evolve(deadlines, connect=step, command=step),
        state=lambda: state,
    )
    try:
        await monitor.open()
    except LivemigError as err:
        problems.append(f"{name} monitor unreachable ({err}): taken as gone")
        return None
    return monitor


async def _liveness(monitor: Monitor | None, deadlines: Deadlines) -> Liveness:
    """What a QEMU does with the guest; one failed question decides nothing (``guest_runs``)."""
    if monitor is None:
        return Liveness.GONE
    return await guest_runs(monitor, patience=deadlines.liveness)


async def _roll_forward(
    journal: Journal,
    source: Monitor | None,
    target: Monitor | None,
    host: Host,
    problems: list[str],
    *,
    deadlines: Deadlines,
) -> Outcome:
    if journal.postcopy_committed and not await _finish_postcopy(
        source, target, deadlines, problems
    ):
        return Outcome.FAILED
    if source is not None and journal.stop_source:
        try:
            with trio.fail_after(deadlines.recover_step):
                await runstate.quit(source)
        except (QMPError, trio.TooSlowError) as err:
            problems.append(f"could not quit the source: {err}")
    for name in journal.files:
        await host.remove(Path(name))
    return Outcome.FINALIZED


async def _finish_postcopy(
    source: Monitor | None, target: Monitor | None, deadlines: Deadlines, problems: list[str]
) -> bool:
    """Post-copy was committed: the target must run, and the source must serve its pages until
    the migration completed, before the source may go."""
    if target is None:
        problems.append("post-copy was committed but the target is gone: the guest is lost")
        return False
    try:
        with trio.fail_after(deadlines.recover_step):
            if await _liveness(target, deadlines) is not Liveness.RUNS:
                await runstate.cont(target)
            while source is not None:
                if not _serving_pages((await migration.query_migrate(source)).status):
                    break
                await trio.sleep(_POLL)
    except (QMPError, trio.TooSlowError) as err:
        problems.append(f"could not finish post-copy: {err}")
        return False
    return True


def _serving_pages(status: MigrationStatus) -> bool:
    """Whether a source whose post-copy was committed may still hold pages the target lacks.

    A status this livemig does not know counts: waiting it out until the deadline fails the
    recovery and keeps the journal, while quitting a source that still serves pages loses the
    guest.
    """
    return status.postcopy or status in (
        MigrationStatus.PRE_SWITCHOVER,
        MigrationStatus.DEVICE,
        MigrationStatus.UNKNOWN,
    )


async def _revert(
    journal: Journal,
    source: Monitor,
    target: Monitor | None,
    host: Host,
    problems: list[str],
    *,
    deadlines: Deadlines,
) -> Outcome:
    monitors: Mapping[Side, Monitor] = {Side.SOURCE: source, Side.TARGET: target or _Gone()}
    undo = UndoStack(steps=list(journal.undo))
    failures = await unwind(
        undo,
        monitors,
        host,
        state=State(journal.state),
        step_deadline=deadlines.recover_step,
        patience=deadlines.liveness,
    )
    problems += failures
    if failures:
        # Not after a failed undo: the overlay may still be the guest's active layer.
        return Outcome.FAILED
    for name in journal.files:
        await host.remove(Path(name))
    return Outcome.REVERTED


class _Gone:
    """The target's monitor when its QEMU is gone: every target-side undo step is then done."""

    name = "target"

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        raise QemuGone(f"{command}: the target is gone", monitor=self.name)

    def listen(self, *names: str) -> Any:
        raise QemuGone("the target is gone", monitor=self.name)

    async def aclose(self) -> None:
        return None
