"""The ``lxd-equivalent`` variant: what LXD does for a live VM migration, over livemig's drivers.

The sequence and settings follow LXD's QEMU driver:

- QEMU's defaults stay: ``max-bandwidth`` 128 MiB/s, ``downtime-limit`` 300 ms;
- source capabilities ``auto-converge`` and ``pause-before-switchover`` (no ``events``);
  target ``late-block-activate`` (the same as livemig, which the NBD export needs);
- non-shared storage: qcow2 overlay + ``blockdev-snapshot``, the frozen base copied into the
  target's NBD export, ``blockdev-mirror sync=top`` of the overlay until READY; with several
  disks (the realistic VM), each disk in turn, one after the other;
- ``migrate``, then ``query-migrate`` once a second until ``pre-switchover`` (LXD polls at 1 s);
  no stall detection, no throttling beyond auto-converge;
- soft ``block-job-cancel`` of the mirror, ``migrate-continue``, ``completed``, target
  ``nbd-server-stop`` + ``cont``, source ``quit``.

LXD waits without a deadline; the benchmark gives it one. When it passes, the run counts as not
converged and the bench reverts so that the guest goes on on the source and the next run can
start. That revert is the benchmark's, not LXD's: each forward step pushes its undo step as the
runner's do (``migrate_cancel``, the mirror cancelled, the overlay committed back, the target
quit, the files removed), and livemig's own undo interpreter (`livemig.fsm.reverter.unwind`)
runs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Container
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from bench.model import VariantFiles
from bench.realistic import AnyLab, copied_disks, data_bytes
from livemig.drivers import block, image, jobs, migration, nbd, runstate
from livemig.drivers.host import LocalHost
from livemig.drivers.qmp import Monitor, open_monitor
from livemig.drivers.status import JobStatus, MigrationStatus
from livemig.fsm.machine import State
from livemig.fsm.plan import Deadlines
from livemig.fsm.reverter import unwind
from livemig.fsm.runner import ReconnectingMonitor, connect_monitor
from livemig.fsm.undo import Side, UndoKind, UndoStack, UndoStep
from livemig.transports.errors import CommandFailed, ConnectionLost, LivemigError

__all__ = ["LxdOutcome", "run_lxd_equivalent"]

#: LXD's interval between ``query-migrate`` polls while waiting for ``pre-switchover``.
PRE_SWITCHOVER_POLL_S = 1.0
#: How often the bench looks at jobs and statuses outside that loop.
_POLL_S = 0.05
#: Seconds the bench's whole revert may take.
_REVERT_S = 120
_OVERLAY = "lxd-overlay"
_NBD_NODE = "lxd-nbd"
_MIRROR = "lxd-mirror"
_COMMIT = "lxd-commit"
_EXPORT = "lxd-export"


@attrs.define
class LxdOutcome:
    converged: bool = False
    #: The deadline passed before ``pre-switchover`` (then the bench reverted).
    timed_out: bool = False
    total_ms: float | None = None
    downtime_ms: float | None = None
    ram_bytes: int | None = None
    disk_bytes: int | None = None
    error: str | None = None
    #: The last ``query-migrate`` sample of the 1 s loop, and how many were taken.
    last_poll: dict[str, Any] | None = None
    polls: int = 0
    phases_ms: dict[str, float] = attrs.field(factory=dict)
    revert_problems: list[str] = attrs.field(factory=list)


async def run_lxd_equivalent(lab: AnyLab, *, deadline_s: float) -> LxdOutcome:
    """Migrate the lab's guest the way LXD does; revert when ``deadline_s`` passes first."""
    out = LxdOutcome()
    files = VariantFiles.under(lab.work_dir, "lxd", copied_disks(lab))
    started = trio.current_time()

    def mark(phase: str) -> None:
        out.phases_ms[phase] = round((trio.current_time() - started) * 1000.0, 1)

    # What the bench's revert undoes, newest last; as in the runner, the source is resumed and
    # the target quit last of all.
    undo = UndoStack()
    undo.push(UndoStep(UndoKind.RESUME_GUEST, Side.SOURCE))
    undo.push(UndoStep(UndoKind.QUIT, Side.TARGET))
    async with (
        open_monitor(lab.source_qmp, name="lxd-source") as src,
        open_monitor(lab.target_qmp, name="lxd-target") as dst,
    ):
        at_switchover = False
        try:
            with trio.move_on_after(deadline_s):
                await _forward(
                    lab=lab, src=src, dst=dst, files=files, out=out, mark=mark, undo=undo
                )
                at_switchover = True
        except LivemigError as err:
            out.error = f"{type(err).__name__}: {err}"
        if not at_switchover:
            if out.error is None:
                out.timed_out = True
                out.error = f"not at pre-switchover after {deadline_s:.0f} s"
            await _revert(undo, lab, src, dst, out)
            if out.revert_problems:
                return out  # keep the files: the overlay may still hold guest writes
        else:
            try:
                with trio.fail_after(60):
                    await _switch_over(lab, src, dst, out)
            except (LivemigError, trio.TooSlowError) as err:
                out.error = f"switchover: {type(err).__name__}: {err}"
                return out
            out.total_ms = (trio.current_time() - started) * 1000.0
            out.converged = True
            mark("target-cont")
            with contextlib.suppress(ConnectionLost, CommandFailed):
                await runstate.quit(src)
    # As the runner does: a socket bound while its command was cancelled can appear after its
    # undo step ran, so sweep every file once all is undone (or the migration finished).
    for path in files.all():
        await trio.Path(path).unlink(missing_ok=True)
    return out


async def _forward(
    *,
    lab: AnyLab,
    src: Monitor,
    dst: Monitor,
    files: VariantFiles,
    out: LxdOutcome,
    mark: Callable[[str], None],
    undo: UndoStack,
) -> None:
    await migration.set_capabilities(src, {"auto-converge": True, "pause-before-switchover": True})
    await migration.set_capabilities(dst, {"late-block-activate": True})
    if lab.storage == "non-shared":
        await _disk(lab, src, dst, files, out, undo=undo)
        mark("mirror-ready")
    uri = f"unix:{files.ram_socket}"
    undo.push(UndoStep(UndoKind.DELETE_FILE, Side.TARGET, {"path": str(files.ram_socket)}))
    await migration.migrate_incoming(dst, uri)
    undo.push(UndoStep(UndoKind.CANCEL_MIGRATION, Side.SOURCE))
    await migration.migrate(src, uri)
    mark("migrate")
    while True:
        stats = await migration.query_migrate(src)
        out.polls += 1
        out.last_poll = _sample(stats)
        if stats.status is MigrationStatus.PRE_SWITCHOVER:
            break
        if stats.status.ended:
            raise LivemigError(f"migration {stats.status}: {stats.error_desc}")
        await trio.sleep(PRE_SWITCHOVER_POLL_S)
    mark("pre-switchover")


async def _disk(
    lab: AnyLab,
    src: Monitor,
    dst: Monitor,
    files: VariantFiles,
    out: LxdOutcome,
    *,
    undo: UndoStack,
) -> None:
    """Each disk in turn: overlay + snapshot; then the NBD server, and each disk in turn: its
    export, its frozen base copied, its NBD node and its ``sync=top`` mirror; until every
    mirror is READY."""
    disks = copied_disks(lab)
    for disk in disks:
        overlay, node = files.overlay_of(disks, disk), _OVERLAY + disk.suffix
        base = await image.info(disk.image)
        undo.push(UndoStep(UndoKind.DELETE_FILE, Side.SOURCE, {"path": str(overlay), "node": node}))
        await image.create(overlay, "qcow2", base.virtual_size)
        undo.push(UndoStep(UndoKind.DELETE_NODE, Side.SOURCE, {"node": node}))
        await block.blockdev_add(
            src,
            {
                "driver": "qcow2",
                "node-name": node,
                "file": {"driver": "file", "filename": str(overlay)},
                "backing": None,
            },
        )
        undo.push(
            UndoStep(
                UndoKind.MERGE_OVERLAY,
                Side.SOURCE,
                {"node": node, "base": disk.node, "job": _COMMIT + disk.suffix},
            )
        )
        await block.blockdev_snapshot(src, node=disk.node, overlay=node)
    undo.push(UndoStep(UndoKind.DELETE_FILE, Side.TARGET, {"path": str(files.nbd_socket)}))
    undo.push(UndoStep(UndoKind.STOP_NBD_SERVER, Side.TARGET))
    # One client per disk: each base copy ends before the next starts, each mirror stays.
    await nbd.nbd_server_start(dst, files.nbd_socket, max_connections=len(disks))
    out.disk_bytes = 0
    for disk in disks:
        export = disk.node
        undo.push(UndoStep(UndoKind.DELETE_EXPORT, Side.TARGET, {"export": _EXPORT + disk.suffix}))
        await nbd.block_export_add(
            dst, export_id=_EXPORT + disk.suffix, node_name=disk.node, name=export, writable=True
        )
        await image.copy_to_nbd(disk.image, disk.fmt, files.nbd_socket, export, target_is_zero=True)
        out.disk_bytes += await data_bytes(disk)
        nbd_node = _NBD_NODE + disk.suffix
        undo.push(UndoStep(UndoKind.DELETE_NODE, Side.SOURCE, {"node": nbd_node}))
        await block.blockdev_add(
            src,
            {
                "driver": "nbd",
                "node-name": nbd_node,
                "server": {"type": "unix", "path": str(files.nbd_socket)},
                "export": export,
            },
        )
        mirror = _MIRROR + disk.suffix
        undo.push(UndoStep(UndoKind.CANCEL_JOB, Side.SOURCE, {"job": mirror}))
        await block.blockdev_mirror(
            src, job_id=mirror, device=_OVERLAY + disk.suffix, target=nbd_node, sync="top"
        )
    for disk in disks:
        mirror = _MIRROR + disk.suffix
        await _until(
            partial(_job_status, src, mirror), {JobStatus.READY}, fail={None, JobStatus.CONCLUDED}
        )


async def _switch_over(lab: AnyLab, src: Monitor, dst: Monitor, out: LxdOutcome) -> None:
    if lab.storage == "non-shared":
        mirrors = [_MIRROR + d.suffix for d in copied_disks(lab)]
        mirrored = {j.device: j.offset for j in await jobs.query_block_jobs(src)}
        out.disk_bytes = (out.disk_bytes or 0) + sum(mirrored.get(m, 0) for m in mirrors)
        for mirror in mirrors:
            await jobs.block_job_cancel(src, mirror, force=False)
        for mirror in mirrors:
            await _until(partial(_job_status, src, mirror), {None})
    await migration.migrate_continue(src, MigrationStatus.PRE_SWITCHOVER)
    done, dead_ends = {MigrationStatus.COMPLETED}, {s for s in MigrationStatus if s.dead_end}
    await _until(lambda: _migration_status(src), done, fail=dead_ends)
    await _until(lambda: _migration_status(dst), done, fail=dead_ends)
    stats = await migration.query_migrate(src)
    out.downtime_ms = stats.downtime_ms
    out.ram_bytes = stats.ram.transferred if stats.ram else None
    if lab.storage == "non-shared":
        await nbd.nbd_server_stop(dst)
    await runstate.cont(dst)


async def _revert(
    undo: UndoStack, lab: AnyLab, src: Monitor, dst: Monitor, out: LxdOutcome
) -> None:
    """Run the undo steps the forward path pushed, with livemig's interpreter, shielded, over
    the runner's reconnecting monitors: as in livemig's revert, a target that exited (QEMU quits
    once its incoming migration is cancelled) counts as undone, not as a failed step."""
    state = _reached(out)
    deadlines = Deadlines()
    monitors = {
        Side.SOURCE: _reconnecting(src, lab.source_qmp, state, deadlines),
        Side.TARGET: _reconnecting(dst, lab.target_qmp, state, deadlines),
    }
    with trio.CancelScope(shield=True), trio.move_on_after(_REVERT_S) as scope:
        for monitor in monitors.values():
            await monitor.open()
        out.revert_problems += await unwind(
            undo,
            monitors,
            LocalHost(),
            state=state,
            step_deadline=deadlines.undo_step,
            patience=deadlines.liveness,
        )
        for monitor in monitors.values():
            await monitor.aclose()  # also the connections it opened (closing is idempotent)
    if scope.cancelled_caught:
        out.revert_problems.append(f"the bench's revert did not finish in {_REVERT_S} s")


def _reconnecting(
    current: Monitor, path: Path, state: State, deadlines: Deadlines
) -> ReconnectingMonitor:
    """``current`` first; a new connection to ``path`` whenever it dropped."""
    first = [current]

    async def connector(path: Path, name: str) -> Monitor:
        return first.pop() if first else await connect_monitor(path, name)

    return ReconnectingMonitor(connector, path, current.name, deadlines, state=lambda: state)


def _reached(out: LxdOutcome) -> State:
    """livemig's name for where the LXD sequence stopped (for the undo interpreter's errors)."""
    if "migrate" in out.phases_ms:
        return State.STATE_TRANSFER
    if "mirror-ready" in out.phases_ms:
        return State.MIRRORING
    return State.CONNECTED


async def _job_status(m: Monitor, job: str) -> JobStatus | None:
    return {j.id: j.status for j in await jobs.query_jobs(m)}.get(job)


async def _migration_status(m: Monitor) -> MigrationStatus:
    return (await migration.query_migrate(m)).status


async def _until(
    probe: Callable[[], Awaitable[str | None]],
    done: Container[str | None],
    *,
    fail: Container[str | None] = frozenset(),
) -> None:
    """Poll ``probe`` until it returns one of ``done``."""
    while True:
        value = await probe()
        if value in done:
            return
        if value in fail:
            raise LivemigError(f"unexpected status {value!r}")
        await trio.sleep(_POLL_S)


def _sample(stats: migration.MigrationStats) -> dict[str, Any]:
    ram = stats.ram
    return {
        "status": stats.status,
        "total_time_ms": stats.total_time_ms,
        "expected_downtime_ms": stats.expected_downtime_ms,
        "cpu_throttle_percentage": stats.cpu_throttle_percentage,
        "ram_transferred": ram.transferred if ram else None,
        "ram_remaining": ram.remaining if ram else None,
        "dirty_pages_rate": ram.dirty_pages_rate if ram else None,
        "dirty_sync_count": ram.dirty_sync_count if ram else None,
        "mbps": ram.mbps if ram else None,
    }
