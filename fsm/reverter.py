"""The one interpreter of undo steps.

Each step first looks at what is there and does only what is still needed, so running a step
twice, or a step whose forward action never happened, is harmless. A target-side step whose
monitor is gone counts as done: the target process, and everything it held, is gone with it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from pathlib import Path

import trio

from livemig.drivers import block, jobs, migration, nbd, objects, runstate
from livemig.drivers.host import Host
from livemig.drivers.qmp import Monitor
from livemig.drivers.status import JobStatus, MigrationStatus, RunState
from livemig.fsm.machine import State
from livemig.fsm.session import JOB_EVENTS, wait_job
from livemig.fsm.undo import Side, UndoKind, UndoStack, UndoStep
from livemig.transports.errors import (
    CommandFailed,
    ConnectFailed,
    ConnectionLost,
    DeadlineExceeded,
    LivemigError,
    MigrationError,
    QemuGone,
    QMPError,
    ToolError,
)

__all__ = ["Liveness", "guest_runs", "run_undo", "unwind"]

log = logging.getLogger("livemig.revert")

#: How many times an undo step is tried before its failure is recorded.
_ATTEMPTS = 4
#: How often to look while waiting for QEMU to settle after a cancel.
_SETTLE_POLL = 0.02


async def run_undo(
    step: UndoStep,
    monitors: Mapping[Side, Monitor],
    host: Host,
    *,
    state: State,
    patience: float,
) -> None:
    """Carry out one undo step. The caller bounds it with a deadline; ``patience`` bounds each
    question whether a QEMU runs the guest (:func:`guest_runs`) within it.

    Every step is safe to run again, so one that meets a passing error (a refused or garbled
    command, a hung one, a dropped link: the monitor reconnects on the next command if its QEMU
    lives) is tried again, up to :data:`_ATTEMPTS` times. The fault campaign found a revert
    that gave up on cancelling the migration after one error reply, leaving the guest paused.

    :raise LivemigError: when the step could not be done (the caller records it).
    """
    for attempt in range(_ATTEMPTS):
        if attempt:
            await trio.sleep(_SETTLE_POLL)
        try:
            await _run(step, monitors, host, state, patience)
            return
        except QemuGone:
            if step.side is Side.TARGET:
                return  # the target process is gone, and everything it held with it
            raise
        except ConnectionLost:
            # The link dropped; the next command reconnects (or finds the QEMU gone). Not
            # proof that the QEMU is gone: the fault campaign found a revert that took a
            # dropped link for a dead target and left it running.
            if attempt == _ATTEMPTS - 1:
                raise
        except (QMPError, ToolError, DeadlineExceeded):
            if attempt == _ATTEMPTS - 1:
                raise


async def _run(
    step: UndoStep, monitors: Mapping[Side, Monitor], host: Host, state: State, patience: float
) -> None:
    m, args = monitors[step.side], step.args
    match step.kind:
        case UndoKind.RESTORE_CAPABILITIES:
            await migration.set_capabilities(m, dict(args["capabilities"]))
        case UndoKind.RESTORE_PARAMETERS:
            if args["parameters"]:
                await migration.set_parameters(m, dict(args["parameters"]))
        case UndoKind.DELETE_FILE:
            if "node" in args and await _has_node(m, args["node"]):
                raise MigrationError(
                    f"kept {args['path']}: node {args['node']} still uses it", state=state.value
                )
            await host.remove(Path(args["path"]))
        case UndoKind.DELETE_NODE:
            if await _has_node(m, args["node"]):
                await block.blockdev_del(m, args["node"])
        case UndoKind.MERGE_OVERLAY:
            await _merge_overlay(
                m, node=args["node"], base=args["base"], job=args["job"], state=state
            )
        case UndoKind.STOP_NBD_SERVER:
            await _tolerate_absent(nbd.nbd_server_stop(m))
        case UndoKind.DELETE_EXPORT:
            exports = {e.id for e in await nbd.query_block_exports(m)}
            if args["export"] in exports:
                await nbd.block_export_del(m, args["export"])
        case UndoKind.CANCEL_JOB:
            await _cancel_job(m, args["job"], state=state)
        case UndoKind.CANCEL_MIGRATION:
            await _cancel_migration(m)
            await _resume(m)
        case UndoKind.RESUME_GUEST:
            await _resume(m)
        case UndoKind.DELETE_OBJECT:
            if args["id"] in await objects.object_ids(m):
                await objects.object_del(m, args["id"])
        case UndoKind.QUIT if step.side is Side.TARGET:
            await _quit_target(m, monitors[Side.SOURCE], state, patience)
        case UndoKind.QUIT:
            await runstate.quit(m)


async def _quit_target(target: Monitor, source: Monitor, state: State, patience: float) -> None:
    """Quit the target. Once its incoming migration completed it holds a whole copy of the
    guest, so first make sure the source runs the guest; if the source is gone for good, the
    target runs it instead. (The fault campaign found a revert, after the source died, that
    quit the only complete copy.)"""
    if (await migration.query_migrate(target)).status is MigrationStatus.COMPLETED:
        match await guest_runs(source, patience=patience):
            case Liveness.STOPPED:
                await _resume(source)
            case Liveness.GONE:
                await runstate.cont(target)
                raise MigrationError(
                    "the source is gone: the target, which held the whole guest, runs it now",
                    state=state.value,
                )
            case Liveness.UNKNOWN:
                raise MigrationError(
                    "kept the target, which holds the whole guest: the source is not seen to "
                    "run it",
                    state=state.value,
                )
    await runstate.quit(target)


class Liveness(enum.Enum):
    """What a QEMU does with the guest, as far as its monitor tells."""

    RUNS = "runs"
    STOPPED = "stopped"
    #: Its monitor refuses a new connection: the process is gone.
    GONE = "gone"
    #: No answer in time.
    UNKNOWN = "unknown"


async def guest_runs(m: Monitor, *, patience: float) -> Liveness:
    """Ask ``m`` whether it runs the guest, again after each failed question, for ``patience``
    seconds (callers pass ``Deadlines.liveness``). One failed question decides nothing, and a
    dropped link is no proof the QEMU is gone either: only a monitor that refuses to reconnect
    is."""
    with trio.move_on_after(patience):
        while True:
            try:
                status = await runstate.query_status(m)
                return Liveness.RUNS if status.running else Liveness.STOPPED
            except ConnectionLost as err:
                if isinstance(err.__cause__, ConnectFailed):
                    return Liveness.GONE
            except LivemigError:
                pass
            await trio.sleep(_SETTLE_POLL)
    return Liveness.UNKNOWN


async def _has_node(m: Monitor, node: str) -> bool:
    return any(n.node_name == node for n in await block.query_named_block_nodes(m))


async def _merge_overlay(m: Monitor, *, node: str, base: str, job: str, state: State) -> None:
    """Active-commit the overlay into the base, so every write the guest made is kept.

    Into ``base`` itself, named: QEMU's default base is the bottom of the chain, and a disk on
    a backing chain (a qcow2 on a base image) would be committed all the way down, its own image
    left behind with the guest then running on the base image (found by the realistic VM's
    revert test: every write since the snapshot missing from the disk's image)."""
    nodes = {n.node_name: n for n in await block.query_named_block_nodes(m)}
    overlay = nodes.get(node)
    below = nodes.get(base)
    if overlay is None or below is None or overlay.backing_file != below.filename:
        return  # the snapshot never took effect: the base is still the active layer
    async with m.listen(*JOB_EVENTS) as stream:
        present = {j.id: j for j in await jobs.query_jobs(m)}
        if job not in present:
            await block.block_commit(m, job_id=job, device=node, base_node=base)
        await wait_job(stream, m, job, until="ready", state=state)
        await jobs.job_complete(m, job)
        await wait_job(stream, m, job, until="gone", state=state)


async def _cancel_job(m: Monitor, job: str, *, state: State) -> None:
    async with m.listen(*JOB_EVENTS) as stream:
        present = {j.id: j for j in await jobs.query_jobs(m)}
        if job not in present:
            return
        status = present[job].status
        if status is JobStatus.CONCLUDED:
            await jobs.job_dismiss(m, job)
        elif not status.ending:
            await _force_cancel(m, job)
        # A job already aborting ends by itself; QEMU refuses to cancel it (the fault campaign
        # found this: a mirror whose NBD target exited with the cancelled migration).
        await wait_job(stream, m, job, until="gone", state=state, errors_fatal=False)


async def _force_cancel(m: Monitor, job: str) -> None:
    try:
        await jobs.block_job_cancel(m, job, force=True)
    except CommandFailed:
        # It may have started to end by itself since we looked: then waiting is enough.
        now = {j.id: j.status for j in await jobs.query_jobs(m)}.get(job)
        if now is JobStatus.CONCLUDED:
            await jobs.job_dismiss(m, job)
        elif now is not None and not now.ending:
            raise


async def _cancel_migration(m: Monitor) -> None:
    if (await migration.query_migrate(m)).status.sending:
        await migration.migrate_cancel(m)
    # QEMU emits no event when a cancel settles unless the events capability is on, so look.
    while (await migration.query_migrate(m)).status.sending:  # noqa: ASYNC110
        await trio.sleep(_SETTLE_POLL)


async def _resume(m: Monitor) -> None:
    """``cont`` only when the guest is not running; wait out ``finish-migrate`` first."""
    while True:
        status = await runstate.query_status(m)
        if status.running:
            return
        if status.status is not RunState.FINISH_MIGRATE:
            break
        await trio.sleep(_SETTLE_POLL)
    await runstate.cont(m)


async def _tolerate_absent(call: object) -> None:
    try:
        await call  # type: ignore[misc]
    except CommandFailed as err:
        if "not running" not in err.desc and "not found" not in err.desc:
            raise


async def unwind(
    undo: UndoStack,
    monitors: Mapping[Side, Monitor],
    host: Host,
    *,
    state: State,
    step_deadline: float,
    patience: float,
) -> list[str]:
    """Run the undo stack, newest first, each step under ``step_deadline`` (``patience``: see
    :func:`run_undo`). A step leaves the stack only once done, so a crash mid-step leaves it
    journalled. A failed step is recorded and the rest still run: each step is independent of
    the ones before it. The failed steps are left on the stack (so in the journal) for
    ``livemig recover`` to try again.

    :return: a description of each step that failed.
    """
    failures: list[str] = []
    failed: list[UndoStep] = []
    while (step := undo.top()) is not None:
        try:
            with trio.fail_after(step_deadline):
                await run_undo(step, monitors, host, state=state, patience=patience)
        except Exception as err:
            log.warning("undo step %s failed: %s", step.describe(), err)
            failures.append(f"{step.describe()}: {err}")
            failed.append(step)
        undo.pop()
    for step in reversed(failed):
        undo.push(step)
    return failures
