"""livemig.drivers.qmp and the command-family wrappers against a real QEMU 10 (no guest kernel
needed).

Each test starts its own QEMU with ``-S`` and a tiny raw disk. The QMP socket is bound and
listening before QEMU starts (QEMU gets it as ``-chardev socket,fd=N,server=on``), so connecting
never races QEMU's start-up and needs no polling.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401  (provides "aio_loop")

from livemig.drivers import block, jobs, migration, nbd, runstate
from livemig.drivers.qmp import EventStream, QMPConnection, QMPEvent, connect, open_monitor
from livemig.drivers.status import MigrationStatus, RunState
from livemig.transports.errors import CommandFailed, ConnectionLost

QEMU = "qemu-system-x86_64"
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed"),
]
GUARD = 30  # seconds; a real QEMU answers these in well under one
DISK_BYTES = 1024 * 1024


@attrs.frozen
class Qemu:
    process: trio.Process
    qmp_path: Path


@asynccontextmanager
async def running_qemu(
    tmp_path: Path, *extra: str, name: str = "vm", disk: bool = True
) -> AsyncIterator[Qemu]:
    """A paused QEMU (``-S``) with QMP on ``tmp_path/<name>.qmp``, killed and reaped on exit."""
    qmp_path = tmp_path / f"{name}.qmp"
    disk_args: list[str] = []
    if disk:
        image = tmp_path / f"{name}-base.raw"
        await qemu_img("create", "-f", "raw", str(image), str(DISK_BYTES))
        disk_args = [
            "-blockdev", f"file,node-name=base-file,filename={image}",
            "-blockdev", "raw,node-name=base,file=base-file",
        ]  # fmt: skip
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(qmp_path))
        listener.listen()
        argv = [
            QEMU, "-machine", "q35", "-accel", "tcg", "-display", "none", "-nodefaults",
            "-no-user-config", "-m", "128", "-S",
            "-chardev", f"socket,id=qmp,fd={listener.fileno()},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            *disk_args, *extra,
        ]  # fmt: skip
        process = await trio.lowlevel.open_process(
            argv, pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL
        )
    try:
        yield Qemu(process, qmp_path)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


async def qemu_img(*args: str) -> None:
    await trio.run_process(["qemu-img", *args], stdout=subprocess.DEVNULL)


async def next_event(events: EventStream, name: str, **data: object) -> QMPEvent:
    """The next event called ``name`` whose data has ``data``; others are skipped."""
    async for event in events:
        if event.name == name and all(event.data.get(k) == v for k, v in data.items()):
            return event
    raise AssertionError("unreachable: event streams do not end quietly")


async def node_names(monitor: QMPConnection) -> set[str | None]:
    return {node.node_name for node in await block.query_named_block_nodes(monitor)}


async def test_identity_and_run_state(aio_loop: object, tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with (
            running_qemu(tmp_path) as qemu,
            open_monitor(qemu.qmp_path, name="vm") as monitor,
        ):
            assert await runstate.query_status(monitor) == runstate.RunStatus(
                RunState.PRELAUNCH, False
            )
            version = await runstate.query_version(monitor)
            assert version >= runstate.QemuVersion(10, 0, 0)
            assert (
                await runstate.query_machine(monitor) == f"pc-q35-{version.major}.{version.minor}"
            )
            assert await runstate.query_memory_size_summary(monitor) == 128 * 1024 * 1024


async def test_stop_and_cont_emit_events_in_order(aio_loop: object, tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with (
            running_qemu(tmp_path) as qemu,
            open_monitor(qemu.qmp_path, name="vm") as monitor,
            monitor.listen("STOP", "RESUME") as events,
        ):
            await runstate.cont(monitor)
            assert (await runstate.query_status(monitor)).status == "running"
            await runstate.stop(monitor)
            assert await runstate.query_status(monitor) == runstate.RunStatus(
                RunState.PAUSED, False
            )
            await runstate.cont(monitor)
            received = [await events.receive() for _ in range(3)]
    assert [e.name for e in received] == ["RESUME", "STOP", "RESUME"]
    assert received[0].timestamp <= received[1].timestamp <= received[2].timestamp
    assert received[0].timestamp > 1.6e9  # seconds since the epoch


async def test_snapshot_mirror_export_commit_and_back(aio_loop: object, tmp_path: Path) -> None:
    overlay, target, nbd_sock = (
        tmp_path / "overlay.qcow2", tmp_path / "target.raw", tmp_path / "nbd.sock"
    )  # fmt: skip
    with trio.fail_after(GUARD):
        async with (
            running_qemu(tmp_path) as qemu,
            open_monitor(qemu.qmp_path, name="vm") as monitor,
            monitor.listen() as events,
        ):
            before = await node_names(monitor)
            assert before == {"base", "base-file"}

            # Snapshot: a qcow2 overlay (created with no backing) on top of the base.
            base_image = str(tmp_path / "vm-base.raw")
            await qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", base_image, str(overlay))
            await block.blockdev_add(
                monitor,
                {"driver": "qcow2", "node-name": "overlay", "backing": None,
                 "file": {"driver": "file", "filename": str(overlay)}},
            )  # fmt: skip
            nodes = {n.node_name: n for n in await block.query_named_block_nodes(monitor)}
            assert nodes["overlay"].backing_file is None  # added with no backing: none attached
            await block.blockdev_snapshot(monitor, "base", "overlay")
            nodes = {n.node_name: n for n in await block.query_named_block_nodes(monitor)}
            assert nodes["overlay"].driver == "qcow2"
            assert nodes["overlay"].backing_file == base_image == nodes["base"].filename
            assert nodes["base"].virtual_size == DISK_BYTES
            assert nodes["base"].active

            # Mirror the overlay to another node until READY, then soft-cancel it.
            await qemu_img("create", "-f", "raw", str(target), str(DISK_BYTES))
            await block.blockdev_add(
                monitor,
                {"driver": "raw", "node-name": "target",
                 "file": {"driver": "file", "filename": str(target)}},
            )  # fmt: skip
            await block.blockdev_mirror(
                monitor, job_id="m1", device="overlay", target="target", sync="top"
            )
            ready = await next_event(events, "BLOCK_JOB_READY", device="m1")
            assert ready.data["type"] == "mirror"
            (block_job,) = await jobs.query_block_jobs(monitor)
            assert (block_job.device, block_job.ready, block_job.status) == ("m1", True, "ready")
            assert block_job.offset == block_job.len
            (job,) = await jobs.query_jobs(monitor)
            assert (job.id, job.type, job.status, job.error) == ("m1", "mirror", "ready", None)
            await jobs.block_job_cancel(monitor, "m1")
            await next_event(events, "BLOCK_JOB_COMPLETED", device="m1")
            await next_event(events, "JOB_STATUS_CHANGE", id="m1", status="null")
            assert await jobs.query_jobs(monitor) == ()

            # Export the target over NBD, then take it down again.
            await nbd.nbd_server_start(monitor, nbd_sock)
            await nbd.block_export_add(monitor, export_id="e1", node_name="target", writable=True)
            assert await nbd.query_block_exports(monitor) == (
                nbd.BlockExport("e1", "nbd", "target", shutting_down=False),
            )
            await nbd.block_export_del(monitor, "e1")
            await next_event(events, "BLOCK_EXPORT_DELETED", id="e1")
            await nbd.nbd_server_stop(monitor)
            await block.blockdev_del(monitor, "target")

            # Revert: commit the overlay back into the base, complete, remove it.
            await block.block_commit(monitor, job_id="c1", device="overlay", auto_dismiss=False)
            await next_event(events, "BLOCK_JOB_READY", device="c1")
            await jobs.job_complete(monitor, "c1")
            await next_event(events, "JOB_STATUS_CHANGE", id="c1", status="concluded")
            await jobs.job_dismiss(monitor, "c1")
            await next_event(events, "JOB_STATUS_CHANGE", id="c1", status="null")
            await block.blockdev_del(monitor, "overlay")
            assert await node_names(monitor) == before

            with pytest.raises(CommandFailed) as caught:
                await block.blockdev_del(monitor, "overlay")
            assert caught.value.command == "blockdev-del"


async def test_exporting_an_incoming_node_activates_it(aio_loop: object, tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with (
            running_qemu(tmp_path, "-incoming", "defer") as qemu,
            open_monitor(qemu.qmp_path, name="tgt") as monitor,
        ):
            assert (await runstate.query_status(monitor)).status == "inmigrate"
            nodes = {n.node_name: n for n in await block.query_named_block_nodes(monitor)}
            assert not nodes["base"].active
            await nbd.nbd_server_start(monitor, tmp_path / "nbd.sock")
            await nbd.block_export_add(monitor, export_id="e1", node_name="base", writable=True)
            nodes = {n.node_name: n for n in await block.query_named_block_nodes(monitor)}
            assert nodes["base"].active
            await nbd.nbd_server_stop(monitor)
            assert await nbd.query_block_exports(monitor) == ()


async def test_capabilities_and_parameters(aio_loop: object, tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with (
            running_qemu(tmp_path, disk=False) as qemu,
            open_monitor(qemu.qmp_path, name="vm") as monitor,
        ):
            capabilities = await migration.query_capabilities(monitor)
            assert capabilities["events"] is False
            assert "pause-before-switchover" in capabilities
            assert "block" not in capabilities  # removed in QEMU 9.1
            await migration.set_capabilities(monitor, {"events": True, "auto-converge": True})
            capabilities = await migration.query_capabilities(monitor)
            assert capabilities["events"]
            assert capabilities["auto-converge"]
            with pytest.raises(CommandFailed) as caught:
                await migration.set_capabilities(monitor, {"no-such-capability": True})
            assert caught.value.error_class == "GenericError"

            parameters = await migration.query_parameters(monitor)
            assert parameters["downtime-limit"] == 300
            assert parameters["max-bandwidth"] == 128 * 1024 * 1024
            await migration.set_parameters(
                monitor, {"downtime-limit": 500, "max-bandwidth": 1 << 30}
            )
            parameters = await migration.query_parameters(monitor)
            assert (parameters["downtime-limit"], parameters["max-bandwidth"]) == (500, 1 << 30)
            assert await migration.query_migrate(monitor) == migration.MigrationStats(
                MigrationStatus.NONE
            )


async def test_migration_pauses_before_switchover_then_completes(
    aio_loop: object, tmp_path: Path
) -> None:
    uri = f"unix:{tmp_path / 'ram.sock'}"
    with trio.fail_after(GUARD):
        async with (
            running_qemu(tmp_path, disk=False, name="src") as src_qemu,
            running_qemu(tmp_path, "-incoming", "defer", disk=False, name="dst") as dst_qemu,
            open_monitor(src_qemu.qmp_path, name="src") as src,
            open_monitor(dst_qemu.qmp_path, name="dst") as dst,
            src.listen("MIGRATION", "STOP") as src_events,
            dst.listen("MIGRATION") as dst_events,
        ):
            await runstate.cont(src)
            await migration.set_capabilities(src, {"events": True, "pause-before-switchover": True})
            await migration.set_capabilities(dst, {"events": True, "late-block-activate": True})
            await migration.set_parameters(src, {"max-bandwidth": 0})  # 0: unlimited
            await migration.migrate_incoming(dst, uri)
            await migration.migrate(src, uri)
            src_seen = [(await src_events.receive()) for _ in range(4)]
            assert [(e.name, e.data.get("status")) for e in src_seen] == [
                ("MIGRATION", "setup"), ("MIGRATION", "active"), ("STOP", None),
                ("MIGRATION", "pre-switchover"),
            ]  # fmt: skip
            stats = await migration.query_migrate(src)
            assert stats.status == "pre-switchover"
            assert (await runstate.query_status(src)).status == "finish-migrate"
            await migration.migrate_continue(src)
            await next_event(src_events, "MIGRATION", status="completed")
            await next_event(dst_events, "MIGRATION", status="completed")
            stats = await migration.query_migrate(src)
            assert stats.status == "completed"
            assert stats.error_desc is None
            assert stats.total_time_ms is not None
            assert stats.downtime_ms is not None
            assert stats.ram is not None
            assert stats.ram.total >= 128 * 1024 * 1024  # guest RAM, plus ROMs and the like
            assert stats.ram.remaining == 0
            assert stats.ram.transferred > 0
            assert (await runstate.query_status(src)).status == "postmigrate"
            assert (await runstate.query_status(dst)).status == "paused"


async def test_migrate_cancel(aio_loop: object, tmp_path: Path) -> None:
    uri = f"unix:{tmp_path / 'ram.sock'}"
    with trio.fail_after(GUARD):
        async with (
            running_qemu(tmp_path, disk=False, name="src") as src_qemu,
            running_qemu(tmp_path, "-incoming", "defer", disk=False, name="dst") as dst_qemu,
            open_monitor(src_qemu.qmp_path, name="src") as src,
            open_monitor(dst_qemu.qmp_path, name="dst") as dst,
            src.listen("MIGRATION") as src_events,
        ):
            await runstate.cont(src)
            await migration.set_capabilities(src, {"events": True})
            await migration.set_parameters(src, {"max-bandwidth": 1024 * 1024})  # crawl
            await migration.migrate_incoming(dst, uri)
            await migration.migrate(src, uri)
            await next_event(src_events, "MIGRATION", status="active")
            running = await migration.query_migrate(src)
            assert running.status == "active"
            assert running.ram is not None
            assert running.ram.remaining > 0
            await migration.migrate_cancel(src)
            await next_event(src_events, "MIGRATION", status="cancelled")
            assert (await runstate.query_status(src)).status == "running"


async def test_postcopy_switch(aio_loop: object, tmp_path: Path) -> None:
    uri = f"unix:{tmp_path / 'ram.sock'}"
    with trio.fail_after(GUARD):
        async with (
            running_qemu(tmp_path, disk=False, name="src") as src_qemu,
            running_qemu(tmp_path, "-incoming", "defer", disk=False, name="dst") as dst_qemu,
            open_monitor(src_qemu.qmp_path, name="src") as src,
            open_monitor(dst_qemu.qmp_path, name="dst") as dst,
            src.listen("MIGRATION") as src_events,
        ):
            try:
                await migration.set_capabilities(dst, {"postcopy-ram": True})
            except CommandFailed as err:  # no userfaultfd here
                pytest.skip(f"post-copy unavailable: {err.desc}")
            await runstate.cont(src)
            await migration.set_capabilities(src, {"events": True, "postcopy-ram": True})
            await migration.set_parameters(src, {"max-bandwidth": 1024 * 1024})  # crawl
            await migration.migrate_incoming(dst, uri)
            await migration.migrate(src, uri)
            await next_event(src_events, "MIGRATION", status="active")
            await migration.set_parameters(src, {"max-postcopy-bandwidth": 0})
            await migration.start_postcopy(src)
            await next_event(src_events, "MIGRATION", status="postcopy-active")
            await next_event(src_events, "MIGRATION", status="completed")
            assert (await runstate.query_status(dst)).status == "paused"  # started with -S


async def test_second_client_is_not_greeted_while_the_first_is_connected(
    aio_loop: object, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD):
        async with (
            running_qemu(tmp_path, disk=False) as qemu,
            open_monitor(qemu.qmp_path, name="first") as first,
        ):
            with trio.move_on_after(1) as scope:
                await connect(qemu.qmp_path, name="second")
            assert scope.cancelled_caught
            assert (await runstate.query_status(first)).status == "prelaunch"


async def _query_until_lost(monitor: QMPConnection, busy: trio.Event, lost: trio.Event) -> None:
    """Query in a loop (``busy`` after 20 answers) until the connection is lost."""
    commands = 0
    try:
        while True:
            await runstate.query_status(monitor)
            commands += 1
            if commands == 20:
                busy.set()
    except ConnectionLost:
        lost.set()


async def test_killed_qemu_ends_commands_and_events_with_connection_lost(
    aio_loop: object, tmp_path: Path
) -> None:
    busy, lost = trio.Event(), trio.Event()
    async with running_qemu(tmp_path, disk=False) as qemu:
        with trio.fail_after(GUARD):
            async with (
                open_monitor(qemu.qmp_path, name="vm") as monitor,
                monitor.listen() as events,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(_query_until_lost, monitor, busy, lost)
                await busy.wait()
                qemu.process.send_signal(signal.SIGKILL)
                with trio.fail_after(5):
                    await lost.wait()
                    with pytest.raises(ConnectionLost):
                        await events.receive()
                with pytest.raises(ConnectionLost):
                    await runstate.query_status(monitor)
        with trio.fail_after(5):
            await qemu.process.wait()
        assert qemu.process.returncode == -signal.SIGKILL
    assert not await trio.Path(f"/proc/{qemu.process.pid}").exists()
