"""The forward actions as pure scripts: one per trigger, each a generator of effects.

This is where livemig decides *what* to send and in which order; the engine
(:mod:`livemig.fsm.engine`) only performs what a script yields (:mod:`livemig.fsm.effects`) and
sends back the reply. No I/O, no clock, no trio here: a script is driven by hand in the tests
with the replies (and faults) they choose, and every command it would send can be read.

Rules every script keeps:

- it yields :class:`PushUndo` for what it is about to create *before* the effect that creates
  it, so a fault at any point leaves every step needed to get back (a step for something never
  created does nothing); the steps of one action go in one push where they can, since each push
  is a durable journal write (an ``fsync`` of file and directory) on the critical path;
- what it learns it reports as an :class:`Observe` of a fact; the guard of the trigger checks
  it, so a script that did not get there cannot move the machine;
- it sets no deadline (the runner bounds each action, the engine each command) and opens no
  concurrency of its own beyond asking for it (:class:`Gather`, :class:`Spawn`).

What one run learns on the way (the disks, the guest's size, the final numbers) is kept in
its :class:`Context`, which the scripts read and fill.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import attrs

from livemig.drivers import block, jobs, migration, nbd, objects, runstate
from livemig.drivers.migration import MigrationStats
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
    JobGone,
    Listen,
    Mark,
    MigrationEvent,
    Observe,
    OnHost,
    OnHostAll,
    OpenWindow,
    Operation,
    PushUndo,
    Script,
    Shielded,
    Sleep,
    Spawn,
    Stream,
    WriteJournal,
    call,
)
from livemig.fsm.events import LinkEvent, Progress, Steered
from livemig.fsm.machine import State, Transfer, Trigger
from livemig.fsm.observations import (
    CapabilitiesSet,
    MigrationStatusChanged,
    MirrorReady,
    OverlayActive,
    PostcopyCommitted,
    PostcopyStarted,
    PrechecksPassed,
    SourceReleased,
    StateSaved,
    TargetResumed,
)
from livemig.fsm.plan import Plan
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
from livemig.fsm.prechecks import Disk, QemuView, Verdict, precheck
from livemig.fsm.settings import choose_settings
from livemig.fsm.undo import Side, UndoKind, UndoStep
from livemig.transports.endpoints import Endpoint, UnixEndpoint
from livemig.transports.errors import (
    CommandFailed,
    ConvergenceFailed,
    LivemigError,
    MigrationAborted,
    StepFailed,
)

if TYPE_CHECKING:
    from livemig.drivers.image import ImageFormat

__all__ = ["DURING", "SCRIPTS", "Context"]

SOURCE, TARGET = Side.SOURCE, Side.TARGET


@attrs.define
class Context:
    """What the scripts of one run read (the plan, the state the action runs in) and what they
    learn on the way. Plain data: the runner creates it, the scripts fill it, the result is
    built from it."""

    plan: Plan
    #: The state the current action runs in (the runner sets it on every state entry).
    state: State = State.IDLE
    #: The disks the run moves, as the prechecks found them (at connect).
    verdict: Verdict | None = None
    #: The guest's base RAM in bytes (at connect): the RAM phase's deadline scales by it.
    guest_ram: int | None = None
    #: The migration capabilities each side offers (at connect), by side.
    offered: dict[Side, Mapping[str, bool]] = attrs.field(factory=dict)
    #: The ``max-bandwidth`` set with the capabilities (``None``: uncapped), likewise.
    bandwidth: int | None = None
    #: The convergence policy's state while RAM streams (set with the capabilities).
    convergence: ConvergenceTracker | None = None
    warnings: list[str] = attrs.field(factory=list)
    #: Filled from the final ``query-migrate`` and the disk copy.
    downtime_ms: int | None = None
    ram_bytes: int | None = None
    disk_bytes: int | None = None
    #: What the base copy and the mirror sent, per copied disk (by :attr:`Disk.name`).
    disk_sent: dict[str, int] = attrs.field(factory=dict)
    #: The migration parameters the source offers (at set-capabilities): the convergence
    #: ladder sets only these.
    source_parameters: frozenset[str] = frozenset()
    #: Stateful stop: when the source's ``stop`` was answered (trio clock).
    paused_at: float | None = None

    def fail(self, message: str) -> StepFailed:
        return StepFailed(message, state=self.state.value)

    def run_files(self) -> list[Path]:
        """Files this run may create on this host: the overlays and the unix sockets of the
        target (those the source connects to; where a remote target listens, when it is on
        another host, is that host's: its launch removes them)."""
        plan = self.plan
        ends = [plan.migrate_uri, plan.nbd]
        if plan.remote is None:
            ends += [plan.incoming_uri, plan.nbd_server]
        sockets = list(dict.fromkeys(e.path for e in ends if isinstance(e, UnixEndpoint)))
        overlays = [d.created().overlay_path for d in self.copied()]
        state = [plan.state_file] if self.stateful else []
        return [*overlays, *state, *sockets]

    @property
    def stateful(self) -> bool:
        """Whether this run is a stateful stop (known from connect on)."""
        return self.verdict is not None and self.verdict.transfer is Transfer.STATEFUL_STOP

    def listen_socket_undo(self, where: Endpoint) -> tuple[UndoStep, ...]:
        """The undo step that removes a unix socket the target listens on, when it is on this
        host (a remote target's go with its launch)."""
        if not isinstance(where, UnixEndpoint) or self.plan.remote is not None:
            return ()
        return (UndoStep(UndoKind.DELETE_FILE, TARGET, {"path": str(where.path)}),)

    def disks(self) -> tuple[Disk, ...]:
        """Every disk the run moves (copied and shared)."""
        if self.verdict is None:
            raise self.fail("no disks: connect did not run")
        return self.verdict.disks

    def copied(self) -> tuple[Disk, ...]:
        """The disks the run copies (none when connect did not run)."""
        return self.verdict.copied if self.verdict is not None else ()


def connect(ctx: Context) -> Script:
    """Ask both QEMUs what they are, at once, and let
    :func:`~livemig.fsm.prechecks.precheck` decide. Touches nothing."""
    replies = yield Gather(_view_calls(SOURCE) + _view_calls(TARGET))
    source, target = _view(replies[: len(_VIEW)]), _view(replies[len(_VIEW) :])
    ctx.verdict = precheck(ctx.plan, source, target)
    ctx.guest_ram = source.ram_bytes
    ctx.offered = {SOURCE: source.capabilities, TARGET: target.capabilities}
    verdict = ctx.verdict
    if verdict.fallback is not None:
        ctx.warnings.append(f"live transfer is impossible, so a stateful stop: {verdict.fallback}")
    ctx.warnings += verdict.notes
    yield Observe(PrechecksPassed(verdict.storage, verdict.transfer, verdict.fallback))
    # From here a revert's last resorts: the target is quit (it never ran the guest), then the
    # source guest is made to run. Pushed first, so they run last. Before this point nothing
    # was touched, and a failed precheck leaves both QEMUs exactly as they were.
    # A target livemig launched goes with its files, once quit (the directory last).
    files = tuple(
        UndoStep(UndoKind.DELETE_FILE, TARGET, {"path": str(p)}) for p in ctx.plan.target_files
    )
    yield PushUndo(
        (UndoStep(UndoKind.RESUME_GUEST, SOURCE), *files, UndoStep(UndoKind.QUIT, TARGET))
    )


#: Everything the prechecks read of one QEMU (read-only queries), by :class:`QemuView` field.
_VIEW: tuple[tuple[str, Operation], ...] = (
    ("status", runstate.query_status),
    ("ram_bytes", runstate.query_memory_size_summary),
    ("version", runstate.query_version),
    ("machine", runstate.query_machine),
    ("migration", migration.query_migrate),
    ("jobs", jobs.query_jobs),
    ("nodes", block.query_named_block_nodes),
    ("disks", block.query_block),
    ("capabilities", migration.query_capabilities),
    ("devices", runstate.query_devices),
    ("parameters", migration.query_parameters),
)


def _view_calls(side: Side) -> tuple[Call, ...]:
    return tuple(call(side, op) for _, op in _VIEW)


def _view(replies: Sequence[Any]) -> QemuView:
    return QemuView(**{name: reply for (name, _), reply in zip(_VIEW, replies, strict=True)})


def set_capabilities(ctx: Context) -> Script:
    """Set what :func:`~livemig.fsm.settings.choose_settings` picks of what each side offers
    (the capabilities as seen at connect; the parameters probed here, both sides at once). The
    source's old values are pushed for undo first; the target is quit on revert, so its
    settings need none. The two sides are set at once, each in its own order."""
    policy = ctx.plan.policy
    src_params, dst_params = yield Gather(
        (call(SOURCE, migration.query_parameters), call(TARGET, migration.query_parameters))
    )
    chosen = choose_settings(
        policy,
        source_capabilities=ctx.offered[SOURCE],
        target_capabilities=ctx.offered[TARGET],
        source_parameters=src_params,
        target_parameters=dst_params,
        transfer=Transfer.STATEFUL_STOP if ctx.stateful else Transfer.LIVE,
        cpr_reboot=ctx.verdict is not None and ctx.verdict.cpr_reboot,
    )
    ctx.source_parameters = frozenset(src_params)
    ctx.warnings += [f"{what} is not offered; migrating without it" for what in chosen.not_offered]
    source_parameters = dict(chosen.source_parameters)
    target_parameters = dict(chosen.target_parameters)
    restore_parameters = dict(chosen.restore_parameters)
    tls = ctx.plan.tls
    if tls is not None:
        # Each QEMU gets its credentials as an object of this run's; the RAM stream uses them
        # by id (the source checks the target's certificate names ``tls.hostname``).
        tls_id = ctx.plan.tls_object
        source_parameters |= {"tls-creds": tls_id, "tls-hostname": tls.hostname}
        target_parameters |= {"tls-creds": tls_id}
        for name in ("tls-creds", "tls-hostname"):
            restore_parameters[name] = src_params.get(name) or ""
        yield PushUndo((UndoStep(UndoKind.DELETE_OBJECT, SOURCE, {"id": tls_id}),))
        yield Gather(
            (
                call(TARGET, objects.add_tls_creds, tls, tls_id, endpoint="server"),
                call(SOURCE, objects.add_tls_creds, tls, tls_id, endpoint="client"),
            )
        )
    yield PushUndo(
        (
            UndoStep(
                UndoKind.RESTORE_CAPABILITIES,
                SOURCE,
                {"capabilities": dict(chosen.restore_capabilities)},
            ),
            UndoStep(
                UndoKind.RESTORE_PARAMETERS,
                SOURCE,
                {"parameters": plain(restore_parameters)},
            ),
        )
    )
    target_calls = [call(TARGET, migration.set_capabilities, chosen.target_capabilities)]
    if target_parameters:
        target_calls.append(call(TARGET, migration.set_parameters, target_parameters))
    yield Gather(
        (
            *target_calls,
            call(SOURCE, migration.set_capabilities, chosen.source_capabilities),
            call(SOURCE, migration.set_parameters, source_parameters),
        )
    )
    convergence = policy.convergence()
    ctx.bandwidth = convergence.bandwidth_cap
    ctx.convergence = ConvergenceTracker(
        policy=convergence,
        capabilities=Capabilities(
            auto_converge=chosen.source_capabilities.get("auto-converge", False),
            postcopy_allowed=policy.postcopy,
            postcopy_on_source=chosen.source_capabilities.get("postcopy-ram", False),
            postcopy_on_target=chosen.target_capabilities.get("postcopy-ram", False),
        ),
    )
    yield Observe(CapabilitiesSet())


def snapshot(ctx: Context) -> Script:
    """Put a qcow2 overlay on every copied disk, all in one ``transaction``: from here each
    base is frozen, and the bases are one crash-consistent point in time across the disks."""
    plan, disks = ctx.plan, ctx.copied()
    yield OnHost("make_dir", (plan.work_dir,))
    # Every disk's three at once, one journal write: each is safe to run when its thing does
    # not exist yet, and the stack unwinds them in the order they must run. A file goes only
    # once its overlay node is gone: while the guest still writes to it (its merge failed),
    # removing the file would lose every write since the snapshot.
    steps: list[UndoStep] = []
    for disk in disks:
        names = disk.created()
        steps += [
            UndoStep(
                UndoKind.DELETE_FILE,
                SOURCE,
                {"path": str(names.overlay_path), "node": names.overlay_node},
            ),
            UndoStep(UndoKind.DELETE_NODE, SOURCE, {"node": names.overlay_node}),
            UndoStep(
                UndoKind.MERGE_OVERLAY,
                SOURCE,
                {"node": names.overlay_node, "base": disk.source_node, "job": names.commit_job},
            ),
        ]
    yield PushUndo(tuple(steps))
    for disk in disks:
        names = disk.created()
        yield OnHost("create_image", (names.overlay_path, "qcow2", disk.base_size))
        yield call(
            SOURCE,
            block.blockdev_add,
            {
                "driver": "qcow2",
                "node-name": names.overlay_node,
                "file": {"driver": "file", "filename": str(names.overlay_path)},
                "backing": None,
            },
        )
    if len(disks) == 1:
        (disk,) = disks
        yield call(
            SOURCE,
            block.blockdev_snapshot,
            node=disk.source_node,
            overlay=disk.created().overlay_node,
        )
    else:
        yield call(
            SOURCE,
            block.snapshot_all,
            [(d.source_node, d.created().overlay_node) for d in disks],
        )
    yield Observe(OverlayActive(tuple(d.created().overlay_node for d in disks)))


def mirror(ctx: Context) -> Script:
    """Copy each frozen base to the target, then mirror each overlay there until every mirror
    is READY. One NBD server on the target serves every disk, each its own export."""
    plan, disks = ctx.plan, ctx.copied()
    tls_id = plan.tls_object if plan.tls is not None else None
    # Every undo step of the copy at once, one journal write (each is safe to run when its
    # thing does not exist yet; the stack unwinds them in the order they must run).
    steps = [*ctx.listen_socket_undo(plan.nbd_server), UndoStep(UndoKind.STOP_NBD_SERVER, TARGET)]
    for disk in disks:
        names = disk.created()
        steps += [
            UndoStep(UndoKind.DELETE_EXPORT, TARGET, {"export": names.export_id}),
            UndoStep(UndoKind.DELETE_NODE, SOURCE, {"node": names.nbd_node}),
            UndoStep(UndoKind.CANCEL_JOB, SOURCE, {"job": names.mirror_job}),
        ]
    yield PushUndo(tuple(steps))
    # One client per disk at a time (each base copy, then each mirror); nobody else gets in.
    yield call(
        TARGET,
        nbd.nbd_server_start,
        plan.nbd_server,
        max_connections=len(disks),
        tls_creds=tls_id,
    )
    for disk in disks:
        names = disk.created()
        yield call(
            TARGET,
            nbd.block_export_add,
            export_id=names.export_id,
            node_name=disk.target_node,
            name=names.export_name,
            writable=True,
        )
    ctx.disk_bytes = 0
    # The bases at once: each copy waits on its own reads and its own NBD writes.
    copies = [_copy_base(ctx, disk) for disk in disks]
    yield copies[0] if len(copies) == 1 else OnHostAll(tuple(copies))
    for disk in disks:
        ctx.disk_bytes += disk.base_allocated or 0
        ctx.disk_sent[disk.name] = disk.base_allocated or 0
    yield Listen(SOURCE, Stream.JOBS)
    for disk in disks:
        names = disk.created()
        client: dict[str, Any] = {
            "driver": "nbd",
            "node-name": names.nbd_node,
            "server": plan.nbd.flat_address(),
            "export": names.export_name,
        }
        if plan.tls is not None:
            client |= {"tls-creds": tls_id, "tls-hostname": plan.tls.hostname}
        yield call(SOURCE, block.blockdev_add, client)
        yield call(
            SOURCE,
            block.blockdev_mirror,
            job_id=names.mirror_job,
            device=names.overlay_node,
            target=names.nbd_node,
            sync="top",
        )
    yield Spawn(lambda: report_mirror(ctx))
    jobs_ = tuple(d.created().mirror_job for d in disks)
    yield AwaitJob(SOURCE, jobs_, until="ready")
    yield Observe(MirrorReady(jobs_))


def report_mirror(ctx: Context) -> Script:
    """Disk progress while the mirrors catch up (the READY events themselves end the wait): one
    event per disk, and the sum over the disks."""
    by_job = {d.created().mirror_job: d.name for d in ctx.copied()}
    while True:
        done = total = 0
        for job in (yield call(SOURCE, jobs.query_block_jobs)):
            if (name := by_job.get(job.device)) is not None:
                done, total = done + job.offset, total + job.len
                yield Emit(
                    Progress(
                        state=ctx.state.value,
                        at_ms=0.0,
                        disk_done=job.offset,
                        disk_total=job.len,
                        disk=name,
                    )
                )
        if len(by_job) > 1:
            yield Emit(Progress(state=ctx.state.value, at_ms=0.0, disk_done=done, disk_total=total))
        yield Sleep(PROGRESS_INTERVAL_S)


def _copy_base(ctx: Context, disk: Disk) -> OnHost:
    """The copy of ``disk``'s frozen base into its export on the target; zeros are not sent.

    A base with a backing chain (a qcow2 on a base image, of any depth) is flattened: the copy
    reads the guest-visible data through the chain, so the target holds it all in its one
    image. (Recreating the chain would need the same base images on the target; flat needs
    nothing there and costs only the chain's allocated data once, zeros skipped.)

    When the target's image is still fully unallocated it reads as zeros, so zero areas are
    skipped altogether and it stays sparse; otherwise they are written as zeroes (no payload),
    so no old data survives where the source is zero.
    """
    filename, fmt = disk.base_image
    base_format = cast("ImageFormat", fmt)  # one of COPIED_FORMATS: the prechecks saw to it
    # What each QEMU said of its image at connect: no qemu-img process for it.
    return OnHost(
        "copy_to_nbd",
        (Path(filename), base_format, ctx.plan.nbd, disk.created().export_name),
        # Fully unallocated (raw), or an image livemig itself just made empty (--to local: a
        # qcow2 always has metadata allocated).
        {
            "target_is_zero": disk.target_allocated == 0
            or ctx.plan.fresh_image(Path(disk.target_image)),
            **({"tls": ctx.plan.tls} if ctx.plan.tls is not None else {}),
        },
    )


def transfer_state(ctx: Context) -> Script:
    """Start the RAM stream: the target listens, the source sends."""
    plan = ctx.plan
    yield Listen(TARGET, Stream.MIGRATION)
    yield Listen(SOURCE, Stream.MIGRATION)
    steps = [
        *ctx.listen_socket_undo(plan.incoming_uri),
        UndoStep(UndoKind.CANCEL_MIGRATION, SOURCE),
    ]
    # Both at once, one journal write: a cancel with no migration running is a no-op.
    yield PushUndo(tuple(steps))
    yield call(TARGET, migration.migrate_incoming, plan.incoming_uri.uri)
    yield call(SOURCE, migration.migrate, plan.migrate_uri.uri)
    yield Observe(MigrationStatusChanged(MigrationStatus.SETUP))


def await_switchover(ctx: Context) -> Script:
    """Wait for ``pre-switchover`` (the source guest is paused); :func:`steer` runs meanwhile
    (:data:`DURING`).

    The pause arrives as a QMP event, so it is noticed at once: it is guest downtime. Progress is
    polled only to report it and to feed the convergence policy.
    """
    del ctx
    paused: MigrationEvent = yield AwaitMigration(
        SOURCE, frozenset({MigrationStatus.PRE_SWITCHOVER})
    )
    yield OpenWindow(paused.emitted_at)
    yield Observe(MigrationStatusChanged(MigrationStatus.PRE_SWITCHOVER))


def steer(ctx: Context) -> Script:
    """Poll progress, report it, and act on what the convergence policy decides: run beside the
    action of ``state-transfer`` (:data:`DURING`); a policy that aborts raises
    :class:`ConvergenceFailed` here, which ends that action."""
    interval = min(ctx.plan.policy.progress_interval, PROGRESS_INTERVAL_S)
    while True:
        stats: MigrationStats = yield call(SOURCE, migration.query_migrate)
        yield Emit(_progress(ctx, stats))
        sample = ProgressSample.from_stats((yield Clock()), stats)
        if sample is not None and ctx.convergence is not None:
            ctx.convergence, decision = ctx.convergence.observe(sample)
            if decision is not None:
                yield from _carry_out(ctx, decision)
        yield Sleep(interval)


def _carry_out(ctx: Context, decision: Decision) -> Script:
    action = decision.action
    yield Emit(Steered(ctx.state.value, 0.0, type(action).__name__, decision.reason))
    match action:
        case SetDowntime() | Throttle():
            wanted = action.parameters()
            offered = {k: v for k, v in wanted.items() if k in ctx.source_parameters}
            if offered:
                yield call(SOURCE, migration.set_parameters, offered)
            if missing := sorted(wanted.keys() - offered.keys()):
                ctx.warnings.append(f"the source QEMU lacks migration parameters {missing}")
        case StartPostcopy():
            yield call(SOURCE, migration.start_postcopy)
            yield Observe(PostcopyStarted())
        case Abort(reason=reason):
            raise ConvergenceFailed(reason, state=ctx.state.value)


def _progress(ctx: Context, stats: MigrationStats) -> Progress:
    ram = stats.ram
    return Progress(
        state=ctx.state.value,
        at_ms=0.0,
        migration_status=stats.status,
        ram_transferred=ram.transferred if ram else None,
        ram_remaining=ram.remaining if ram else None,
        ram_total=ram.total if ram else None,
        dirty_pages_rate=ram.dirty_pages_rate if ram else None,
        passes=ram.dirty_sync_count if ram else None,
        mbps=ram.mbps if ram else None,
        expected_downtime_ms=stats.expected_downtime_ms,
    )


def switch_over(ctx: Context) -> Script:
    """Switch over: a consistent disk copy, the last of RAM, then the target runs.

    Everything here is guest downtime (the source paused at ``pre-switchover``): only what must
    happen, in the order it must. The target's ``cont`` answered is the point of no return: the
    machine enters ``switched-over``.
    """
    yield from _complete_mirror(ctx, stop_nbd=False)
    go_on = call(SOURCE, migration.migrate_continue, MigrationStatus.PRE_SWITCHOVER)
    if ctx.copied():
        # At once with the continue: the export has no client left, and the target's guest
        # does not run before the cont below, so its NBD server stops off the critical path.
        yield Gather((go_on, call(TARGET, nbd.nbd_server_stop)))
        yield from _nbd_server_stopped()
    else:
        yield go_on
    # The target completes once it has loaded the whole guest: the source has sent it all.
    yield AwaitMigration(TARGET, _COMPLETED)
    yield Mark("target completed event received")
    yield Observe(MigrationStatusChanged(MigrationStatus.COMPLETED))
    yield from _resume_target()
    yield CloseWindow()


_COMPLETED = frozenset({MigrationStatus.COMPLETED})


def finalize(ctx: Context) -> Script:
    """Past the point of no return: read the statistics and stop the source; problems are
    warnings now (the guest runs on the target). From ``post-copy``, first wait for the last
    pages to reach the target.
    """
    if ctx.state is State.POSTCOPY:
        yield from _finish_postcopy(ctx)
    yield from _read_statistics(ctx, source_completed=ctx.state is State.POSTCOPY or ctx.stateful)
    if (yield AskRuns(TARGET)) is False:
        # The target died (or stopped) after it took over: the source, paused with the guest
        # as it was at the switchover, is the only copy left. Keep it for the operator.
        raise ctx.fail(
            "the target no longer runs the guest after the switchover; the source QEMU is kept "
            "as it is (paused, holding the guest as of the switchover)"
        )
    yield from _clean_up_source(ctx)


#: Seconds between tries to resume a paused post-copy, and between looks at a target that
#: finishes one.
POSTCOPY_RETRY_S = 1.0
_POSTCOPY_END = frozenset({MigrationStatus.COMPLETED, MigrationStatus.POSTCOPY_PAUSED})


def _finish_postcopy(ctx: Context) -> Script:
    """Until both sides say completed: the source serves the pages the target still lacks.

    A link that breaks pauses post-copy (``postcopy-paused``: QEMU saw the channel fail, or
    livemig paused it when the target's host stayed unreachable); then neither side alone holds
    the whole guest, so it must be resumed, not reverted: :func:`_resume_postcopy`.
    """
    resumed = False
    while True:
        event: MigrationEvent = yield AwaitMigration(SOURCE, _POSTCOPY_END)
        if event.status is MigrationStatus.COMPLETED:
            break
        yield from _resume_postcopy(ctx)
        resumed = True
    if resumed:
        # The target's monitor may have reconnected since: its old event stream is gone.
        yield from _until_target_completed(ctx)
    else:
        yield AwaitMigration(TARGET, _COMPLETED)
    yield Observe(MigrationStatusChanged(MigrationStatus.COMPLETED))


def _resume_postcopy(ctx: Context) -> Script:
    """Resume a paused post-copy, trying every :data:`POSTCOPY_RETRY_S` until the plan's
    ``postcopy_recover`` deadline: the target listens again (``migrate-recover``), the source
    reconnects (``migrate … resume``). Past the deadline, fail with where the guest is."""
    plan = ctx.plan
    seconds = plan.deadlines.postcopy_recover
    yield Emit(LinkEvent(ctx.state.value, 0.0, "paused", f"resuming for up to {seconds:g} s"))
    give_up_at = (yield Clock()) + seconds
    last, problem = "the target's host could not be reached", ""
    while (yield Clock()) < give_up_at:
        # The target is told without being asked: a query waits on its main loop, which may
        # wait on a page post-copy has not brought yet. These two run out of band.
        try:
            with suppress(CommandFailed):  # it had seen the link break: it is paused
                yield call(TARGET, migration.migrate_pause)  # else, make it
            yield call(TARGET, migration.migrate_recover, plan.incoming_uri.uri)
            yield call(SOURCE, migration.migrate_resume, plan.migrate_uri.uri)
        except LivemigError as err:
            problem = f"; last refusal: {err}"
        try:
            source: MigrationStats = yield call(SOURCE, migration.query_migrate)
        except LivemigError as err:
            problem = f"; last refusal: {err}"
        else:
            if source.status is not MigrationStatus.POSTCOPY_PAUSED:
                yield Emit(LinkEvent(ctx.state.value, 0.0, "resumed", source.status.value))
                return
            last = f"the source is {source.status.value}"
        yield Sleep(POSTCOPY_RETRY_S)
    last += problem
    left = yield from _ram_left(ctx)
    raise ctx.fail(
        f"post-copy paused and not resumed in {seconds:g} s ({last}). Neither QEMU alone holds "
        f"the whole guest: the target holds its devices and the pages it received and runs it "
        f"(its vCPUs wait for the rest); the source, paused, holds {left}. Both are kept: do "
        f"not stop either. When the link is back, resume: on the target `migrate-recover "
        f"{plan.incoming_uri.uri}`, then on the source `migrate {plan.migrate_uri.uri}` with "
        f"resume=true."
    )


def _ram_left(ctx: Context) -> Generator[Effect, Any, str]:
    try:
        stats: MigrationStats = yield call(SOURCE, migration.query_migrate)
    except LivemigError:
        return "the pages not yet sent"
    remaining = stats.ram.remaining if stats.ram is not None else None
    if remaining is None:
        return "the pages not yet sent"
    return f"the {remaining / 2**20:.1f} MiB not yet sent"


def _until_target_completed(ctx: Context) -> Script:
    """Look at the target until it says completed (bounded by the action's deadline)."""
    while True:
        stats: MigrationStats = yield call(TARGET, migration.query_migrate)
        if stats.status is MigrationStatus.COMPLETED:
            return
        if stats.status.dead_end:
            raise MigrationAborted(f"target migration {stats.status}", state=ctx.state.value)
        yield Sleep(POSTCOPY_RETRY_S / 10)


def switch_over_postcopy(ctx: Context) -> Script:
    """Switch over into post-copy: the target runs and pulls the pages it lacks.

    The ``migrate-continue`` into post-copy is the point of no return: from it on, neither side
    alone holds the whole guest until post-copy completes, so a fault can no longer revert.
    """
    yield from _complete_mirror(ctx)
    yield Observe(PostcopyCommitted())
    yield WriteJournal()
    yield call(SOURCE, migration.migrate_continue, MigrationStatus.PRE_SWITCHOVER)
    yield AwaitMigration(TARGET, frozenset({MigrationStatus.POSTCOPY_ACTIVE}))
    yield Mark("target postcopy-active event received")
    yield Observe(MigrationStatusChanged(MigrationStatus.POSTCOPY_ACTIVE))
    yield call(TARGET, runstate.cont)
    yield CloseWindow()
    yield Observe(TargetResumed())
    yield DropUndo(UndoKind.QUIT, TARGET)


def _read_statistics(ctx: Context, *, source_completed: bool) -> Script:
    """The source's final numbers, once it says completed.

    Only after the switchover, off the guest's downtime, and only as nice-to-have: a source that
    fails (or dies) now must not make us revert, which would quit the one complete copy (the
    fault campaign found this).
    """
    try:
        if not source_completed:
            yield AwaitMigration(SOURCE, _COMPLETED)
        stats: MigrationStats = yield call(SOURCE, migration.query_migrate)
    except LivemigError as err:
        ctx.warnings.append(f"could not read the migration's statistics: {err}")
        return
    if ctx.downtime_ms is None:  # a stateful stop measured its own, from pause to resume
        ctx.downtime_ms = stats.downtime_ms
    ctx.ram_bytes = stats.ram.transferred if stats.ram else None


def _stop_nbd_server(ctx: Context) -> Script:
    """The target must stop exporting its disk before its guest may write to it."""
    if ctx.copied():
        yield call(TARGET, nbd.nbd_server_stop)
        yield from _nbd_server_stopped()


def _nbd_server_stopped() -> Script:
    yield DropUndo(UndoKind.DELETE_EXPORT, TARGET)
    yield DropUndo(UndoKind.STOP_NBD_SERVER, TARGET)


def _complete_mirror(ctx: Context, *, stop_nbd: bool = True) -> Script:
    """Cancel every READY mirror while the guest is paused: the target holds a consistent copy
    of each disk; then (``stop_nbd``) stop the target's NBD server, which its guest's disks
    must not be exported by.

    Only here: cancelled any earlier, writes made after the cancel never reach the target.
    No disk copied (shared storage): nothing to do.
    """
    disks = ctx.copied()
    if not disks:
        return
    job_ids = tuple(d.created().mirror_job for d in disks)
    # No look at the jobs first (a round trip of downtime): how they end tells. A READY mirror
    # cancelled softly completes, and the target holds a consistent copy; one that is no
    # longer READY is cancelled (aborting), one that failed reports its error, and one that is
    # gone refuses the cancel. The stream is opened before the cancels, so no event is missed;
    # the cancels go out back to back and the mirrors end together.
    yield Listen(SOURCE, Stream.JOBS)
    cancels = tuple(call(SOURCE, jobs.block_job_cancel, j, force=False) for j in job_ids)
    yield cancels[0] if len(cancels) == 1 else Gather(cancels)
    ended: tuple[JobGone, ...] = yield AwaitJob(SOURCE, job_ids, until="gone", look_first=False)
    for disk, gone in zip(disks, ended, strict=True):
        if not gone.completed:
            raise ctx.fail(
                f"the mirror of disk {disk.name!r} was no longer in sync with the target "
                "(it was cancelled)"
            )
        ctx.disk_bytes = (ctx.disk_bytes or 0) + (gone.offset or 0)
        ctx.disk_sent[disk.name] = ctx.disk_sent.get(disk.name, 0) + (gone.offset or 0)
    yield Mark("mirror gone")
    yield DropUndo(UndoKind.CANCEL_JOB, SOURCE)
    if stop_nbd:
        yield from _stop_nbd_server(ctx)


def _resume_target() -> Script:
    try:
        yield call(TARGET, runstate.cont)
    except CommandFailed:
        # QEMU refused: the target does not run the guest, so reverting is safe.
        raise
    except BaseException as err:
        # No answer, a garbled one, a dropped link, a cancel: cont may or may not have run, and
        # guessing is wrong either way (split brain one way; the other, a guest paused on both
        # sides, as the fault campaign found). Ask the target.
        runs = yield AskRuns(TARGET)
        if runs is False:
            raise
        # It runs, or we cannot tell: no revert may resume the source beside it.
        yield Observe(TargetResumed())
        if runs is None or not isinstance(err, Exception):
            raise
        # It runs: cont took effect and only its answer was lost. Go on with the switchover.
    else:
        yield Observe(TargetResumed())
    yield DropUndo(UndoKind.QUIT, TARGET)


def _clean_up_source(ctx: Context) -> Script:
    """After the point of no return: only warnings from here.

    Each step is shielded: the guest already runs on the target, so a cancel (SIGINT) now must
    let this short cleanup finish, not leave the source QEMU and the files behind (the fault
    campaign found that). Each command is still bounded by the command deadline.
    """
    steps: list[tuple[str, Any]] = []
    if ctx.plan.policy.stop_source:
        steps.append(("quit the source", call(SOURCE, runstate.quit)))
    steps += [(f"remove {p}", OnHost("remove", (p,))) for p in ctx.run_files()]
    for what, effect in steps:
        try:
            yield Shielded(effect)
        except Exception as err:
            ctx.warnings.append(f"could not {what}: {err}")
    yield ClearUndo()
    yield Observe(SourceReleased())


def save_state(ctx: Context) -> Script:
    """Stateful stop: pause the guest, complete every mirror (the target then holds each copied
    disk as of the pause) and save the guest's whole state to :attr:`Plan.state_file`.

    From the ``stop`` on, every millisecond is downtime (the window opens). A fault before the
    target's ``cont`` resumes the guest on the source: the saved state is only a copy.
    """
    plan = ctx.plan
    yield Listen(SOURCE, Stream.MIGRATION)
    # Both at once, one journal write, and on top of the stack: a revert first stops a save
    # still running and resumes the guest (a ``cont`` after a completed save reactivates its
    # disks), then the rest unwinds with the guest running, as after a live migration's
    # cancel. The file goes too.
    yield PushUndo(
        (
            UndoStep(UndoKind.DELETE_FILE, SOURCE, {"path": str(plan.state_file)}),
            UndoStep(UndoKind.CANCEL_MIGRATION, SOURCE),
        )
    )
    yield call(SOURCE, runstate.stop)
    ctx.paused_at = yield Clock()
    yield OpenWindow(None, "source stop answered")
    yield from _complete_mirror(ctx, stop_nbd=False)
    # The source's NBD clients go before the save: it ends by flushing and letting go of every
    # block node, and one whose server is gone fails it ("Input/output error": measured).
    # Then the target stops exporting its disks.
    for disk in ctx.copied():
        yield call(SOURCE, block.blockdev_del, disk.created().nbd_node)
    yield from _stop_nbd_server(ctx)
    yield call(SOURCE, migration.migrate, f"file:{plan.state_file}")
    yield AwaitMigration(SOURCE, _COMPLETED)
    yield Mark("source saved the state")
    yield Observe(StateSaved())


def restore_state(ctx: Context) -> Script:
    """Stateful stop: the target loads the saved state and runs the guest. Its ``cont``
    answered is the point of no return, as on the live route."""
    plan = ctx.plan
    yield Listen(TARGET, Stream.MIGRATION)
    yield call(TARGET, migration.migrate_incoming, f"file:{plan.state_file}")
    yield AwaitMigration(TARGET, _COMPLETED)
    yield Mark("target loaded the state")
    yield Observe(MigrationStatusChanged(MigrationStatus.COMPLETED))
    yield from _resume_target()
    resumed_at = yield Clock()
    if ctx.paused_at is not None:
        ctx.downtime_ms = round((resumed_at - ctx.paused_at) * 1000)
    yield CloseWindow()


def plain(value: Any) -> Any:
    """JSON-friendly copy of a QMP value (for undo step arguments)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


ScriptOf = Callable[[Context], Script]

#: What the engine runs beside the action of a state, from entering it until the action is done.
DURING: Mapping[State, ScriptOf] = {State.STATE_TRANSFER: steer}

#: The script of each forward trigger.
SCRIPTS: Mapping[Trigger, ScriptOf] = {
    Trigger.CONNECT: connect,
    Trigger.SET_CAPABILITIES: set_capabilities,
    Trigger.SNAPSHOT: snapshot,
    Trigger.MIRROR: mirror,
    Trigger.TRANSFER_STATE: transfer_state,
    Trigger.AWAIT_SWITCHOVER: await_switchover,
    Trigger.SWITCH_OVER: switch_over,
    Trigger.FINALIZE: finalize,
    Trigger.SWITCH_OVER_POSTCOPY: switch_over_postcopy,
    Trigger.SAVE_STATE: save_state,
    Trigger.RESTORE_STATE: restore_state,
}
