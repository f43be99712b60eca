"""``livemig target-command`` and finding the QEMU behind a QMP socket (the peer tests that need
no QEMU run everywhere; the ones marked ``qemu`` start real ones)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401  (provides "aio_loop")

from livemig import target_command as target_command_module
from livemig.cli import EXIT_OK, EXIT_USAGE, main
from livemig.drivers import block, image, migration, runstate
from livemig.drivers.cmdline import FLAGS
from livemig.drivers.peer import qemu_argv, qmp_peer_pid, read_cmdline
from livemig.drivers.process import DiskSpec, QemuProcess, VmSpec, launched
from livemig.drivers.qmp import QMPConnection, connect, open_monitor
from livemig.drivers.status import MigrationStatus, RunState
from livemig.transports.errors import ConnectFailed, UsageError

LIVEMIG = [sys.executable, "-m", "livemig"]
QEMU = "qemu-system-x86_64"


def real_qemu(test: Any) -> Any:
    """Mark a test that starts real QEMUs."""
    skip = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed")
    return pytest.mark.qemu(skip(test))


UUID = "0b8d4e3a-6a57-4c4f-9d0e-3f1d5c2b7a10"
GUARD = 60  # seconds for a whole test; each QEMU step takes well under one
DISK_BYTES = 1024 * 1024


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LIVEMIG, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_peer_of_a_listening_socket_is_the_process_that_listens(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        assert qmp_peer_pid(path) == os.getpid()
        # It is not QEMU: the socket was not bound by one (as with -chardev socket,fd=N).
        with pytest.raises(UsageError, match=rf"held by process {os.getpid()} .*not a QEMU"):
            qemu_argv(path)


def test_a_path_that_is_no_listening_socket_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist or is not a socket"):
        qmp_peer_pid(tmp_path / "missing.qmp")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="does not exist or is not a socket"):
        qmp_peer_pid(tmp_path / "file")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # bound, never listening: what a dead QEMU leaves behind
    with pytest.raises(UsageError, match="nothing listens on"):
        qmp_peer_pid(stale)


def test_the_command_line_of_a_process(tmp_path: Path) -> None:
    assert read_cmdline(os.getpid()) == [
        os.fsdecode(w) for w in Path("/proc/self/cmdline").read_bytes().split(b"\0")[:-1]
    ]
    with pytest.raises(UsageError, match="no process 123"):
        read_cmdline(123, proc=tmp_path)
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cmdline").write_bytes(b"")
    with pytest.raises(UsageError, match="process 7 has no command line"):
        read_cmdline(7, proc=tmp_path)


def test_the_command_refuses_a_missing_socket_in_one_line(tmp_path: Path) -> None:
    result = run_cli("target-command", "--source-qmp", tmp_path / "nope.qmp")
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert result.stderr == (
        f"livemig: error: {tmp_path / 'nope.qmp'} does not exist or is not a socket\n"
    )
    assert main(["target-command"]) == EXIT_USAGE


# ---- real QEMU ----------------------------------------------------------------------------------


def source_spec(tmp_path: Path, **changes: Any) -> VmSpec:
    """A bare-firmware q35 source (no kernel), 128 MiB, its files in ``src/``; a raw disk via
    ``-blockdev`` unless ``changes`` say otherwise."""
    spec = VmSpec(
        name="src",
        qmp_socket=tmp_path / "src" / "vm.qmp",
        memory_mib=128,
        machine="q35",
        serial="none",
        disks=(DiskSpec(path=tmp_path / "src" / "root.raw"),),
        extra_args=("-uuid", UUID),
    )
    return attrs.evolve(spec, **changes)


@asynccontextmanager
async def source_qemu(tmp_path: Path, spec: VmSpec, *images: Path) -> AsyncIterator[QemuProcess]:
    """The source running ``spec``, with its disks' images (and ``images``) created first."""
    (tmp_path / "src").mkdir(exist_ok=True)
    for path in [*(d.path for d in spec.disks), *images]:
        await image.create(path, "raw", DISK_BYTES)
    async with launched(spec, work_dir=tmp_path / "src") as qemu:
        yield qemu


async def target_command(*args: str | Path) -> list[str]:
    """``livemig target-command`` in a subprocess: its stdout, split as a shell would."""
    result = await trio.run_process(
        [*LIVEMIG, "target-command", *map(str, args)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == EXIT_OK, result.stderr.decode()
    assert result.stderr == b""
    return shlex.split(result.stdout.decode())


@asynccontextmanager
async def started(argv: list[str], qmp: Path, stderr: Path) -> AsyncIterator[QMPConnection]:
    """Start ``argv`` as it is; yield its QMP connection once it answers; kill it on the way out."""
    with stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        while True:
            assert process.returncode is None, stderr.read_text()
            if not qmp.is_socket():  # not bound yet
                await trio.sleep(0.02)
                continue
            try:
                monitor = await connect(qmp, name="target")
                break
            except ConnectFailed:
                await trio.sleep(0.02)
        try:
            yield monitor
        finally:
            await monitor.aclose()
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()


async def nodes(monitor: QMPConnection) -> dict[str | None, str]:
    return {n.node_name: n.filename for n in await block.query_named_block_nodes(monitor)}


def value_of(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


async def migrate_ram(source: QMPConnection, target: QMPConnection, sock: Path) -> None:
    """Migrate RAM and device state only (the disks are separate files here) until both sides
    report ``completed`` (the target sets its run state before it says so)."""
    for monitor in (source, target):
        await migration.set_capabilities(monitor, {"events": True})
    await migration.migrate_incoming(target, f"unix:{sock}")
    async with source.listen("MIGRATION") as sent, target.listen("MIGRATION") as received:
        await migration.migrate(source, f"unix:{sock}")
        for events in (sent, received):
            async for event in events:
                if event.data.get("status") in {"completed", "failed", "cancelled"}:
                    break
    assert (await migration.query_migrate(source)).status is MigrationStatus.COMPLETED
    assert (await migration.query_migrate(target)).status is MigrationStatus.COMPLETED


@real_qemu
async def test_the_derived_blockdev_target_starts_and_takes_the_migration(
    aio_loop: object, tmp_path: Path
) -> None:
    spec = source_spec(tmp_path)
    dst = tmp_path / "dst"
    with trio.fail_after(GUARD):
        async with source_qemu(tmp_path, spec) as source:
            argv = await target_command("--source-qmp", spec.qmp_socket, "--target-dir", dst)
            assert argv[0] == QEMU
            assert argv[-3:] == ["-S", "-incoming", "defer"]
            assert value_of(argv, "-name") == "src"
            assert value_of(argv, "-uuid") == UUID
            assert re.fullmatch(r"pc-q35-\d+\.\d+", value_of(argv, "-machine"))
            assert str(tmp_path / "src") not in shlex.join(argv)  # nothing of the source's
            dst.mkdir()
            await image.create(dst / "root.raw", "raw", DISK_BYTES)
            async with (
                open_monitor(spec.qmp_socket, name="source") as src,
                started(argv, dst / "vm.qmp", tmp_path / "target.stderr") as target,
            ):
                assert (await runstate.query_status(target)).status is RunState.INMIGRATE
                machine = await runstate.query_machine(src)
                assert machine == value_of(argv, "-machine")
                assert await runstate.query_machine(target) == machine
                target_nodes = await nodes(target)
                assert target_nodes["root"] == str(dst / "root.raw")
                assert target_nodes["root-file"] == str(dst / "root.raw")
                await migrate_ram(src, target, dst / "mig.sock")
                assert (await runstate.query_status(target)).status is RunState.PAUSED
            assert source.returncode is None


@real_qemu
async def test_the_derived_drive_target_has_its_own_image_pidfile_and_sockets(
    aio_loop: object, tmp_path: Path
) -> None:
    src_dir, dst = tmp_path / "src", tmp_path / "dst"
    drive = src_dir / "drive0.raw"
    spec = source_spec(
        tmp_path,
        disks=(),
        paused=True,
        extra_args=(
            "-uuid", UUID,
            "-drive", f"file={drive},format=raw,if=none,id=drive0",
            "-device", "virtio-blk-pci,drive=drive0,id=vdb",
            "-pidfile", str(src_dir / "vm.pid"),
            "-monitor", f"unix:{src_dir / 'hmp.sock'},server=on,wait=off",
        ),
    )  # fmt: skip
    with trio.fail_after(GUARD):
        async with source_qemu(tmp_path, spec, drive):
            argv = await target_command(
                "--source-qmp", spec.qmp_socket, "--target-dir", dst,
                "--target-qmp", tmp_path / "target.qmp",
            )  # fmt: skip
            assert argv.count("-S") == 1
            assert value_of(argv, "-pidfile") == str(dst / "vm.pid")
            dst.mkdir()
            await image.create(dst / "drive0.raw", "raw", DISK_BYTES)
            async with (
                open_monitor(spec.qmp_socket, name="source") as src,
                started(argv, tmp_path / "target.qmp", tmp_path / "target.stderr") as target,
            ):
                assert (await runstate.query_status(target)).status is RunState.INMIGRATE
                assert await runstate.query_machine(target) == await runstate.query_machine(src)
                devices = {d.qdev: d for d in await block.query_block(target)}
                vdb = devices["/machine/peripheral/vdb/virtio-backend"]
                assert vdb.filename == str(dst / "drive0.raw")
                assert not vdb.read_only
                assert (dst / "vm.pid").read_text().strip().isdigit()
                assert (dst / "hmp.sock").is_socket()
                assert (src_dir / "hmp.sock").is_socket()  # the source's is untouched
                await migrate_ram(src, target, dst / "mig.sock")


@real_qemu
async def test_finding_the_peer_does_not_disturb_a_connected_client(
    aio_loop: object, tmp_path: Path
) -> None:
    spec = source_spec(tmp_path)
    with trio.fail_after(GUARD):
        async with source_qemu(tmp_path, spec) as source:
            async with open_monitor(spec.qmp_socket, name="source") as monitor:
                # One probe: it waits in QEMU's backlog of two until this client leaves.
                pid, argv = qemu_argv(spec.qmp_socket)
                assert (pid, argv) == (source.pid, spec.argv())
                # The connected client goes on as if nothing happened...
                assert (await runstate.query_status(monitor)).status is RunState.RUNNING
            # ... and the next one is served after it (QEMU drops the closed peer connection).
            async with open_monitor(spec.qmp_socket, name="again") as monitor:
                assert (await runstate.query_status(monitor)).status is RunState.RUNNING


@real_qemu
async def test_two_probes_while_a_client_holds_the_monitor_fill_its_backlog(
    aio_loop: object, tmp_path: Path
) -> None:
    """The measured limit the peer module documents: QEMU listens with a backlog of one, which
    Linux counts as two pending connections; a third is refused until QEMU drains them."""
    spec = source_spec(tmp_path)
    with trio.fail_after(GUARD):
        async with source_qemu(tmp_path, spec) as source:
            async with open_monitor(spec.qmp_socket, name="holder") as monitor:
                assert qmp_peer_pid(spec.qmp_socket) == source.pid
                assert qmp_peer_pid(spec.qmp_socket) == source.pid
                with pytest.raises(UsageError, match="backlog is full"):
                    qmp_peer_pid(spec.qmp_socket)
                assert (await runstate.query_status(monitor)).status is RunState.RUNNING
            # Once the holder leaves, QEMU drains the two closed probes and serves the next
            # client; one that comes before they are drained is refused, and tries again.
            while True:
                try:
                    monitor = await connect(spec.qmp_socket, name="next")
                    break
                except ConnectFailed:
                    await trio.sleep(0.02)
            try:
                assert (await runstate.query_status(monitor)).status is RunState.RUNNING
            finally:
                await monitor.aclose()


@real_qemu
async def test_a_monitor_busy_with_another_client_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = source_spec(tmp_path)
    monkeypatch.setattr(target_command_module, "MONITOR_TIMEOUT", 0.5)
    with trio.fail_after(GUARD):
        async with source_qemu(tmp_path, spec):
            # Another client holds the monitor (its greeting read), as a running migration would.
            other = await trio.open_unix_socket(str(spec.qmp_socket))
            async with other:
                assert b"QMP" in await other.receive_some()
                with pytest.raises(UsageError, match=r"did not answer within 0.5 s"):
                    await target_command_module.derive_target_command(
                        spec.qmp_socket, target_dir=tmp_path / "dst"
                    )


@real_qemu
def test_the_flag_table_agrees_with_the_installed_qemu(tmp_path: Path) -> None:
    """``QEMU -X -version -machine help``: a flag lets ``-version`` print the version; an option
    with an argument swallows it (and ``-machine help`` or an error follows)."""
    help_text = subprocess.run(
        [QEMU, "-help"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    names = set(re.findall(r"^-{1,2}([A-Za-z][\w-]*)", help_text, re.MULTILINE)) - {"h", "help"}
    assert {"S", "machine", "daemonize"} <= names
    disagree = []
    for name in sorted(names):
        run = subprocess.run(
            [QEMU, f"-{name}", "-version", "-machine", "help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
        )
        if "not supported for this target" in run.stderr:
            continue
        if ("QEMU emulator version" in run.stdout) != (name in FLAGS):
            disagree.append(name)
    assert disagree == []
