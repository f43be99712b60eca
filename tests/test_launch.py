"""livemig.drivers.launch: a migration target started on this host for a running source.

The plan is pure (no QEMU); the start, the detaching and the removal are tested first with a
small fake QEMU (a Python process serving a QMP greeting), then with real QEMUs (marked
``qemu``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import socket
import stat
import sys
import textwrap
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from support.guest_fixtures import guest_image_fixture  # noqa: F401  (provides "guest_image")
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401  (provides "aio_loop")

from livemig.drivers import block, image, migration, runstate
from livemig.drivers.block import BlockDevice
from livemig.drivers.launch import (
    DiskImage,
    LaunchPlan,
    LocalTarget,
    derive_local_target,
    launch_local_target,
    start_local_target,
)
from livemig.drivers.peer import PeerQemu
from livemig.drivers.process import DiskSpec, QemuProcess, VmSpec, find_qemu_processes, launched
from livemig.drivers.qmp import QMPConnection, open_monitor
from livemig.drivers.status import MigrationStatus, RunState
from livemig.guest import GuestImage, guest_vm_spec
from livemig.transports.errors import ProcessError, UsageError

QEMU = "qemu-system-x86_64"
MIB = 1 << 20
GUARD = 60  # seconds for a whole real test; each step takes well under one


def real_qemu(test: Any) -> Any:
    """Mark a test that starts real QEMUs."""
    missing = shutil.which(QEMU) is None or shutil.which("qemu-img") is None
    return pytest.mark.qemu(pytest.mark.skipif(missing, reason=f"{QEMU} is not installed")(test))


# ---- the plan (pure) -----------------------------------------------------------------------------


def disk(path: str, *, read_only: bool = False, qdev: str = "vda") -> BlockDevice:
    return BlockDevice(
        qdev=f"/machine/peripheral/{qdev}/virtio-backend",
        node_name=f"node-{qdev}",
        filename=path,
        read_only=read_only,
    )


SOURCE_SPEC = VmSpec(
    name="src",
    qmp_socket=Path("/run/src/vm.qmp"),
    disks=(
        DiskSpec(path=Path("/run/src/root.raw")),
        DiskSpec(path=Path("/shared/data.qcow2"), fmt="qcow2", node_name="data", device_id="vdb"),
    ),
    kernel=Path("/boot/vmlinuz"),
)


def peer(
    *extra: str, argv: list[str] | None = None, devices: tuple[BlockDevice, ...] | None = None
) -> PeerQemu:
    """A source as `describe_qemu` would find it: the test guest's kind of command line (serial
    console on stdio), a root disk in ``/run/src`` and a data disk in ``/shared``."""
    return PeerQemu(
        pid=1234,
        argv=(*(argv or SOURCE_SPEC.argv()), *extra),
        cwd=Path("/run/src"),
        machine="pc-q35-10.0",
        devices=devices
        or (
            disk("/run/src/root.raw"),
            disk("/shared/data.qcow2", qdev="vdb"),
            disk("/boot/x.iso", read_only=True, qdev="cd"),
        ),
    )


ROOT = {"/run/src/root.raw": DiskImage("raw", 64 * MIB)}


def plan_for(source: PeerQemu, copy: Mapping[str, DiskImage] = ROOT, **kw: Any) -> LaunchPlan:
    args: dict[str, Any] = {"source_qmp": Path("/run/src/vm.qmp"), "target_dir": Path("/run/dst")}
    return derive_local_target(source, copy_disks=copy, **(args | kw))


def test_the_plan_copies_the_named_disks_into_the_target_dir_and_keeps_the_others() -> None:
    plan = plan_for(peer())
    assert plan.directory == Path("/run/dst")
    assert plan.qmp == Path("/run/dst/vm.qmp")
    assert plan.log == Path("/run/dst/qemu.log")
    assert plan.serial == plan.log  # the console on stdio writes to the log
    assert plan.disks == {"/run/src/root.raw": Path("/run/dst/root.raw")}
    assert plan.images == {Path("/run/dst/root.raw"): DiskImage("raw", 64 * MIB)}
    assert plan.files == (Path("/run/dst/vm.qmp"),)
    assert plan.cwd == Path("/run/src")  # relative paths mean to the target what they meant
    argv = list(plan.argv)
    assert argv[-3:] == ["-S", "-incoming", "defer"]
    assert argv[argv.index("-machine") + 1] == "pc-q35-10.0"
    joined = " ".join(argv)
    assert "filename=/run/dst/root.raw" in joined
    assert "filename=/shared/data.qcow2" in joined  # shared: the same file
    assert "path=/run/dst/vm.qmp" in joined
    assert "/run/src/" not in joined  # nothing else of the source's dir


def test_two_copied_disks_of_one_name_get_two_images() -> None:
    source = peer(
        argv=[
            *attrs.evolve(SOURCE_SPEC, disks=()).argv(),
            "-drive",
            "file=/a/disk.raw,if=none,id=d0,format=raw",
            "-drive",
            "file=/b/disk.raw,if=none,id=d1,format=raw",
        ],
        devices=(disk("/a/disk.raw"), disk("/b/disk.raw", qdev="vdb")),
    )
    copy = {"/a/disk.raw": DiskImage("raw", MIB), "/b/disk.raw": DiskImage("qcow2", 2 * MIB)}
    plan = plan_for(source, copy)
    assert plan.disks == {
        "/a/disk.raw": Path("/run/dst/disk.raw"),
        "/b/disk.raw": Path("/run/dst/disk-1.raw"),
    }
    assert plan.images[Path("/run/dst/disk-1.raw")] == DiskImage("qcow2", 2 * MIB)


@pytest.mark.parametrize(
    ("serial", "expected"),
    [
        (["-serial", "stdio"], "/run/dst/qemu.log"),
        (["-serial", "mon:stdio"], "/run/dst/qemu.log"),
        (["-serial", "file:/run/src/console.txt"], "/run/dst/console.txt"),
        (["-chardev", "file,id=c0,path=/run/src/c.txt", "-serial", "chardev:c0"], "/run/dst/c.txt"),
        (["-serial", "unix:/run/src/console.sock,server=on,wait=off"], None),
        (["-serial", "none"], None),
        (["-nographic"], "/run/dst/qemu.log"),
        (["-nographic", "-nodefaults"], None),
        ([], None),
    ],
)
def test_the_serial_console_is_reported_when_it_writes_to_a_file(
    serial: list[str], expected: str | None
) -> None:
    base = [
        "-chardev",
        "socket,id=qmp,path=/run/src/vm.qmp,server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    source = peer(argv=[QEMU, *base, *serial], devices=())
    plan = plan_for(source, {})
    assert plan.serial == (Path(expected) if expected else None)


def test_the_log_takes_another_name_when_qemu_writes_one_of_its_own() -> None:
    plan = plan_for(peer("-D", "/run/src/qemu.log", "-pidfile", "vm.pid"))
    assert plan.files == (
        Path("/run/dst/vm.qmp"),
        Path("/run/dst/qemu.log"),
        Path("/run/dst/vm.pid"),
    )
    assert plan.log == Path("/run/dst/qemu-1.log")


def test_the_plan_refuses_what_would_not_work() -> None:
    with pytest.raises(
        UsageError,
        match=r"no writable disk image /boot/x.iso .*/run/src/root.raw, /shared/data.qcow2\)",
    ):
        plan_for(peer(), {"/boot/x.iso": DiskImage("raw", MIB)})
    with pytest.raises(UsageError, match=r"no writable disk image /nowhere.raw"):
        plan_for(peer(), {"/nowhere.raw": DiskImage("raw", MIB)})
    with pytest.raises(
        UsageError, match=r"the target dir /run/src holds the source's disk /run/src/root.raw"
    ):
        plan_for(peer(), target_dir=Path("/run/src"))
    relative = peer(
        argv=list(attrs.evolve(SOURCE_SPEC, disks=(DiskSpec(path=Path("root.raw")),)).argv()),
        devices=(disk("root.raw"),),
    )
    with pytest.raises(UsageError, match=r"holds the source's disk root.raw"):
        plan_for(relative, {"root.raw": DiskImage("raw", MIB)}, target_dir=Path("/run/dst/../src"))
    with pytest.raises(UsageError, match=r"longer than a unix socket path"):
        plan_for(peer(), target_dir=Path("/run/" + "d" * 100))
    with pytest.raises(
        UsageError, match=r"the target's QMP socket /run/src/vm.qmp is the source's"
    ):
        plan_for(peer(), {}, target_dir=Path("/run/src"))


def test_a_disk_image_is_of_a_copied_format_and_a_positive_size() -> None:
    with pytest.raises(UsageError, match=r"format must be one of raw, qcow2, .*, vpc, not 'vvfat'"):
        DiskImage("vvfat", MIB)  # type: ignore[arg-type]
    for size in (0, -1, True):
        with pytest.raises(UsageError, match="virtual_size must be between 1 and"):
            DiskImage("raw", size)


# ---- starting, detaching, removing: a fake QEMU ------------------------------------------------

FAKE_QEMU = textwrap.dedent(
    """\
    import os, signal, socket, sys

    path, mode = sys.argv[1], sys.argv[2]
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: (os.unlink(path), os._exit(0)))
    print("stdin:", os.readlink("/proc/self/fd/0"), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if mode == "fail":
        sys.exit(3)
    if mode == "hang":
        signal.pause()
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    while True:
        client, _ = server.accept()
        with client:
            client.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\\n')
            for _line in client.makefile("rb"):
                client.sendall(b'{"return": {}}\\n')
    """
)


def fake_plan(tmp_path: Path, mode: str = "serve", **changes: Any) -> LaunchPlan:
    """A plan whose "QEMU" is the fake above, its files in ``tmp_path/dst``."""
    script = tmp_path / "fake_qemu.py"
    script.write_text(FAKE_QEMU)
    dst = tmp_path / "dst"
    plan = LaunchPlan(
        argv=(sys.executable, "-I", "-S", str(script), str(dst / "vm.qmp"), mode),
        cwd=None,
        directory=dst,
        qmp=dst / "vm.qmp",
        log=dst / "qemu.log",
        serial=dst / "qemu.log",
        disks={"/src/root.raw": dst / "root.raw", "/src/data.qcow2": dst / "data.qcow2"},
        images={
            dst / "root.raw": DiskImage("raw", 64 * MIB),
            dst / "data.qcow2": DiskImage("qcow2", 8 * MIB),
        },
        files=(dst / "vm.qmp",),
    )
    return attrs.evolve(plan, **changes)


def processes_of(marker: Path) -> list[int]:
    """Live (not zombie) processes whose command line mentions ``marker``."""
    found = []
    needle = os.fsencode(marker)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def parent_and_session(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[1]), int(fields[3])


async def test_a_started_target_is_detached_and_remove_takes_away_all_it_made(
    tmp_path: Path,
) -> None:
    plan = fake_plan(tmp_path)
    with trio.fail_after(20):
        target = await start_local_target(plan)
    try:
        assert target.running()
        parent, session = parent_and_session(target.pid)
        assert parent != os.getpid()  # not our child: the starting shell has gone
        assert session != os.getsid(0)  # a session of its own
        log = target.log.read_text()
        assert "stdin: /dev/null" in log
        assert "to stderr" in log  # stdout and stderr both go to the log
        assert target.serial == target.log
        assert stat.S_IMODE(plan.directory.stat().st_mode) == 0o700
        raw = plan.directory / "root.raw"
        assert raw.stat().st_size == 64 * MIB
        assert raw.stat().st_blocks == 0  # sparse: nothing allocated
        qcow = plan.directory / "data.qcow2"
        assert qcow.read_bytes()[:4] == b"QFI\xfb"
        for path in (raw, qcow, target.log):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert target.as_json() == {
            "qmp": str(plan.qmp),
            "pid": target.pid,
            "serial": str(plan.log),
            "log": str(plan.log),
            "disks": {"/src/root.raw": str(raw), "/src/data.qcow2": str(qcow)},
        }
        json.dumps(target.as_json())
        assert pickle.loads(pickle.dumps(target)) == target  # it can be handed to another process
    finally:
        with trio.fail_after(20):
            await target.remove()
    assert not target.running()
    assert not plan.directory.exists()
    assert processes_of(plan.qmp) == []
    await target.remove()  # again: nothing to do


async def test_a_target_deaf_to_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    plan = fake_plan(tmp_path, "ignore-term")
    with trio.fail_after(20):
        target = await start_local_target(plan)
        await target.remove(grace=0.2)
    assert not target.running()
    assert not plan.directory.exists()  # the socket SIGKILL left behind is removed too


async def test_a_target_that_exits_at_start_is_an_error_with_its_output(tmp_path: Path) -> None:
    plan = fake_plan(tmp_path, "fail")
    with (
        trio.fail_after(20),
        pytest.raises(
            ProcessError, match=r"exited before .* \(exit status 3\): stdin: /dev/null\nto stderr"
        ) as caught,
    ):
        await start_local_target(plan)
    assert caught.value.returncode == 3
    assert not plan.directory.exists()


async def test_a_target_that_never_answers_is_killed_and_removed(tmp_path: Path) -> None:
    plan = fake_plan(tmp_path, "hang")
    with (
        trio.fail_after(20),
        pytest.raises(
            ProcessError, match=r"did not answer on its QMP socket .* within 0.5 s: stdin"
        ),
    ):
        await start_local_target(plan, start_timeout=0.5)
    assert processes_of(plan.qmp) == []
    assert not plan.directory.exists()


async def test_a_cancelled_start_leaves_nothing(tmp_path: Path) -> None:
    plan = fake_plan(tmp_path, "hang")
    with trio.move_on_after(0.5) as scope:
        await start_local_target(plan)
    assert scope.cancelled_caught
    assert processes_of(plan.qmp) == []
    assert not plan.directory.exists()


async def test_a_program_that_cannot_be_found_is_an_error(tmp_path: Path) -> None:
    plan = fake_plan(tmp_path, argv=(str(tmp_path / "no-qemu"), "-S"))
    with (
        trio.fail_after(20),
        pytest.raises(
            ProcessError,
            match=r"exited before .*\(exit status 127\): .*no-qemu: No such file",
        ),
    ):
        await start_local_target(plan)
    assert not plan.directory.exists()


async def test_an_existing_file_is_refused_and_an_existing_dir_kept(tmp_path: Path) -> None:
    plan = fake_plan(tmp_path)
    plan.directory.mkdir(mode=0o755)
    image_path = plan.directory / "data.qcow2"
    image_path.write_bytes(b"someone's")
    with pytest.raises(UsageError, match=r"data.qcow2 exists: the target's would replace it"):
        await start_local_target(plan)
    assert sorted(p.name for p in plan.directory.iterdir()) == ["data.qcow2"]
    assert image_path.read_bytes() == b"someone's"
    image_path.unlink()
    with trio.fail_after(20):
        target = await start_local_target(plan)
        (plan.directory / "theirs").write_text("")  # put there by someone else meanwhile
        await target.remove()
    assert sorted(p.name for p in plan.directory.iterdir()) == ["theirs"]
    assert stat.S_IMODE(plan.directory.stat().st_mode) == 0o755  # an existing dir keeps its mode

    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match=r"is not a directory"):
        await start_local_target(fake_plan(tmp_path, directory=tmp_path / "file"))
    with pytest.raises(UsageError, match=r"cannot create the target dir .*: .* is none"):
        await start_local_target(fake_plan(tmp_path, directory=tmp_path / "no" / "dst"))


async def test_remove_leaves_a_process_that_only_has_the_pid_alone(tmp_path: Path) -> None:
    """A pid is taken again after its process is gone: the start time tells them apart."""
    stranger = LocalTarget(
        qmp=tmp_path / "vm.qmp",
        pid=os.getpid(),
        serial=None,
        log=tmp_path / "qemu.log",
        disks={},
        argv=(),
        directory=tmp_path,
        created_dir=False,
        files=(tmp_path / "qemu.log",),
        start_time=-1,
    )
    (tmp_path / "qemu.log").write_text("")
    assert not stranger.running()
    await stranger.remove(grace=0)  # we are still here
    assert not (tmp_path / "qemu.log").exists()


# ---- real QEMU -----------------------------------------------------------------------------------


def bare_source(tmp_path: Path, **changes: Any) -> VmSpec:
    """A bare-firmware q35 source (no kernel: quick), 128 MiB, its files in ``src/``."""
    spec = VmSpec(
        name="src",
        qmp_socket=tmp_path / "src" / "vm.qmp",
        memory_mib=128,
        serial="none",
        disks=(DiskSpec(path=tmp_path / "src" / "root.raw"),),
    )
    return attrs.evolve(spec, **changes)


@asynccontextmanager
async def source_qemu(tmp_path: Path, spec: VmSpec) -> AsyncIterator[QemuProcess]:
    """The source running ``spec``; its disk images that do not exist are made (raw, 1 MiB)."""
    (tmp_path / "src").mkdir(exist_ok=True)
    for disk_spec in spec.disks:
        if not disk_spec.path.exists():
            await image.create(disk_spec.path, "raw", MIB)
    async with launched(spec, work_dir=tmp_path / "src") as qemu:
        yield qemu


async def nodes(monitor: QMPConnection) -> dict[str | None, str]:
    return {n.node_name: n.filename for n in await block.query_named_block_nodes(monitor)}


async def migrate_ram(source: QMPConnection, target: QMPConnection, sock: Path) -> None:
    """Migrate RAM and device state (not the disks) until both sides say ``completed``."""
    for monitor in (source, target):
        await migration.set_capabilities(monitor, {"events": True})
    await migration.migrate_incoming(target, f"unix:{sock}")
    async with target.listen("MIGRATION") as received:
        await migration.migrate(source, f"unix:{sock}")
        async for event in received:
            if event.data.get("status") in {"completed", "failed", "cancelled"}:
                break
    assert (await migration.query_migrate(target)).status is MigrationStatus.COMPLETED


def signals_ignored(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line for line in status.splitlines() if line.startswith("SigIgn:"))


LAUNCH_ELSEWHERE = """\
import pickle, sys, trio
from pathlib import Path
from livemig.drivers.launch import DiskImage, launch_local_target

source_qmp, target_dir, disk, size = sys.argv[1:]
copy = {disk: DiskImage("raw", int(size))}
target = trio.run(lambda: launch_local_target(Path(source_qmp), Path(target_dir), copy_disks=copy))
print(pickle.dumps(target).hex())
"""


@real_qemu
async def test_a_target_launched_by_a_process_that_exits_waits_for_the_guest(
    aio_loop: object, guest_image: GuestImage, tmp_path: Path
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    disk_path = src / "source.raw"
    await image.create(disk_path, "raw", 16 * MIB)
    spec = guest_vm_spec(
        guest_image, disk=disk_path, qmp_socket=src / "vm.qmp", name="source", memory_mib=256
    )
    with trio.fail_after(GUARD):
        async with launched(spec, work_dir=src) as source:
            # The launch runs in a process of its own, which exits: as `livemig migrate` would.
            done = await trio.run_process(
                [
                    sys.executable,
                    "-c",
                    LAUNCH_ELSEWHERE,
                    spec.qmp_socket,
                    dst,
                    disk_path,
                    str(16 * MIB),
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert done.returncode == 0, done.stderr.decode()
            target: LocalTarget = pickle.loads(bytes.fromhex(done.stdout.decode()))
            try:
                assert target.running()
                assert (
                    Path(f"/proc/{target.pid}/cmdline").read_bytes().split(b"\0")[0]
                    == QEMU.encode()
                )
                assert find_qemu_processes(dst) == [target.pid]
                # Nothing of the starter's in the way: signals as the source has them.
                assert signals_ignored(target.pid) == signals_ignored(source.pid)
                target_disk = dst / "source.raw"
                assert target.disks == {str(disk_path): target_disk}
                assert target_disk.stat().st_size == 16 * MIB
                assert target_disk.stat().st_blocks == 0
                info = await image.info(target_disk)
                assert (info.format, info.virtual_size) == ("raw", 16 * MIB)
                assert target.serial == target.log == dst / "qemu.log"  # the console was on stdio
                async with (
                    open_monitor(spec.qmp_socket, name="source") as src_monitor,
                    open_monitor(target.qmp, name="target") as monitor,
                ):
                    assert (await runstate.query_status(monitor)).status is RunState.INMIGRATE
                    machine = await runstate.query_machine(monitor)
                    assert re.fullmatch(r"pc-q35-\d+\.\d+", machine)
                    assert machine == await runstate.query_machine(src_monitor)
                    target_nodes = await nodes(monitor)
                    assert target_nodes["root-file"] == str(target_disk)
                    assert target_nodes["root"] == str(target_disk)
            finally:
                with trio.fail_after(20):
                    await target.remove()
            assert not target.running()
            assert find_qemu_processes(dst) == []
            assert not dst.exists()
            assert source.returncode is None  # the source runs on
            assert disk_path.exists()


@real_qemu
async def test_a_shared_disk_is_the_source_s_file_and_the_target_takes_the_migration(
    aio_loop: object, tmp_path: Path
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    base, root, shared = src / "base.raw", src / "root.qcow2", src / "shared.raw"
    await image.create(base, "raw", 4 * MIB)
    await image.create(root, "qcow2", None, backing=base, backing_fmt="raw")
    await image.create(shared, "raw", 2 * MIB)
    spec = bare_source(
        tmp_path,
        disks=(
            DiskSpec(path=root, fmt="qcow2"),
            DiskSpec(path=shared, node_name="shared", device_id="vdb"),
        ),
    )
    with trio.fail_after(GUARD):
        async with source_qemu(tmp_path, spec):
            target = await launch_local_target(
                spec.qmp_socket, dst, copy_disks={str(root): DiskImage("qcow2", 4 * MIB)}
            )
            try:
                assert target.serial is None
                info = await image.info(dst / "root.qcow2")
                assert (info.format, info.virtual_size, info.backing) == ("qcow2", 4 * MIB, None)
                async with (
                    open_monitor(spec.qmp_socket, name="source") as src_monitor,
                    open_monitor(target.qmp, name="target") as monitor,
                ):
                    target_nodes = await nodes(monitor)
                    assert target_nodes["root-file"] == str(dst / "root.qcow2")
                    assert target_nodes["shared-file"] == str(shared)  # the same file
                    await migrate_ram(src_monitor, monitor, dst / "mig.sock")
                    assert (await runstate.query_status(monitor)).status is RunState.PAUSED
            finally:
                with trio.fail_after(20):
                    await target.remove()
            assert not dst.exists()
            assert shared.exists()
            assert root.exists()
            assert base.exists()


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@real_qemu
async def test_a_target_qemu_that_fails_is_an_error_in_qemu_s_words_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    # A TCP listener is kept as it is: the target cannot bind the port the source holds.
    port = free_tcp_port()
    spec = bare_source(tmp_path, serial=f"tcp:127.0.0.1:{port},server=on,wait=off")
    dst = tmp_path / "dst"
    with trio.fail_after(GUARD):
        async with source_qemu(tmp_path, spec) as source:
            with pytest.raises(
                ProcessError, match=r"exited before .*\(exit status 1\): .*Address already in use"
            ) as caught:
                await launch_local_target(
                    spec.qmp_socket,
                    dst,
                    copy_disks={str(spec.disks[0].path): DiskImage("raw", MIB)},
                )
            assert f"tcp:127.0.0.1:{port}" in str(caught.value)
            assert not dst.exists()
            assert find_qemu_processes(dst) == []
            assert source.returncode is None


@real_qemu
async def test_a_target_dir_that_holds_the_source_s_disk_is_refused(tmp_path: Path) -> None:
    spec = bare_source(tmp_path)
    with trio.fail_after(GUARD):
        async with source_qemu(tmp_path, spec):
            before = sorted(p.name for p in (tmp_path / "src").iterdir())
            with pytest.raises(UsageError, match=r"holds the source's disk"):
                await launch_local_target(
                    spec.qmp_socket,
                    tmp_path / "src",
                    copy_disks={str(spec.disks[0].path): DiskImage("raw", MIB)},
                )
            assert sorted(p.name for p in (tmp_path / "src").iterdir()) == before
            with pytest.raises(UsageError, match=r"no writable disk image"):
                await launch_local_target(
                    spec.qmp_socket, tmp_path / "dst", copy_disks={"/x.raw": DiskImage("raw", MIB)}
                )
            assert not (tmp_path / "dst").exists()
