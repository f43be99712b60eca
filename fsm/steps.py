"""The forward actions, one per trigger; each reports what it observed
(:mod:`livemig.fsm.observations`).

Every action pushes the undo of what it creates just before creating it, so a fault at any
point leaves every step needed to get back (a step for something never created does nothing).
Actions never read the clock for policy and never set deadlines: the runner wraps each one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path

import trio

from livemig.drivers import block, jobs, migration, nbd, runstate
from livemig.drivers.image import ImageFormat
from livemig.drivers.qmp import Monitor
from livemig.drivers.status import MigrationStatus
from livemig.fsm.events import Progress, Steered
from livemig.fsm.machine import State, StorageMode, Trigger
from livemig.fsm.observations import (
    CapabilitiesSet,
    MigrationStatusChanged,
    MirrorReady,
    OverlayActive,
    PostcopyCommitted,
    PostcopyStarted,
    PrechecksPassed,
    SourceReleased,
    TargetResumed,
)
from livemig.fsm.policy import (
    PROGRESS_INTERVAL_S,
    Abort,
    Capabilities,
    ConvergenceTracker,
    Decision,
    ProgressSample,
    SetDowntime,
    StartPostcopy,
    Throttle,
)
from livemig.fsm.prechecks import QemuView, precheck
from livemig.fsm.reverter import Liveness, guest_runs
from livemig.fsm.session import (
    JOB_EVENTS,
    Session,
    plain,
    wait_job,
    wait_migration,
    wait_migration_event,
)
from livemig.fsm.settings import choose_settings
from livemig.fsm.undo import Side, UndoKind, UndoStep
from livemig.transports.endpoints import UnixEndpoint
from livemig.transports.errors import (
    CommandFailed,
    ConvergenceFailed,
    LivemigError,
)

__all__ = ["ACTIONS", "DURING"]


async def connect(session: Session) -> None:
    """Ask both QEMUs what they are, and let :func:`~livemig.fsm.prechecks.precheck` decide.
    Touches nothing."""
    source = await _view(session.source)
    target = await _view(session.target)
    root = precheck(session.plan, source, target)
    session.guest_ram = source.ram_bytes
    session.disk_nodes = {Side.SOURCE: root.source_node, Side.TARGET: root.target_node}
    session.base_image = root.base_image
    session.base_size = root.base_size
    session.target_image = root.target_image
    session.root = root
    session.observe(PrechecksPassed())
    # From here a revert's last resorts: the target is quit (it never ran the guest), then the
    # source guest is made to run. Pushed first, so they run last. Before this point nothing
    # was touched, and a failed precheck leaves both QEMUs exactly as they were.
    await session.push_undo(
        UndoStep(UndoKind.RESUME_GUEST, Side.SOURCE), UndoStep(UndoKind.QUIT, Side.TARGET)
    )


async def _view(monitor: Monitor) -> QemuView:
    """Everything the prechecks read of one QEMU, read-only queries only."""
    return QemuView(
        status=await runstate.query_status(monitor),
        ram_bytes=await runstate.query_memory_size_summary(monitor),
        version=await runstate.query_version(monitor),
        machine=await runstate.query_machine(monitor),
        migration=await migration.query_migrate(monitor),
        jobs=await jobs.query_jobs(monitor),
        nodes=await block.query_named_block_nodes(monitor),
        disks=await block.query_block(monitor),
        capabilities=await migration.query_capabilities(monitor),
    )


async def set_capabilities(session: Session) -> None:
    """Probe both sides, set what :func:`~livemig.fsm.settings.choose_settings` picks of what
    each offers. The source's old values are pushed for undo first; the target is quit on
    revert, so its settings need none."""
    policy = session.plan.policy
    src, dst = session.source, session.target
    chosen = choose_settings(
        policy,
        source_capabilities=await migration.query_capabilities(src),
        target_capabilities=await migration.query_capabilities(dst),
        source_parameters=await migration.query_parameters(src),
        target_parameters=await migration.query_parameters(dst),
    )
    session.warnings += [
        f"{what} is not offered; migrating without it" for what in chosen.not_offered
    ]
    await migration.set_capabilities(dst, chosen.target_capabilities)
    if chosen.target_parameters:
        await migration.set_parameters(dst, chosen.target_parameters)
    await session.push_undo(
        UndoStep(
            UndoKind.RESTORE_CAPABILITIES,
            Side.SOURCE,
            {"capabilities": dict(chosen.restore_capabilities)},
        )
    )
    await migration.set_capabilities(src, chosen.source_capabilities)
    await session.push_undo(
        UndoStep(
            UndoKind.RESTORE_PARAMETERS,
            Side.SOURCE,
            {"parameters": plain(dict(chosen.restore_parameters))},
        )
    )
    await migration.set_parameters(src, chosen.source_parameters)
    convergence = policy.convergence()
    session.bandwidth = convergence.bandwidth_cap
    session.convergence = ConvergenceTracker(
        policy=convergence,
        capabilities=Capabilities(
            auto_converge=chosen.source_capabilities.get("auto-converge", False),
            postcopy_allowed=policy.postcopy,
            postcopy_on_source=chosen.source_capabilities.get("postcopy-ram", False),
            postcopy_on_target=chosen.target_capabilities.get("postcopy-ram", False),
        ),
    )
    session.observe(CapabilitiesSet())


async def snapshot(session: Session) -> None:
    """Put a qcow2 overlay on the root disk: from here the base is frozen."""
    plan = session.plan
    assert session.base_image is not None
    assert session.base_size is not None
    base = session.disk_nodes[Side.SOURCE]
    overlay = plan.overlay_path
    await session.host.make_dir(plan.work_dir)
    # Only once the overlay node is gone: while the guest still writes to it (its merge
    # failed), removing the file would lose every write since the snapshot.
    await session.push_undo(
        UndoStep(
            UndoKind.DELETE_FILE, Side.SOURCE, {"path": str(overlay), "node": plan.overlay_node}
        )
    )
    await session.host.create_image(overlay, "qcow2", session.base_size)
    await session.push_undo(
        UndoStep(UndoKind.DELETE_NODE, Side.SOURCE, {"node": plan.overlay_node})
    )
    await block.blockdev_add(
        session.source,
        {
            "driver": "qcow2",
            "node-name": plan.overlay_node,
            "file": {"driver": "file", "filename": str(overlay)},
            "backing": None,
        },
    )
    await session.push_undo(
        UndoStep(
            UndoKind.MERGE_OVERLAY,
            Side.SOURCE,
            {"node": plan.overlay_node, "base": base, "job": plan.commit_job},
        )
    )
    await block.blockdev_snapshot(session.source, node=base, overlay=plan.overlay_node)
    session.observe(OverlayActive(plan.overlay_node))


async def mirror(session: Session) -> None:
    """Copy the frozen base to the target, then mirror the overlay there until READY."""
    plan, src, dst = session.plan, session.source, session.target
    assert session.base_image is not None
    if not isinstance(plan.nbd, UnixEndpoint):
        raise session.fail("the disk copy needs a unix NBD endpoint on this host")
    await session.push_undo(
        UndoStep(UndoKind.DELETE_FILE, Side.TARGET, {"path": str(plan.nbd.path)}),
        UndoStep(UndoKind.STOP_NBD_SERVER, Side.TARGET),
    )
    await nbd.nbd_server_start(dst, plan.nbd.path)
    await session.push_undo(
        UndoStep(UndoKind.DELETE_EXPORT, Side.TARGET, {"export": plan.export_id})
    )
    await nbd.block_export_add(
        dst,
        export_id=plan.export_id,
        node_name=session.disk_nodes[Side.TARGET],
        name=plan.export_name,
        writable=True,
    )

    await _copy_base(session, plan.nbd.path)

    await session.push_undo(UndoStep(UndoKind.DELETE_NODE, Side.SOURCE, {"node": plan.nbd_node}))
    await block.blockdev_add(
        src,
        {
            "driver": "nbd",
            "node-name": plan.nbd_node,
            "server": plan.nbd.flat_address(),
            "export": plan.export_name,
        },
    )
    async with src.listen(*JOB_EVENTS) as stream:
        await session.push_undo(
            UndoStep(UndoKind.CANCEL_JOB, Side.SOURCE, {"job": plan.mirror_job})
        )
        await block.blockdev_mirror(
            src, job_id=plan.mirror_job, device=plan.overlay_node, target=plan.nbd_node, sync="top"
        )
        session.spawn(_report_mirror)
        await wait_job(stream, src, plan.mirror_job, until="ready", state=session.state)
    session.observe(MirrorReady(plan.mirror_job))


async def _report_mirror(session: Session) -> None:
    """Disk progress while the mirror catches up (the READY event itself ends the wait)."""
    while True:
        for job in await jobs.query_block_jobs(session.source):
            if job.device == session.plan.mirror_job:
                session.emit(
                    Progress(
                        state=session.state.value,
                        at_ms=session.now_ms(),
                        disk_done=job.offset,
                        disk_total=job.len,
                    )
                )
        await trio.sleep(PROGRESS_INTERVAL_S)


async def _copy_base(session: Session, nbd_socket: Path) -> None:
    """Copy the frozen base into the target's export; zeros are not sent.

    A base with a backing chain (a qcow2 on a base image, of any depth) is flattened: the copy
    reads the guest-visible data through the chain, so the target holds it all in its one
    image. (Recreating the chain would need the same base images on the target; flat needs
    nothing there and costs only the chain's allocated data once, zeros skipped.)

    When the target's image is still fully unallocated it reads as zeros, so zero areas are
    skipped altogether and it stays sparse; otherwise they are written as zeroes (no payload),
    so no old data survives where the source is zero.
    """
    assert session.base_image is not None
    filename, fmt = session.base_image
    host = session.host
    assert session.root is not None
    # What each QEMU said of its image at connect: no qemu-img process for it.
    target_is_zero = session.root.target_allocated == 0
    base_format: ImageFormat = "qcow2" if fmt == "qcow2" else "raw"
    await host.copy_to_nbd(
        Path(filename),
        base_format,
        nbd_socket,
        session.plan.export_name,
        target_is_zero=target_is_zero,
    )
    session.disk_bytes = session.root.base_allocated


async def transfer_state(session: Session) -> None:
    """Start the RAM stream: the target listens, the source sends."""
    plan = session.plan
    session.target_migration = await session.exits.enter_async_context(
        session.target.listen("MIGRATION")
    )
    session.source_migration = await session.exits.enter_async_context(
        session.source.listen("MIGRATION")
    )
    if isinstance(plan.migrate_uri, UnixEndpoint):
        path = str(plan.migrate_uri.path)
        await session.push_undo(UndoStep(UndoKind.DELETE_FILE, Side.TARGET, {"path": path}))
    await migration.migrate_incoming(session.target, plan.migrate_uri.uri)
    await session.push_undo(UndoStep(UndoKind.CANCEL_MIGRATION, Side.SOURCE))
    await migration.migrate(session.source, plan.migrate_uri.uri)
    session.observe(MigrationStatusChanged(MigrationStatus.SETUP))


async def await_switchover(session: Session) -> None:
    """Wait for ``pre-switchover`` (the source guest is paused); the engine steers convergence
    meanwhile (:data:`DURING`).

    The pause arrives as a QMP event, so it is noticed at once: it is guest downtime. Progress is
    polled only to report it and to feed the convergence policy.
    """
    assert session.source_migration is not None
    paused = await wait_migration_event(
        session.source_migration,
        {MigrationStatus.PRE_SWITCHOVER},
        state=session.state,
        side="source",
    )
    session.open_window(paused)
    session.observe(MigrationStatusChanged(MigrationStatus.PRE_SWITCHOVER))


async def steer(session: Session) -> None:
    """Poll progress, report it, and act on what the convergence policy decides: the engine runs
    it beside the action of ``state-transfer`` (:data:`DURING`); a policy that aborts raises
    :class:`ConvergenceFailed` here, which ends that action."""
    interval = min(session.plan.policy.progress_interval, PROGRESS_INTERVAL_S)
    while True:
        stats = await migration.query_migrate(session.source)
        _report(session, stats)
        sample = ProgressSample.from_stats(trio.current_time(), stats)
        if sample is not None and session.convergence is not None:
            session.convergence, decision = session.convergence.observe(sample)
            if decision is not None:
                await _carry_out(session, decision)
        await trio.sleep(interval)


async def _carry_out(session: Session, decision: Decision) -> None:
    action = decision.action
    session.emit(
        Steered(session.state.value, session.now_ms(), type(action).__name__, decision.reason)
    )
    match action:
        case SetDowntime() | Throttle():
            await migration.set_parameters(session.source, action.parameters())
        case StartPostcopy():
            await migration.start_postcopy(session.source)
            session.observe(PostcopyStarted())
        case Abort(reason=reason):
            raise ConvergenceFailed(reason, state=session.state.value)


def _report(session: Session, stats: migration.MigrationStats) -> None:
    ram = stats.ram
    session.emit(
        Progress(
            state=session.state.value,
            at_ms=session.now_ms(),
            migration_status=stats.status,
            ram_transferred=ram.transferred if ram else None,
            ram_remaining=ram.remaining if ram else None,
            ram_total=ram.total if ram else None,
            dirty_pages_rate=ram.dirty_pages_rate if ram else None,
            passes=ram.dirty_sync_count if ram else None,
            mbps=ram.mbps if ram else None,
            expected_downtime_ms=stats.expected_downtime_ms,
        )
    )


async def switch_over(session: Session) -> None:
    """Switch over: a consistent disk copy, the last of RAM, then the target runs.

    Everything here is guest downtime (the source paused at ``pre-switchover``): only what must
    happen, in the order it must. The target's ``cont`` answered is the point of no return: the
    machine enters ``switched-over``.
    """
    assert session.target_migration is not None
    await _complete_mirror(session, stop_nbd=False)
    await migration.migrate_continue(session.source, MigrationStatus.PRE_SWITCHOVER)
    # While QEMU sends the last of RAM: the export has no client left, and the target's guest
    # does not run before the cont below, so the NBD server is stopped off the critical path.
    await _stop_nbd_server(session)
    # The target completes once it has loaded the whole guest: the source has sent it all.
    await wait_migration(
        session.target_migration, {MigrationStatus.COMPLETED}, state=session.state, side="target"
    )
    session.mark("target completed event received")
    session.observe(MigrationStatusChanged(MigrationStatus.COMPLETED))
    await _resume_target(session)
    session.close_window()


async def finalize(session: Session) -> None:
    """Past the point of no return: read the statistics and stop the source; problems are
    warnings now (the guest runs on the target). From ``post-copy``, first wait for the last
    pages to reach the target.
    """
    assert session.source_migration is not None
    assert session.target_migration is not None
    if session.state is State.POSTCOPY:
        # The source serves the pages the target still lacks until both say completed.
        await wait_migration(
            session.target_migration,
            {MigrationStatus.COMPLETED},
            state=session.state,
            side="target",
        )
        await wait_migration(
            session.source_migration,
            {MigrationStatus.COMPLETED},
            state=session.state,
            side="source",
        )
        session.observe(MigrationStatusChanged(MigrationStatus.COMPLETED))
        await _read_statistics(session, source_completed=True)
    else:
        await _read_statistics(session, source_completed=False)
    if await _target_runs(session) is False:
        # The target died (or stopped) after it took over: the source, paused with the guest
        # as it was at the switchover, is the only copy left. Keep it for the operator.
        raise session.fail(
            "the target no longer runs the guest after the switchover; the source QEMU is kept "
            "as it is (paused, holding the guest as of the switchover)"
        )
    await _clean_up_source(session)


async def switch_over_postcopy(session: Session) -> None:
    """Switch over into post-copy: the target runs and pulls the pages it lacks.

    The ``migrate-continue`` into post-copy is the point of no return: from it on, neither side
    alone holds the whole guest until post-copy completes, so a fault can no longer revert.
    """
    assert session.source_migration is not None
    assert session.target_migration is not None
    await _complete_mirror(session)
    session.observe(PostcopyCommitted())
    await session.write_journal()
    await migration.migrate_continue(session.source, MigrationStatus.PRE_SWITCHOVER)
    await wait_migration(
        session.target_migration,
        {MigrationStatus.POSTCOPY_ACTIVE},
        state=session.state,
        side="target",
    )
    session.mark("target postcopy-active event received")
    session.observe(MigrationStatusChanged(MigrationStatus.POSTCOPY_ACTIVE))
    await runstate.cont(session.target)
    session.close_window()
    session.observe(TargetResumed())
    session.undo.discard(UndoKind.QUIT, Side.TARGET)


async def _read_statistics(session: Session, *, source_completed: bool) -> None:
    """The source's final numbers, once it says completed.

    Only after the switchover, off the guest's downtime, and only as nice-to-have: a source that
    fails (or dies) now must not make us revert, which would quit the one complete copy (the
    fault campaign found this).
    """
    assert session.source_migration is not None
    try:
        if not source_completed:
            await wait_migration(
                session.source_migration,
                {MigrationStatus.COMPLETED},
                state=session.state,
                side="source",
            )
        stats = await migration.query_migrate(session.source)
    except LivemigError as err:
        session.warnings.append(f"could not read the migration's statistics: {err}")
        return
    session.downtime_ms = stats.downtime_ms
    session.ram_bytes = stats.ram.transferred if stats.ram else None


async def _stop_nbd_server(session: Session) -> None:
    """The target must stop exporting its disk before its guest may write to it."""
    if session.plan.storage is StorageMode.NON_SHARED:
        await nbd.nbd_server_stop(session.target)
        session.undo.discard(UndoKind.DELETE_EXPORT, Side.TARGET)
        session.undo.discard(UndoKind.STOP_NBD_SERVER, Side.TARGET)


async def _complete_mirror(session: Session, *, stop_nbd: bool = True) -> None:
    """Cancel the READY mirror while the guest is paused: the target holds a consistent copy;
    then (``stop_nbd``) stop the target's NBD server, which its guest's disk must not be
    exported by.

    Only here: cancelled any earlier, writes made after the cancel never reach the target.
    Shared storage has no mirror: nothing to do.
    """
    if session.plan.storage is StorageMode.SHARED:
        return
    plan, src = session.plan, session.source
    present = {j.device: j for j in await jobs.query_block_jobs(src)}
    job = present.get(plan.mirror_job)
    if job is None or not job.ready or job.error:
        status = "gone" if job is None else job.error or job.status
        raise session.fail(f"the mirror is no longer in sync with the target ({status})")
    session.disk_bytes = (session.disk_bytes or 0) + job.offset
    async with src.listen(*JOB_EVENTS) as stream:
        await jobs.block_job_cancel(src, plan.mirror_job, force=False)
        # Just seen READY, and the stream was open before the cancel: no need to look first.
        await wait_job(
            stream, src, plan.mirror_job, until="gone", state=session.state, look_first=False
        )
        session.mark("mirror gone")
    session.undo.discard(UndoKind.CANCEL_JOB, Side.SOURCE)
    if stop_nbd:
        await _stop_nbd_server(session)


async def _resume_target(session: Session) -> None:
    try:
        await runstate.cont(session.target)
    except CommandFailed:
        # QEMU refused: the target does not run the guest, so reverting is safe.
        raise
    except BaseException as err:
        # No answer, a garbled one, a dropped link, a cancel: cont may or may not have run, and
        # guessing is wrong either way (split brain one way; the other, a guest paused on both
        # sides, as the fault campaign found). Ask the target.
        runs = await _target_runs(session)
        if runs is False:
            raise
        # It runs, or we cannot tell: no revert may resume the source beside it.
        session.observe(TargetResumed())
        if runs is None or not isinstance(err, Exception):
            raise
        # It runs: cont took effect and only its answer was lost. Go on with the switchover.
    session.observe(TargetResumed())
    session.undo.discard(UndoKind.QUIT, Side.TARGET)


async def _target_runs(session: Session) -> bool | None:
    """Whether the target runs the guest; ``None`` when that cannot be told in time.

    Shielded, so it also answers while the step is being cancelled.
    """
    with trio.CancelScope(shield=True):
        liveness = await guest_runs(session.target, patience=session.plan.deadlines.liveness)
    return None if liveness is Liveness.UNKNOWN else liveness is Liveness.RUNS


async def _clean_up_source(session: Session) -> None:
    """After the point of no return: only warnings from here."""
    steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []
    if session.plan.policy.stop_source:
        steps.append(("quit the source", partial(runstate.quit, session.source)))
    steps += [(f"remove {p}", partial(session.host.remove, p)) for p in session.run_files()]
    # Shielded: the guest already runs on the target, so a cancel (SIGINT) now must let this
    # short cleanup finish, not leave the source QEMU and the files behind (the fault campaign
    # found that). Each command is still bounded by the command deadline.
    with trio.CancelScope(shield=True):
        for what, step in steps:
            try:
                await step()
            except Exception as err:
                session.warnings.append(f"could not {what}: {err}")
    session.undo.clear()
    session.observe(SourceReleased())


Action = Callable[[Session], Awaitable[None]]

#: What the engine runs beside the action of a state, from entering it until the action is done.
DURING: Mapping[State, Action] = {State.STATE_TRANSFER: steer}

ACTIONS: Mapping[Trigger, Action] = {
    Trigger.CONNECT: connect,
    Trigger.SET_CAPABILITIES: set_capabilities,
    Trigger.SNAPSHOT: snapshot,
    Trigger.MIRROR: mirror,
    Trigger.TRANSFER_STATE: transfer_state,
    Trigger.AWAIT_SWITCHOVER: await_switchover,
    Trigger.SWITCH_OVER: switch_over,
    Trigger.FINALIZE: finalize,
    Trigger.SWITCH_OVER_POSTCOPY: switch_over_postcopy,
}
