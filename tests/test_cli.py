"""The CLI contract: exit codes, JSON lines, clear errors with nothing touched on bad input."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import attrs
import pytest
import trio
from support.guest_fixtures import guest_image_fixture  # noqa: F401 - provides "guest_image"
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401 - provides "aio_loop"

from livemig.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_REVERTED, EXIT_USAGE, main
from livemig.drivers import block, image, migration, runstate
from livemig.drivers.process import DiskSpec, QemuProcess, VmSpec, launched
from livemig.drivers.qmp import open_monitor
from livemig.guest import GuestImage
from livemig.guest._lab import migration_lab

LIVEMIG = [sys.executable, "-m", "livemig"]
#: What the second disk of :func:`pair` holds at the start (a copy must carry it over).
DATA_PATTERN = b"livemig data disk " * 4096


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LIVEMIG, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_usage_errors_exit_2_with_a_message(tmp_path: Path) -> None:
    missing = tmp_path / "nope.qmp"
    result = run_cli(
        "migrate", "--source-qmp", missing, "--target-qmp", missing, "--storage", "shared"
    )
    assert result.returncode == EXIT_USAGE
    assert "does not exist or is not a socket" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_cli(
        "migrate", "--source-qmp", missing, "--target-qmp", missing, "--storage", "ceph"
    )
    assert result.returncode == EXIT_USAGE
    assert "invalid choice: 'ceph'" in result.stderr

    assert main(["migrate", "--storage", "shared"]) == EXIT_USAGE
    assert main(["demo", "--dirty-mib-s", "lots", "--json"]) == EXIT_USAGE
    assert (
        main(
            [
                "migrate",
                "--source-qmp",
                "a",
                "--target-qmp",
                "b",
                "--storage",
                "shared",
                "--downtime-limit",
                "0",
            ]
        )
        == EXIT_USAGE
    )


def test_diagram_command_prints_the_machine(tmp_path: Path) -> None:
    result = run_cli("diagram", "--format", "mermaid")
    assert result.returncode == EXIT_OK
    assert "pre-switchover" in result.stdout
    out = tmp_path / "m.svg"
    assert run_cli("diagram", "-o", out).returncode == EXIT_OK
    assert out.read_text().lstrip().startswith("<?xml")


# --- prechecks against real QEMUs (no guest kernel needed: the firmware idles) -----------------


def bare(
    name: str,
    tmp: Path,
    disk: Path,
    *,
    memory: int = 128,
    incoming: bool = False,
    machine: str = "q35",
    extra: tuple[DiskSpec, ...] = (),
    args: tuple[str, ...] = (),
) -> VmSpec:
    return VmSpec(
        extra_args=args,
        name=name,
        qmp_socket=tmp / f"{name}.qmp",
        memory_mib=memory,
        machine=machine,
        disks=(DiskSpec(path=disk), *extra),
        serial="none",
        incoming="defer" if incoming else None,
        paused=incoming,
    )


@asynccontextmanager
async def pair(
    tmp: Path,
    *,
    shared: bool = False,
    target_memory: int = 128,
    incoming: bool = True,
    target_machine: str = "q35",
    data_disk: bool | None = None,
    target_data: Literal["same", "own", "none", "small"] = "same",
    source_blocker: bool = False,
    source_device: bool = False,
) -> AsyncIterator[tuple[QemuProcess, QemuProcess]]:
    """Two QEMUs; ``data_disk`` gives both a second disk ``vdb`` (``True``: writable), which
    the target opens as the same file (``target_data="same"``), as its own empty image of the
    same size (``"own"``) or a smaller one (``"small"``), or lacks (``"none"``);
    ``source_blocker`` gives the source a device QEMU cannot migrate (a read-write vvfat
    drive: QEMU lists it in ``query-migrate``'s ``blocked-reasons``); ``source_device`` gives
    the source a device the target lacks (a virtio-rng-pci ``rng0``)."""
    src_disk, dst_disk = tmp / "src.raw", tmp / ("src.raw" if shared else "dst.raw")
    await image.create(src_disk, "raw", 8 << 20)
    if not shared:
        await image.create(dst_disk, "raw", 8 << 20)
    extra: tuple[DiskSpec, ...] = ()
    blocker: tuple[str, ...] = ()
    if source_blocker:
        (tmp / "fat").mkdir()
        blocker = (
            "-drive", f"file=fat:rw:{tmp / 'fat'},format=vvfat,if=none,id=vv0",
            "-device", "virtio-blk-pci,drive=vv0",
        )  # fmt: skip
    target_extra: tuple[DiskSpec, ...] = ()
    if source_device:
        blocker += ("-device", "virtio-rng-pci,id=rng0")
    if data_disk is not None:
        await image.create(tmp / "data.raw", "raw", 4 << 20)
        with (tmp / "data.raw").open("r+b") as f:
            f.write(DATA_PATTERN)  # what a copy must carry over
        extra = (
            DiskSpec(
                path=tmp / "data.raw", node_name="data", device_id="vdb", read_only=not data_disk
            ),
        )
        target_extra = extra
        if target_data == "none":
            target_extra = ()
        elif target_data != "same":
            size = 4 << 20 if target_data == "own" else 2 << 20
            await image.create(tmp / "dst-data.raw", "raw", size)
            target_extra = (attrs.evolve(extra[0], path=tmp / "dst-data.raw"),)
    async with (
        launched(bare("src", tmp, src_disk, extra=extra, args=blocker), work_dir=tmp) as src,
        launched(
            bare(
                "dst",
                tmp,
                dst_disk,
                memory=target_memory,
                incoming=incoming,
                machine=target_machine,
                extra=target_extra,
            ),
            work_dir=tmp,
        ) as dst,
    ):
        yield src, dst


async def untouched(src: QemuProcess, dst: QemuProcess, *, target_status: str) -> None:
    """Both QEMUs run as before and the source's migration settings are QEMU's defaults."""
    async with open_monitor(src.spec.qmp_socket, name="src") as m:
        assert (await runstate.query_status(m)).running
        caps = await migration.query_capabilities(m)
        assert not caps["pause-before-switchover"]
        assert not caps["events"]
    async with open_monitor(dst.spec.qmp_socket, name="dst") as m:
        assert (await runstate.query_status(m)).status == target_status


async def cli(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*LIVEMIG, *map(str, args)], capture_stdout=True, capture_stderr=True, check=False
    )


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("setup", "storage", "message", "target_status"),
    [
        (
            {"shared": False},
            "shared",
            "storage is shared but the disks are different images",
            "inmigrate",
        ),
        ({"shared": True}, "non-shared", "storage is non-shared but both QEMUs open", "inmigrate"),
        (
            {"incoming": False},
            "non-shared",
            "target is not waiting for an incoming migration",
            "running",
        ),
        ({"target_memory": 256}, "non-shared", "RAM differs", "inmigrate"),
        ({"target_machine": "pc"}, "non-shared", "machine types differ", "inmigrate"),
        # QEMU's own migration blockers, in its words, before anything is touched.
        (
            {"source_blocker": True},
            "non-shared",
            "the source QEMU cannot migrate this guest: ",
            "inmigrate",
        ),
        # Every device the source has must be on the target.
        (
            {"source_device": True},
            "non-shared",
            "the target lacks devices the source has: rng0 (virtio-rng-pci)",
            "inmigrate",
        ),
        # Every disk the source has must be on the target, of the same size.
        (
            {"data_disk": True, "target_data": "none"},
            "non-shared",
            "the target lacks devices the source has: vdb (virtio-blk-pci)",
            "inmigrate",
        ),
        (
            {"data_disk": True, "target_data": "small"},
            "non-shared",
            "disk 'vdb' sizes differ: source 4194304, target 2097152",
            "inmigrate",
        ),
        (
            {"data_disk": False, "target_data": "none"},
            "non-shared",
            "the target lacks devices the source has: vdb (virtio-blk-pci)",
            "inmigrate",
        ),
    ],
)
async def test_bad_input_exits_2_and_touches_nothing(
    aio_loop: object,
    tmp_path: Path,
    setup: dict[str, Any],
    storage: str,
    message: str,
    target_status: str,
) -> None:
    with trio.fail_after(60):
        async with pair(tmp_path, **setup) as (src, dst):
            done = await cli(
                "migrate", "--source-qmp", src.spec.qmp_socket, "--target-qmp", dst.spec.qmp_socket,
                "--storage", storage, "--work-dir", tmp_path / "work",
            )  # fmt: skip
            assert done.returncode == EXIT_USAGE, done.stderr
            assert message in done.stdout.decode() + done.stderr.decode()
            assert b"Traceback" not in done.stderr
            await untouched(src, dst, target_status=target_status)
            assert not (tmp_path / "work").exists() or not list((tmp_path / "work").iterdir())


@pytest.mark.qemu
async def test_wrong_disk_node_exits_2(aio_loop: object, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with pair(tmp_path) as (src, dst):
            done = await cli(
                "migrate", "--source-qmp", src.spec.qmp_socket, "--target-qmp", dst.spec.qmp_socket,
                "--storage", "non-shared", "--disk", "vdb", "--json",
            )  # fmt: skip
            assert done.returncode == EXIT_USAGE
            result = json.loads(done.stdout.splitlines()[-1])
            assert result["event"] == "result"
            assert result["outcome"] == "refused"
            assert result["states"] == ["idle"]
            assert "the source has no disk 'vdb'" in result["error"]
            await untouched(src, dst, target_status="inmigrate")


@pytest.mark.qemu
async def test_a_read_only_second_disk_is_not_refused(aio_loop: object, tmp_path: Path) -> None:
    """Only writable disks livemig would not copy are refused: a read-only one (an installer
    ISO, a config drive) holds no writes to lose, and the target opens its own copy."""
    with trio.fail_after(120):
        async with pair(tmp_path, data_disk=False) as (src, dst):
            done = await cli(
                "migrate", "--source-qmp", src.spec.qmp_socket, "--target-qmp", dst.spec.qmp_socket,
                "--storage", "non-shared", "--work-dir", tmp_path / "work", "--json",
            )  # fmt: skip
            assert done.returncode == EXIT_OK, done.stdout.decode() + done.stderr.decode()
            result = json.loads(done.stdout.splitlines()[-1])
            assert result["outcome"] == "finalized"
            async with open_monitor(dst.spec.qmp_socket, name="dst") as m:
                assert (await runstate.query_status(m)).running


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("storage", "target_data", "data_storage"),
    [
        ("non-shared", "own", "non-shared"),
        ("auto", "own", "non-shared"),
        ("auto", "same", "shared"),
    ],
)
async def test_every_writable_disk_moves_copied_or_shared(
    aio_loop: object, tmp_path: Path, storage: str, target_data: Any, data_storage: str
) -> None:
    """A second writable disk is copied like the root (its own overlay, base copy and mirror)
    or, with ``auto`` and the target opening the same file, left shared; the result says which."""
    with trio.fail_after(120):
        async with pair(tmp_path, data_disk=True, target_data=target_data) as (src, dst):
            done = await cli(
                "migrate", "--source-qmp", src.spec.qmp_socket, "--target-qmp", dst.spec.qmp_socket,
                "--storage", storage, "--work-dir", tmp_path / "work", "--json",
            )  # fmt: skip
            assert done.returncode == EXIT_OK, done.stdout.decode() + done.stderr.decode()
            result = json.loads(done.stdout.splitlines()[-1])
            assert result["outcome"] == "finalized"
            by_name = {d["name"]: d for d in result["disks"]}
            assert by_name["vda"]["storage"] == "non-shared"
            assert by_name["vdb"]["storage"] == data_storage
            async with open_monitor(dst.spec.qmp_socket, name="dst") as m:
                assert (await runstate.query_status(m)).running
                nodes = {n.node_name for n in await block.query_named_block_nodes(m)}
                assert not [n for n in nodes if n and n.startswith("lm-")]
        data = tmp_path / ("dst-data.raw" if target_data == "own" else "data.raw")
        assert data.read_bytes()[: len(DATA_PATTERN)] == DATA_PATTERN
        assert not list((tmp_path / "work").glob("lm-*"))


def drive_vm(name: str, tmp: Path, disk: Path, *, incoming: bool, fmt: str = "raw") -> VmSpec:
    """A VM started the common way: ``-drive …,if=none,id=drive0`` and a virtio-blk device, so
    its nodes are auto-named (``#block123``) and differ between the two QEMUs."""
    return VmSpec(
        name=name,
        qmp_socket=tmp / f"{name}.qmp",
        memory_mib=128,
        serial="none",
        incoming="defer" if incoming else None,
        paused=incoming,
        extra_args=(
            "-drive", f"file={disk},format={fmt},if=none,id=drive0,cache=none,aio=threads",
            "-device", "virtio-blk-pci,drive=drive0,id=vdisk0",
        ),
    )  # fmt: skip


async def migrate_drive_vm(
    tmp: Path, src_disk: Path, dst_disk: Path, *, disk: str, fmt: str = "raw"
) -> None:
    """Migrate a ``-drive`` VM on ``src_disk`` to one on ``dst_disk`` with the CLI (non-shared),
    check it finalized and the target runs, then quit the target so its image can be read."""
    with trio.fail_after(120):
        async with (
            launched(drive_vm("src", tmp, src_disk, incoming=False, fmt=fmt), work_dir=tmp),
            launched(drive_vm("dst", tmp, dst_disk, incoming=True), work_dir=tmp) as dst,
        ):
            done = await cli(
                "migrate", "--source-qmp", tmp / "src.qmp", "--target-qmp", dst.spec.qmp_socket,
                "--storage", "non-shared", "--disk", disk, "--work-dir", tmp / "work", "--json",
            )  # fmt: skip
            assert done.returncode == EXIT_OK, done.stdout.decode() + done.stderr.decode()
            assert json.loads(done.stdout.splitlines()[-1])["outcome"] == "finalized"
            async with open_monitor(dst.spec.qmp_socket, name="dst") as m:
                assert (await runstate.query_status(m)).running
                await m.execute("quit")


async def same_images(src: Path, dst: Path, *src_fmt: str) -> None:
    """``qemu-img compare``: the guest-visible data of both is the same (``src`` read through
    its backing chain)."""
    fmt = ["-f", *src_fmt] if src_fmt else []
    argv = ["qemu-img", "compare", *fmt, "-F", "raw", str(src), str(dst)]
    same = await trio.run_process(argv, capture_stdout=True, check=False)
    assert same.returncode == 0, same.stdout.decode()


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["drive0", "vdisk0"])
async def test_a_drive_syntax_vm_is_migrated_by_its_drive_or_device_id(
    aio_loop: object, tmp_path: Path, name: str
) -> None:
    """``--disk`` names the disk by its ``-drive`` id or its device id; each side resolves it
    to its own auto-named node, and the target ends with the same bytes."""
    src_disk, dst_disk = tmp_path / "src.raw", tmp_path / "dst.raw"
    await image.create(src_disk, "raw", 8 << 20)
    await image.create(dst_disk, "raw", 8 << 20)
    with src_disk.open("r+b") as f:  # data the copy must carry, with a hole between
        f.write(bytes(range(256)) * 4096)
        f.seek(6 << 20)
        f.write(b"livemig" * 1000)
    await migrate_drive_vm(tmp_path, src_disk, dst_disk, disk=name)
    await same_images(src_disk, dst_disk, "raw")


async def qemu_io(image_file: Path, fmt: str, command: str) -> None:
    argv = ["qemu-io", "-f", fmt, "-c", command, str(image_file)]
    await trio.run_process(argv, capture_stdout=True)


@pytest.mark.qemu
async def test_a_qcow2_root_on_a_backing_chain_of_depth_two_arrives_whole(
    aio_loop: object, tmp_path: Path
) -> None:
    """raw base ← qcow2 ← qcow2 (the top is the guest's disk): the target, a plain raw image,
    gets the guest-visible data of the whole chain, flattened, and no overlay is left."""
    base, mid, top = tmp_path / "base.raw", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    dst_disk = tmp_path / "dst.raw"
    await image.create(base, "raw", 8 << 20)
    for image_file, backing, backing_fmt in ((mid, base, "raw"), (top, mid, "qcow2")):
        await trio.run_process(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", backing_fmt,
             str(image_file)]
        )  # fmt: skip
    await qemu_io(base, "raw", "write -P 0xaa 0 2M")
    await qemu_io(mid, "qcow2", "write -P 0xbb 1M 2M")
    await qemu_io(top, "qcow2", "write -P 0xcc 2M 1M")
    await image.create(dst_disk, "raw", 8 << 20)
    await migrate_drive_vm(tmp_path, top, dst_disk, disk="drive0", fmt="qcow2")
    await same_images(top, dst_disk)
    assert not list((tmp_path / "work").glob("*.qcow2"))


@pytest.mark.qemu
async def test_a_socket_that_does_not_speak_qmp_is_refused(
    aio_loop: object, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with pair(tmp_path) as (src, dst):
            silent = tmp_path / "silent.sock"
            listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await listener.bind(str(silent))
            listener.listen(4)
            with listener:
                started = trio.current_time()
                done = await cli(
                    "migrate", "--source-qmp", src.spec.qmp_socket, "--target-qmp", silent,
                    "--storage", "non-shared", "--json", "--work-dir", tmp_path / "work",
                )  # fmt: skip
                took = trio.current_time() - started
            assert done.returncode == EXIT_USAGE, done.stderr
            result = json.loads(done.stdout.splitlines()[-1])
            assert result["outcome"] == "refused"
            assert "gave no QMP greeting" in result["error"]
            assert b"Traceback" not in done.stderr
            assert took < 30  # the 5 s connect deadline, not a revert
            await untouched(src, dst, target_status="inmigrate")
            assert not list((tmp_path / "work").iterdir())


def _listening(path: Path) -> socket.socket:
    """A bound unix socket that never answers: there, but no monitor."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


def test_the_same_monitor_twice_is_refused(tmp_path: Path) -> None:
    with _listening(tmp_path / "one.qmp"):
        result = run_cli(
            "migrate", "--source-qmp", tmp_path / "one.qmp", "--target-qmp", tmp_path / "one.qmp",
            "--storage", "shared", "--work-dir", tmp_path / "work",
        )  # fmt: skip
    assert result.returncode == EXIT_USAGE
    assert "the source and target QMP sockets are the same" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "work").exists()


def test_a_work_dir_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with _listening(tmp_path / "a.qmp"), _listening(tmp_path / "b.qmp"):
        result = run_cli(
            "migrate", "--source-qmp", tmp_path / "a.qmp", "--target-qmp", tmp_path / "b.qmp",
            "--storage", "shared", "--work-dir", tmp_path / "file" / "work", "--json",
        )  # fmt: skip
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "cannot be created" in result.stderr
    assert "Traceback" not in result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["outcome"] == "refused"


# --- whole migrations through the CLI on the real guest ---------------------------------------


async def read_json_lines(
    stream: trio.abc.ReceiveStream, lines: list[dict[str, Any]], seen: trio.Event, state: str
) -> None:
    buffer = b""
    while chunk := await stream.receive_some():
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            obj = json.loads(raw)
            lines.append(obj)
            if obj.get("event") == "state" and obj.get("state") == state:
                seen.set()


async def migrate_via_cli(
    lab_args: dict[str, Any],
    guest_image: GuestImage,
    tmp_path: Path,
    extra: list[str],
    *,
    signal_in: str | None = None,
) -> tuple[int, list[dict[str, Any]], str]:
    lines: list[dict[str, Any]] = []
    async with migration_lab(guest_image, tmp_path, **lab_args) as lab:
        argv = [
            *LIVEMIG, "migrate", "--json", "--source-qmp", str(lab.source_qmp),
            "--target-qmp", str(lab.target_qmp), "--storage", lab.storage,
            "--work-dir", str(tmp_path), *extra,
        ]  # fmt: skip
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        assert process.stdout is not None
        seen = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_json_lines, process.stdout, lines, seen, signal_in or "")
            if signal_in is not None:
                await seen.wait()
                process.send_signal(signal.SIGINT)
            code = await process.wait()
        survivor: Literal["source", "target"] = "target" if code == EXIT_OK else "source"
        verdict = await lab.verify(expect=survivor)
    assert verdict.ok, verdict.problems
    return code, lines, survivor


@pytest.mark.qemu
async def test_cli_migrates_and_prints_json_lines(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        code, lines, _ = await migrate_via_cli({"dirty_mib_s": 20}, guest_image, tmp_path, [])
    assert code == EXIT_OK
    result = lines[-1]
    assert result["event"] == "result"
    assert result["outcome"] == "finalized"
    assert result["states"][-1] == "finalized"
    assert result["downtime_ms"] is not None
    assert result["total_ms"] > 0
    assert result["ram_bytes"] > 0
    assert result["disk_bytes"] is not None
    assert result["error"] is None
    assert [x["state"] for x in lines if x["event"] == "state"] == result["states"]


@pytest.mark.qemu
async def test_cli_reverts_at_the_switchover_deadline_exit_3(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path
) -> None:
    # 1 MiB/s cannot move 512 MiB of RAM in 2 s: the switchover deadline reverts the migration.
    extra = ["--max-bandwidth", "1", "--switchover-timeout", "2"]
    with trio.fail_after(120):
        code, lines, _ = await migrate_via_cli({"dirty_mib_s": 20}, guest_image, tmp_path, extra)
    assert code == EXIT_REVERTED
    result = lines[-1]
    assert result["outcome"] == "reverted"
    assert result["error_type"] == "DeadlineExceeded"
    assert result["failed_in"] == "state-transfer"


@pytest.mark.qemu
async def test_sigint_reverts_then_exits_130(
    guest_image: GuestImage, aio_loop: object, tmp_path: Path
) -> None:
    extra = ["--max-bandwidth", "1"]
    with trio.fail_after(120):
        code, lines, _ = await migrate_via_cli(
            {"dirty_mib_s": 20}, guest_image, tmp_path, extra, signal_in="state-transfer"
        )
    assert code == EXIT_INTERRUPTED
    result = lines[-1]
    assert result["outcome"] == "reverted"
    assert result["error_type"] == "Interrupted"
    assert any(x["event"] == "reverting" for x in lines)


def test_diagram_trace_draws_the_path_of_a_run(tmp_path: Path) -> None:
    report = tmp_path / "run.jsonl"
    lines = [
        {"event": "state", "state": "idle"},
        {
            "event": "result",
            "outcome": "reverted",
            "states": ["idle", "connected", "capabilities-set", "snapshotted", "reverted"],
            "failed_in": "snapshotted",
        },
    ]
    report.write_text("".join(json.dumps(x) + "\n" for x in lines))
    plain = run_cli("diagram", "--format", "dot")
    traced = run_cli("diagram", "--format", "dot", "--trace", report)
    assert traced.returncode == EXIT_OK, traced.stderr
    assert traced.stdout != plain.stdout
    assert "snapshotted" in traced.stdout

    report.write_text(json.dumps({"states": ["idle", "finalized"]}))
    bad = run_cli("diagram", "--trace", report)
    assert bad.returncode == EXIT_USAGE
    assert "not a path of the machine" in bad.stderr
    assert run_cli("diagram", "--trace", tmp_path / "missing.json").returncode == EXIT_USAGE
