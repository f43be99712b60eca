"""The ``bare-qmp`` variant: the fewest QMP commands that do livemig's migration.

The best any orchestrator could do on this QEMU: everything is known beforehand (no probing, no
prechecks, the monitors are already connected), every wait is a QMP event (no progress
polling), and commands to the two monitors that do not depend on each other go out together.
The settings are livemig's own (:mod:`livemig.fsm.settings`): source capabilities ``events`` +
``pause-before-switchover``, target ``events`` + ``late-block-activate``, ``downtime-limit``
300 ms and ``max-bandwidth`` 1 TiB/s ("unlimited"). No convergence steering (no auto-converge,
no raised downtime limit): a guest that dirties RAM faster than it is sent never converges.

Non-shared storage, in order (``∥``: the two lanes run concurrently; with several disks, the
realistic VM's, every disk's overlay, base copy, NBD node, mirror and cancel at once, the
snapshots in one ``transaction`` as livemig takes them)::

    source: migrate-set-capabilities, migrate-set-parameters, (overlay file written, as
            livemig writes it: drivers/qcow2.py),
            blockdev-add overlay, blockdev-snapshot
    ∥ target: migrate-set-capabilities, nbd-server-start, block-export-add, migrate-incoming
    qemu-img convert -n --target-is-zero base → the target's export (as livemig copies it)
    ∥ source: blockdev-add nbd (the mirror's target, connected meanwhile)
    source: blockdev-mirror sync=top; BLOCK_JOB_READY (event)
    source: migrate; MIGRATION pre-switchover (event)          ← the guest is paused from here
    source: block-job-cancel; JOB_STATUS_CHANGE null (event)
    target: nbd-server-stop ∥ source: migrate-continue
    target: MIGRATION completed (event); cont                    ← the guest runs again

Shared storage: the capabilities and parameters (target: then ``migrate-incoming``), ``migrate``,
pre-switchover, ``migrate-continue``, completed, ``cont``.

``total_ms`` runs from the first command sent to the target's ``cont`` answered. Afterwards,
off the clock: the source's ``MIGRATION completed``, its ``query-migrate`` (downtime, RAM
bytes), ``quit``. Past the deadline the run counts as not converged and the bench reverts as
for lxd-equivalent (migration and mirror cancelled, overlay committed back, target quit).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import trio

from bench.model import CopiedDisk, VariantFiles
from bench.realistic import AnyLab, copied_disks, data_bytes
from livemig.drivers import block, image, jobs, migration, nbd, qcow2, runstate
from livemig.drivers.qmp import EventStream, Monitor, QMPEvent, open_monitor
from livemig.drivers.status import JobStatus, MigrationStatus, RunState
from livemig.fsm.plan import Policy
from livemig.transports.errors import CommandFailed, ConnectionLost, LivemigError

__all__ = ["BareOutcome", "run_bare_qmp"]

_OVERLAY = "bare-overlay"
_NBD_NODE = "bare-nbd"
_MIRROR = "bare-mirror"
_COMMIT = "bare-commit"
_EXPORT = "bare-export"
#: livemig's own (``livemig.fsm.settings``; a test checks they agree): source and target
#: capabilities, and ``max-bandwidth`` "no cap" (1 TiB/s).
SOURCE_CAPABILITIES = ("events", "pause-before-switchover")
TARGET_CAPABILITIES = ("events", "late-block-activate")
UNLIMITED_BANDWIDTH = 1 << 40
_JOB_EVENTS = ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR")
#: Only for the bench's revert (never on the measured path).
_POLL_S = 0.05


def source_parameters() -> dict[str, int]:
    """``downtime-limit`` and ``max-bandwidth`` as livemig sets them by default."""
    policy = Policy()
    return {
        "downtime-limit": policy.downtime_limit_ms,
        "max-bandwidth": policy.max_bandwidth or UNLIMITED_BANDWIDTH,
    }


@attrs.define
class BareOutcome:
    converged: bool = False
    #: The deadline passed before ``pre-switchover`` (then the bench reverted).
    timed_out: bool = False
    #: First command sent → the target's ``cont`` answered.
    total_ms: float | None = None
    #: Connecting both monitors (before the first command; not in ``total_ms``).
    connect_ms: float | None = None
    #: First command → the source's ``quit`` answered (the same end as livemig's total).
    to_quit_ms: float | None = None
    downtime_ms: float | None = None
    ram_bytes: int | None = None
    disk_bytes: int | None = None
    error: str | None = None
    #: ms since the first command at which each step ended.
    phases_ms: dict[str, float] = attrs.field(factory=dict)
    #: As livemig's result: ``(ms, what)`` from the source's pre-switchover event received (0)
    #: to the target's ``cont`` answered; first, when its stamp allows, when QEMU emitted it.
    switchover: list[tuple[float, str]] = attrs.field(factory=list)
    revert_problems: list[str] = attrs.field(factory=list)


@attrs.define
class _Clock:
    """ms since the first command; the switchover window once it opens."""

    out: BareOutcome
    started: float = 0.0
    window_origin: float | None = None

    def start(self) -> None:
        self.started = trio.current_time()

    def ms(self) -> float:
        return (trio.current_time() - self.started) * 1000.0

    def mark(self, phase: str) -> None:
        self.out.phases_ms.setdefault(phase, round(self.ms(), 2))
        if self.window_origin is not None:
            self.out.switchover.append(
                (round((trio.current_time() - self.window_origin) * 1000.0, 2), phase)
            )

    def open_window(self, paused: QMPEvent) -> None:
        self.window_origin = trio.current_time()
        lag_ms = (time.time() - paused.timestamp) * 1000.0  # QEMU stamps on the host clock
        if 0.0 <= lag_ms < 10_000.0:
            self.out.switchover.append((round(-lag_ms, 2), "source emitted pre-switchover"))
        what = "source pre-switchover event received"
        self.out.phases_ms[what] = round(self.ms(), 2)
        self.out.switchover.append((0.0, what))


async def run_bare_qmp(lab: AnyLab, *, deadline_s: float) -> BareOutcome:
    """Migrate the lab's guest with the fewest commands; revert when ``deadline_s`` passes."""
    out = BareOutcome()
    disks = copied_disks(lab)
    files = VariantFiles.under(lab.work_dir, "bare", disks)
    # Known beforehand: each disk's size (its overlay's).
    sizes = tuple([(await image.info(d.image)).virtual_size for d in disks])
    before = trio.current_time()
    async with (
        open_monitor(lab.source_qmp, name="bare-source") as src,
        open_monitor(lab.target_qmp, name="bare-target") as dst,
        src.listen("MIGRATION") as src_migration,
        dst.listen("MIGRATION") as dst_migration,
    ):
        out.connect_ms = round((trio.current_time() - before) * 1000.0, 2)
        run = _Run(lab, src, dst, src_migration, dst_migration, files, _Clock(out), disks, sizes)
        run.clock.start()
        try:
            with trio.move_on_after(deadline_s):
                await run.forward()
        except LivemigError as err:
            out.error = f"{type(err).__name__}: {err}"
        if not run.at_switchover:
            if out.error is None:
                out.timed_out = True
                out.error = f"not at pre-switchover after {deadline_s:.0f} s"
            with trio.CancelScope(shield=True), trio.move_on_after(120) as scope:
                await _revert(src, dst, files, disks, out)
            if scope.cancelled_caught:
                out.revert_problems.append("the bench's revert did not finish in 120 s")
            return out
        try:
            with trio.fail_after(60):
                await run.switch_over()
        except (LivemigError, trio.TooSlowError) as err:
            out.error = f"switchover: {type(err).__name__}: {err}"
            return out
        out.total_ms = run.clock.ms()
        out.converged = True
        try:
            with trio.fail_after(30):
                await run.figures_and_quit()
        except (LivemigError, trio.TooSlowError) as err:
            out.error = f"after the switchover: {type(err).__name__}: {err}"
    if lab.storage == "non-shared":
        bases = [await data_bytes(d) for d in disks]  # frozen since the snapshot
        out.disk_bytes = sum(bases) + (out.disk_bytes or 0)
    for path in files.all():
        await trio.Path(path).unlink(missing_ok=True)
    return out


@attrs.define
class _Run:
    lab: AnyLab
    src: Monitor
    dst: Monitor
    src_migration: EventStream
    dst_migration: EventStream
    files: VariantFiles
    clock: _Clock
    disks: tuple[CopiedDisk, ...]
    sizes: tuple[int, ...]
    at_switchover: bool = False

    @property
    def uri(self) -> str:
        return f"unix:{self.files.ram_socket}"

    async def forward(self) -> None:
        """Up to the source's pre-switchover event (the guest paused)."""
        if self.lab.storage == "non-shared":
            await self._disk()
        else:
            await _together(self._source_settings, self._target_settings)
        await migration.migrate(self.src, self.uri)
        self.clock.mark("← source migrate")
        paused = await _wait_migration(self.src_migration, MigrationStatus.PRE_SWITCHOVER)
        self.clock.open_window(paused)
        self.at_switchover = True

    async def _disk(self) -> None:
        src = self.src
        await _together(self._source_snapshot, self._target_settings)
        await _together(
            *(partial(self._copy_base, d) for d in self.disks),
            *(partial(self._add_nbd_node, d) for d in self.disks),
        )
        mirrors = {_MIRROR + d.suffix for d in self.disks}
        async with src.listen("BLOCK_JOB_READY", *_JOB_EVENTS) as stream:
            for d in self.disks:
                await block.blockdev_mirror(
                    src,
                    job_id=_MIRROR + d.suffix,
                    device=_OVERLAY + d.suffix,
                    target=_NBD_NODE + d.suffix,
                    sync="top",
                )
            await _wait_jobs(stream, mirrors, until="ready")
        self.clock.mark("mirror ready")

    async def _copy_base(self, disk: CopiedDisk) -> None:
        # Known beforehand: the target's disk is a fresh image, so the copy skips zeros
        # (livemig learns it from the image's allocation).
        await image.copy_to_nbd(
            disk.image, disk.fmt, self.files.nbd_socket, disk.node, target_is_zero=True
        )
        self.clock.mark(f"base copied{disk.suffix}")

    async def _add_nbd_node(self, disk: CopiedDisk) -> None:
        """The source's NBD client, connected while the base is copied (a second client of
        the export; the mirror only starts once the copy is done)."""
        await block.blockdev_add(
            self.src,
            {
                "driver": "nbd",
                "node-name": _NBD_NODE + disk.suffix,
                "server": {"type": "unix", "path": str(self.files.nbd_socket)},
                "export": disk.node,
            },
        )
        self.clock.mark(f"← source blockdev-add nbd{disk.suffix}")

    async def _source_snapshot(self) -> None:
        await _together(
            self._source_settings,
            *(
                partial(qcow2.write_empty_qcow2, path, size)
                for path, size in zip(self.files.overlays, self.sizes, strict=True)
            ),
        )
        for d, path in zip(self.disks, self.files.overlays, strict=True):
            await block.blockdev_add(
                self.src,
                {
                    "driver": "qcow2",
                    "node-name": _OVERLAY + d.suffix,
                    "file": {"driver": "file", "filename": str(path)},
                    "backing": None,
                },
            )
        if len(self.disks) == 1:
            await block.blockdev_snapshot(self.src, node=self.disks[0].node, overlay=_OVERLAY)
        else:
            pairs = [(d.node, _OVERLAY + d.suffix) for d in self.disks]
            await block.snapshot_all(self.src, pairs)
        self.clock.mark("source: snapshot")

    async def _source_settings(self) -> None:
        await migration.set_capabilities(self.src, dict.fromkeys(SOURCE_CAPABILITIES, True))
        await migration.set_parameters(self.src, source_parameters())
        self.clock.mark("source: settings")

    async def _target_settings(self) -> None:
        dst = self.dst
        await migration.set_capabilities(dst, dict.fromkeys(TARGET_CAPABILITIES, True))
        if self.lab.storage == "non-shared":
            # Each disk's base copy and mirror connect at once here (pipelined): two clients
            # per disk.
            await nbd.nbd_server_start(
                dst, self.files.nbd_socket, max_connections=2 * len(self.disks)
            )
            for d in self.disks:
                await nbd.block_export_add(
                    dst, export_id=_EXPORT + d.suffix, node_name=d.node, name=d.node, writable=True
                )
        await migration.migrate_incoming(dst, self.uri)
        self.clock.mark("target: ready")

    async def switch_over(self) -> None:
        """From the pause to the target's ``cont``: only what must happen."""
        src, dst, clock = self.src, self.dst, self.clock
        if self.lab.storage == "non-shared":
            mirrors = [_MIRROR + d.suffix for d in self.disks]
            async with src.listen(*_JOB_EVENTS) as stream:
                for mirror in mirrors:
                    await jobs.block_job_cancel(src, mirror, force=False)
                clock.mark("← source block-job-cancel")
                completed = await _wait_jobs(stream, set(mirrors), until="gone")
            clock.mark("mirror gone")
            offsets = [e.data.get("offset") for e in completed.values()]
            clock.out.disk_bytes = sum(o for o in offsets if isinstance(o, int))
            await _together(self._stop_nbd, self._continue)
        else:
            await self._continue()
        await _wait_migration(self.dst_migration, MigrationStatus.COMPLETED)
        clock.mark("target completed event received")
        await runstate.cont(dst)
        clock.mark("← target cont")

    async def _stop_nbd(self) -> None:
        await nbd.nbd_server_stop(self.dst)
        self.clock.mark("← target nbd-server-stop")

    async def _continue(self) -> None:
        await migration.migrate_continue(self.src, MigrationStatus.PRE_SWITCHOVER)
        self.clock.mark("← source migrate-continue")

    async def figures_and_quit(self) -> None:
        """Off the clock: the source's figures once it says completed, then it goes."""
        out = self.clock.out
        await _wait_migration(self.src_migration, MigrationStatus.COMPLETED)
        stats = await migration.query_migrate(self.src)
        out.downtime_ms = stats.downtime_ms
        out.ram_bytes = stats.ram.transferred if stats.ram else None
        with contextlib.suppress(ConnectionLost, CommandFailed):
            await runstate.quit(self.src)
        out.to_quit_ms = self.clock.ms()


async def _together(*lanes: Callable[[], Awaitable[object]]) -> None:
    """Run ``lanes`` concurrently; the first failure cancels the others and is raised as is."""
    try:
        async with trio.open_nursery() as nursery:
            for lane in lanes:
                nursery.start_soon(lane)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if all(isinstance(e, Exception) for e in leaves):
            raise leaves[0] from group
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


async def _wait_migration(stream: EventStream, until: MigrationStatus) -> QMPEvent:
    async for event in stream:
        word = event.data.get("status")
        if not isinstance(word, str):
            continue
        status = MigrationStatus.parse(word)
        if status is until:
            return event
        if status.dead_end:
            raise LivemigError(f"migration {status} while waiting for {until}")
    raise LivemigError("the MIGRATION event stream ended")


async def _wait_jobs(stream: EventStream, wanted: set[str], *, until: str) -> dict[str, QMPEvent]:
    """Wait until every job of ``wanted`` is READY, or gone (``null``); returns each one's
    ``BLOCK_JOB_COMPLETED``, if one came on the way (its ``offset`` is what the mirror
    copied)."""
    completed: dict[str, QMPEvent] = {}
    left = set(wanted)
    async for event in stream:
        key = "id" if event.name == "JOB_STATUS_CHANGE" else "device"
        job = event.data.get(key)
        if not isinstance(job, str) or job not in wanted:
            continue
        if event.name == "BLOCK_JOB_ERROR":
            raise LivemigError(f"job {job}: {dict(event.data)}")
        if event.name == "BLOCK_JOB_COMPLETED":
            if until == "ready" or event.data.get("error"):
                raise LivemigError(f"job {job} completed: {dict(event.data)}")
            completed[job] = event
        if until == "ready" and event.name == "BLOCK_JOB_READY":
            left.discard(job)
        elif event.name == "JOB_STATUS_CHANGE":
            status = JobStatus.parse(str(event.data.get("status")))
            if until == "gone" and status is JobStatus.NULL:
                left.discard(job)
            elif until == "ready" and status.ending:
                raise LivemigError(f"job {job} ended ({status}) before it was ready")
        if not left:
            return completed
    raise LivemigError(f"the event stream ended while waiting for jobs {sorted(left)}")


# ---- the bench's revert (only when the deadline passed or something failed) -------------------


async def _revert(
    src: Monitor,
    dst: Monitor,
    files: VariantFiles,
    disks: tuple[CopiedDisk, ...],
    out: BareOutcome,
) -> None:
    """Undo what was done, whatever point was reached; each step looks before it acts."""
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("cancel the migration", partial(_cancel_migration, src))
    ]
    for d in disks:
        steps += [
            (f"cancel the mirror{d.suffix}", partial(_cancel_job, src, _MIRROR + d.suffix)),
            (f"remove the NBD node{d.suffix}", partial(_del_node, src, _NBD_NODE + d.suffix)),
        ]
    steps.append(("resume the source", partial(_resume, src)))
    for d in disks:
        steps += [
            (f"merge the overlay{d.suffix}", partial(_merge_overlay, src, d)),
            (f"remove the overlay node{d.suffix}", partial(_del_node, src, _OVERLAY + d.suffix)),
        ]
    steps.append(("quit the target", partial(_quit, dst)))
    for what, step in steps:
        try:
            await step()
        except LivemigError as err:
            out.revert_problems.append(f"could not {what}: {err}")
    for path in files.all():
        await trio.Path(path).unlink(missing_ok=True)


async def _cancel_migration(src: Monitor) -> None:
    if (await migration.query_migrate(src)).status.sending:
        await migration.migrate_cancel(src)
    while (await migration.query_migrate(src)).status.sending:  # noqa: ASYNC110
        await trio.sleep(_POLL_S)


async def _job_status(m: Monitor, job: str) -> JobStatus | None:
    return {j.id: j.status for j in await jobs.query_jobs(m)}.get(job)


async def _until_job(m: Monitor, job: str, want: set[JobStatus | None]) -> None:
    while (status := await _job_status(m, job)) not in want:
        if status is JobStatus.CONCLUDED and None in want:
            await jobs.job_dismiss(m, job)
        elif status is None or status is JobStatus.CONCLUDED:
            raise LivemigError(f"job {job} is {status}, waiting for {want}")
        await trio.sleep(_POLL_S)


async def _cancel_job(src: Monitor, job: str) -> None:
    if await _job_status(src, job) is None:
        return
    with contextlib.suppress(CommandFailed):  # concluded already: dismissed below
        await jobs.block_job_cancel(src, job, force=True)
    await _until_job(src, job, {None})


async def _del_node(src: Monitor, node: str) -> None:
    if any(n.node_name == node for n in await block.query_named_block_nodes(src)):
        await block.blockdev_del(src, node)


async def _resume(src: Monitor) -> None:
    status = await runstate.query_status(src)
    while status.status is RunState.FINISH_MIGRATE:
        await trio.sleep(_POLL_S)
        status = await runstate.query_status(src)
    if not status.running:
        await runstate.cont(src)


async def _merge_overlay(src: Monitor, disk: CopiedDisk) -> None:
    node, job = _OVERLAY + disk.suffix, _COMMIT + disk.suffix
    nodes = {n.node_name: n for n in await block.query_named_block_nodes(src)}
    overlay, base = nodes.get(node), nodes.get(disk.node)
    if overlay is None or base is None or overlay.backing_file != base.filename:
        return
    await block.block_commit(src, job_id=job, device=node, base_node=disk.node)
    await _until_job(src, job, {JobStatus.READY})
    await jobs.job_complete(src, job)
    await _until_job(src, job, {None})


async def _quit(dst: Monitor) -> None:
    with contextlib.suppress(ConnectionLost):
        await runstate.quit(dst)


def summary(out: BareOutcome) -> dict[str, Any]:
    """The extras the run record keeps."""
    return {
        "phases_ms": out.phases_ms,
        "switchover": [[ms, what] for ms, what in out.switchover],
        "connect_ms": out.connect_ms,
        "to_quit_ms": None if out.to_quit_ms is None else round(out.to_quit_ms, 1),
    }
