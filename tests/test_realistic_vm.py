"""The realistic VM (`livemig.guest.realistic_vm_spec`): its command line in both syntaxes, the
per-disk acknowledgements and checks, its images, and the real VM booted under TCG."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from support.guest_fixtures import (  # noqa: F401  (guest_image_fixture provides "guest_image")
    booted_realistic_vm,
    guest_image_fixture,
    require_qemu,
)
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401  (provides "aio_loop")

from livemig.drivers import migration, runstate
from livemig.drivers.process import DiskSpec, VmSpec, launched
from livemig.drivers.qmp import QMPConnection, open_monitor
from livemig.drivers.status import MigrationStatus
from livemig.guest import (
    LAYER_MARKER_BOOT_ID,
    RECORD_SIZE,
    DiskImage,
    GuestImage,
    Heartbeat,
    RealisticImages,
    Record,
    SerialConsole,
    Syntax,
    encode_record,
    kernel_cmdline,
    make_realistic_images,
    realistic_vm_spec,
    verify_disks,
)
from livemig.transports.errors import UsageError

BOOT = 0x0BAD_CAFE_0000_0001
FAKE_IMAGE = GuestImage(Path("/k/vmlinux"), Path("/k/initrd.img"), "linux-image-x 1")
FAKE_IMAGES = RealisticImages(
    root=Path("/i/root.qcow2"),
    backing=(Path("/i/backing-1.qcow2"), Path("/i/base.raw")),
    data=Path("/i/data.raw"),
    iso=Path("/i/cdrom.iso"),
)


def option(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` in ``argv``."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def fake_spec(**changes: Any) -> VmSpec:
    return realistic_vm_spec(FAKE_IMAGE, FAKE_IMAGES, qmp_socket=Path("/r/q"), name="vm", **changes)


OTHER_DEVICES = [
    "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:6c:6d:01",
    "virtio-rng-pci,rng=objrng0,id=rng0",
    "qemu-xhci,id=usb",
    "usb-tablet,id=input0,bus=usb.0,port=1",
]


# --- the command line: pure ---------------------------------------------------------------------


def test_blockdev_argv() -> None:
    argv = fake_spec().argv()
    assert option(argv, "-machine") == ["q35"]
    assert (option(argv, "-m"), option(argv, "-smp")) == (["1024"], ["2"])
    assert (option(argv, "-kernel"), option(argv, "-initrd")) == (["/k/vmlinux"], ["/k/initrd.img"])
    assert option(argv, "-serial") == ["chardev:serial0"]
    assert "-no-reboot" in argv
    assert "-drive" not in argv
    assert option(argv, "-blockdev") == [
        "driver=file,filename=/i/root.qcow2,node-name=root-file,cache.direct=off",
        "driver=qcow2,node-name=root,file=root-file",
        "driver=file,filename=/i/data.raw,node-name=data-file,cache.direct=off",
        "driver=raw,node-name=data,file=data-file",
        "driver=file,filename=/i/cdrom.iso,node-name=cdrom-file,cache.direct=off,read-only=on",
        "driver=raw,node-name=cdrom,file=cdrom-file,read-only=on",
    ]
    assert option(argv, "-device") == [
        "virtio-blk-pci,drive=root,id=vda",
        "virtio-blk-pci,drive=data,id=vdb",
        "ide-cd,drive=cdrom,id=cd0",
        *OTHER_DEVICES,
    ]
    assert option(argv, "-netdev") == ["user,id=net0"]
    assert option(argv, "-object") == ["rng-random,id=objrng0,filename=/dev/urandom"]
    for absent in ("-S", "-incoming"):
        assert absent not in argv


def test_drive_argv() -> None:
    argv = fake_spec(syntax="drive").argv()
    assert "-blockdev" not in argv
    assert option(argv, "-drive") == [
        "file=/i/root.qcow2,if=none,id=drive0,format=qcow2",
        "file=/i/data.raw,if=none,id=drive1,format=raw",
        "file=/i/cdrom.iso,if=none,id=drive2,format=raw,media=cdrom,readonly=on",
    ]
    assert option(argv, "-device") == [
        "virtio-blk-pci,drive=drive0,id=vda",
        "virtio-blk-pci,drive=drive1,id=vdb",
        "ide-cd,drive=drive2,id=cd0",
        *OTHER_DEVICES,
    ]
    assert [d.drive for d in fake_spec(syntax="drive").disks] == ["drive0", "drive1", "drive2"]
    assert [d.drive for d in fake_spec().disks] == ["root", "data", "cdrom"]


def test_kernel_cmdline_names_both_disks() -> None:
    assert fake_spec().append.split() == [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        "mitigations=off",
        "livemig.tick_ms=20",
        "livemig.dirty_mib_s=0",
        "livemig.dirty_buf_mib=64",
        "livemig.disks=vda,vdb",
    ]
    default = kernel_cmdline(tick_ms=20, dirty_mib_s=0, dirty_buf_mib=64)
    assert "livemig.disks" not in default  # one disk: the guest's default, unchanged
    assert kernel_cmdline(tick_ms=20, dirty_mib_s=0, dirty_buf_mib=64, disks=["vda"]) == default
    assert kernel_cmdline(tick_ms=5, dirty_mib_s="max", dirty_buf_mib=0, disks=("vdb",)).endswith(
        "livemig.dirty_buf_mib=0 livemig.disks=vdb"
    )


@pytest.mark.parametrize("disks", [(), ("vda", "vda"), ("vd-b",), ("/dev/vda",), ("vda,vdb",)])
def test_kernel_cmdline_rejects_disk_names(disks: tuple[str, ...]) -> None:
    with pytest.raises(UsageError):
        kernel_cmdline(tick_ms=20, dirty_mib_s=0, dirty_buf_mib=64, disks=disks)


def test_incoming_spec_has_the_same_machine() -> None:
    source, target = fake_spec(), fake_spec(incoming=True)
    assert (target.incoming, target.paused) == ("defer", True)
    t_argv = target.argv()
    assert option(t_argv, "-incoming") == ["defer"]
    assert "-S" in t_argv
    assert [a for a in t_argv if a not in ("-S", "-incoming", "defer")] == source.argv()
    assert target == source.as_incoming(qmp_socket=source.qmp_socket, name=source.name)


@pytest.mark.parametrize(
    "bad",
    [{"syntax": "hda"}, {"dirty_mib_s": -1}, {"tick_ms": 0}, {"dirty_buf_mib": 1000}, {"cpus": 0}],
)
def test_realistic_vm_spec_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        fake_spec(**bad)


def test_disk_spec_cdrom_and_names() -> None:
    with pytest.raises(UsageError, match="read-only"):
        DiskSpec(path=Path("a.iso"), media="cdrom")
    with pytest.raises(UsageError):
        DiskSpec(path=Path("a"), syntax="ide")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        DiskSpec(path=Path("a"), media="floppy")  # type: ignore[arg-type]
    drive = DiskSpec(path=Path("a,b.raw"), syntax="drive", drive_id="d", device_id="x")
    assert drive.argv() == [
        "-drive",
        "file=a,,b.raw,if=none,id=d,format=raw",
        "-device",
        "virtio-blk-pci,drive=d,id=x",
    ]
    assert drive.block_names == ("d",)
    assert DiskSpec(path=Path("a")).block_names == ("root", "root-file")
    two_drive0 = [
        DiskSpec(path=Path("a"), syntax="drive", device_id="vda"),
        DiskSpec(path=Path("b"), syntax="drive", device_id="vdb"),
    ]
    with pytest.raises(UsageError, match="distinct"):
        VmSpec(name="vm", qmp_socket=Path("q"), disks=two_drive0)
    clash = [  # a -drive id is in the node names' namespace
        DiskSpec(path=Path("a"), device_id="vda"),
        DiskSpec(path=Path("b"), syntax="drive", drive_id="root", device_id="vdb"),
    ]
    with pytest.raises(UsageError, match="distinct"):
        VmSpec(name="vm", qmp_socket=Path("q"), disks=clash)


def test_layer_markers_and_disk_images() -> None:
    sectors = (32 << 20) // RECORD_SIZE
    assert FAKE_IMAGES.depth == 2
    assert FAKE_IMAGES.writable == (FAKE_IMAGES.root, FAKE_IMAGES.data)
    assert FAKE_IMAGES.layer_markers() == (
        (sectors - 1, Record(1, LAYER_MARKER_BOOT_ID)),  # base.raw
        (sectors - 1 - 128, Record(2, LAYER_MARKER_BOOT_ID)),  # backing-1.qcow2, next cluster
    )
    root, data = FAKE_IMAGES.disk_images()
    assert (root.name, root.path, root.fmt, root.fixed) == (
        "vda",
        FAKE_IMAGES.root,
        "qcow2",
        FAKE_IMAGES.layer_markers(),
    )
    assert (data.name, data.path, data.fmt, data.fixed) == ("vdb", FAKE_IMAGES.data, "raw", ())
    flat = attrs.evolve(FAKE_IMAGES, root=Path("/t/root.qcow2"), backing=())
    assert flat.disk_images()[0].fixed == ()
    target_root = flat.disk_images(markers_from=FAKE_IMAGES)[0]
    assert (target_root.path, target_root.fixed) == (Path("/t/root.qcow2"), root.fixed)


# --- per-disk acknowledgements ------------------------------------------------------------------


async def test_console_keeps_each_disks_acks(autojump_clock: trio.testing.MockClock) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    console = SerialConsole("vm", receive=receive)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(console.run)
            await send.send_all(b"boot 000000000000002a\r\nworkload disk vdb nsectors=8\r\n")
            assert await console.wait_boot() == 0x2A
            assert (console.disk_acks, console.acked("vdb")) == ({}, 0)
            await send.send_all(b"heartbeat 1 vda=1 vdb=1\r\nwerror 2 vdb: I/O error\r\n")
            await send.send_all(b"heartbeat 2 vda=2 vdb=1\r\n")
            beat = await console.wait_heartbeat(1)
            assert beat == Heartbeat(2, trio.current_time(), (("vda", 2), ("vdb", 1)))
            assert (console.acked("vda"), console.acked("vdb"), console.last_acked) == (2, 1, 2)
            await send.send_all(b"poweroff 3 vda=3 vdb=3\r\n")
            assert await console.wait_poweroff() == 3
            await send.aclose()
    assert console.disk_acks == {"vda": 3, "vdb": 3}
    with pytest.raises(UsageError, match="vdc"):
        console.acked("vdc")


async def test_console_of_one_disk_acks_it_under_any_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    console = SerialConsole("vm", receive=receive)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(console.run)
            await send.send_all(b"heartbeat 7\r\npoweroff 8\r\n")
            await console.wait_poweroff()
            await send.aclose()
    assert console.heartbeats[-1].acks == ()
    assert (console.acked("vda"), console.acked("anything"), console.disk_acks) == (8, 8, {})


def write_ring(path: Path, nsectors: int, seqs: range, boot_id: int = BOOT) -> None:
    """What the workload leaves on a disk of ``nsectors`` after writing ``seqs``."""
    disk = bytearray(nsectors * RECORD_SIZE)
    for seq in seqs:
        sector = seq % nsectors
        disk[sector * RECORD_SIZE : (sector + 1) * RECORD_SIZE] = encode_record(seq, boot_id)
    path.write_bytes(bytes(disk))


async def test_verify_disks_checks_each_disk_on_its_own(tmp_path: Path) -> None:
    vda, vdb = tmp_path / "a.raw", tmp_path / "b.raw"
    write_ring(vda, 64, range(1, 101))
    write_ring(vdb, 16, range(1, 91))  # its own seqs, its own size
    disks = (DiskImage("vda", vda), DiskImage("vdb", vdb))
    with trio.fail_after(5):
        report = await verify_disks(disks, boot_id=BOOT, acked={"vda": 100, "vdb": 90}, slack=0)
        assert report.ok, report.problems()
        assert (report["vda"].checked, report["vdb"].checked) == (64, 16)
        assert report["vdb"].first_seq == 75

        def acked(disk: str) -> int:
            return {"vda": 100, "vdb": 92}[disk]  # vdb acked two writes it does not hold

        report = await verify_disks(disks, boot_id=BOOT, acked=acked, slack=0)
        assert report["vda"].ok
        assert report["vdb"].missing == (91, 92)
        assert report.problems() == (f"vdb: {report['vdb'].summary()}",)
        assert "2 acknowledged records missing" in report.problems()[0]
        with pytest.raises(UsageError, match="vdb"):
            await verify_disks(disks, boot_id=BOOT, acked={"vda": 100})
    with pytest.raises(KeyError):
        report["vdc"]


async def test_verify_disks_fixed_records(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    write_ring(disk, 64, range(1, 11))
    with disk.open("r+b") as f:
        f.seek(63 * RECORD_SIZE)
        f.write(encode_record(1, LAYER_MARKER_BOOT_ID))
    fixed = ((63, Record(1, LAYER_MARKER_BOOT_ID)), (40, Record(2, LAYER_MARKER_BOOT_ID)))
    with trio.fail_after(5):
        report = await verify_disks(
            [DiskImage("vda", disk, fixed=fixed)], boot_id=BOOT, acked={"vda": 10}, slack=0
        )
        assert (report["vda"].fixed_checked, report.ok) == (2, False)
        assert report["vda"].fixed_missing == (
            f"sector 40: seq 2 of boot {LAYER_MARKER_BOOT_ID:016x} expected, holds zeros",
        )
        # Once the ring wrote a fixed record's sector, that record is not looked for.
        write_ring(disk, 64, range(1, 41))
        report = await verify_disks(
            [DiskImage("vda", disk, fixed=fixed)], boot_id=BOOT, acked={"vda": 40}, slack=0
        )
        assert report["vda"].fixed_checked == 1
        (missing,) = report["vda"].fixed_missing  # the marker at 63 went with the rewrite
        assert missing.startswith("sector 63:")


# --- images -------------------------------------------------------------------------------------


def require_iso_tool() -> None:
    if not any(shutil.which(t) for t in ("xorriso", "genisoimage", "mkisofs")):
        pytest.skip("no ISO 9660 tool (xorriso) is installed")


async def qemu_img_chain(path: Path) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain``: the image, then each backing file below it."""
    argv = ["qemu-img", "info", "--output=json", "--backing-chain", str(path)]
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
    chain: list[dict[str, Any]] = json.loads(result.stdout)
    return chain


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
async def test_make_realistic_images(tmp_path: Path, depth: int) -> None:
    require_qemu()
    require_iso_tool()
    with trio.fail_after(20):
        images = await make_realistic_images(tmp_path / "vm", depth=depth, prefix="x-")
        chain = await qemu_img_chain(images.root)
    assert [Path(layer["filename"]) for layer in chain] == [images.root, *images.backing]
    assert [layer["format"] for layer in chain] == ["qcow2"] * depth + ["raw" if depth else "qcow2"]
    assert {layer["virtual-size"] for layer in chain} == {32 << 20}
    assert [p.name for p in images.backing[-1:]] == (["x-base.raw"] if depth else [])
    assert images.data.stat().st_size == 64 << 20
    assert images.data.stat().st_blocks * 512 <= 64 << 10  # sparse
    assert images.iso.read_bytes()[0x8001:0x8006] == b"CD001"  # the ISO 9660 volume descriptor
    with trio.fail_after(20):
        report = await verify_disks(
            images.disk_images(), boot_id=BOOT, acked={"vda": 0, "vdb": 0}, scratch_dir=tmp_path
        )
    assert report.ok, report.problems()
    assert report["vda"].fixed_checked == depth  # every layer's marker reads through the root
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm"]  # the scratch copy is gone


async def test_verify_disks_reads_through_the_backing_chain(tmp_path: Path) -> None:
    require_qemu()
    require_iso_tool()
    with trio.fail_after(20):
        images = await make_realistic_images(tmp_path, depth=2)
        # Cut the chain under the root: the guest would no longer see the layers' data.
        rebase = ["qemu-img", "rebase", "-u", "-b", "", str(images.root)]
        await trio.run_process(rebase, capture_stdout=True, capture_stderr=True)
        report = await verify_disks(
            images.disk_images()[:1], boot_id=BOOT, acked={"vda": 0}, scratch_dir=tmp_path
        )
    assert not report.ok
    assert len(report["vda"].fixed_missing) == 2


async def test_make_realistic_images_rejects(tmp_path: Path) -> None:
    for bad in (
        {"depth": -1},
        {"root_bytes": 1000},
        {"data_bytes": 0},
        {"root_bytes": 64 << 10, "depth": 2},
    ):
        with pytest.raises(UsageError):
            await make_realistic_images(tmp_path, **bad)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# --- the real VM --------------------------------------------------------------------------------


def by_device(entries: list[dict[str, Any]]) -> Mapping[str, dict[str, Any]]:
    """``query-block`` entries by guest device id (``/machine/peripheral/vda/…`` → ``vda``)."""
    found = {}
    for entry in entries:
        qdev = entry.get("qdev", "")
        parts = qdev.split("/")
        found[parts[3] if qdev.startswith("/machine/peripheral/") else qdev] = entry
    return found


def backing_files(image_info: dict[str, Any]) -> Iterator[str]:
    """The file names down an image's backing chain (``query-block``'s ``backing-image``)."""
    below: dict[str, Any] | None = image_info.get("backing-image")
    while below is not None:
        yield below["filename"]
        below = below.get("backing-image")


async def migration_completed(monitor: QMPConnection) -> None:
    status = MigrationStatus.NONE
    while status is not MigrationStatus.COMPLETED:
        assert status is not MigrationStatus.FAILED
        await trio.sleep(0.05)
        status = (await migration.query_migrate(monitor)).status


@pytest.mark.qemu
@pytest.mark.parametrize(("syntax", "depth"), [("blockdev", 1), ("drive", 2)])
async def test_realistic_vm_boots_and_keeps_every_disk_write(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object, syntax: Syntax, depth: int
) -> None:
    with trio.fail_after(45):
        async with booted_realistic_vm(guest_image, tmp_path, syntax=syntax, depth=depth) as vm:
            console, images = vm.console, vm.images
            first = await console.wait_heartbeat(0)
            assert dict(first.acks).keys() == {"vda", "vdb"}
            async with open_monitor(vm.spec.qmp_socket, name="check") as m:
                blocks = by_device(await m.execute("query-block"))
                peripherals = {
                    p["name"] for p in await m.execute("qom-list", {"path": "/machine/peripheral"})
                }
                nodes = {n.get("node-name") for n in await m.execute("query-named-block-nodes")}
            await console.wait_heartbeat(first.seq + 10)
            await console.send_line("poweroff")
            await console.wait_poweroff()
            assert await vm.qemu.wait() == 0  # the guest powered the machine off

    assert blocks.keys() == {"vda", "vdb", "cd0"}, blocks
    root, data, cdrom = (blocks[d]["inserted"] for d in ("vda", "vdb", "cd0"))
    assert (root["drv"], root["ro"], root["file"]) == ("qcow2", False, str(images.root))
    assert list(backing_files(root["image"])) == [str(p) for p in images.backing]
    assert root["backing_file_depth"] == depth
    assert (data["drv"], data["ro"], data["file"]) == ("raw", False, str(images.data))
    assert (cdrom["drv"], cdrom["ro"], cdrom["file"]) == ("raw", True, str(images.iso))
    assert blocks["cd0"]["removable"]
    assert not blocks["vda"]["removable"]
    if syntax == "blockdev":
        assert (root["node-name"], data["node-name"], cdrom["node-name"]) == (
            "root",
            "data",
            "cdrom",
        )
        assert all(blocks[d]["device"] == "" for d in ("vda", "vdb", "cd0"))
    else:
        assert [blocks[d]["device"] for d in ("vda", "vdb", "cd0")] == [
            "drive0",
            "drive1",
            "drive2",
        ]
        assert not nodes & {"root", "data", "cdrom"}  # QEMU named every node itself
    assert {"vda", "vdb", "cd0", "nic0", "rng0", "usb", "input0"} <= peripherals

    acks = console.disk_acks
    assert acks["vda"] == acks["vdb"] == console.poweroff_seq
    assert acks["vda"] >= first.seq + 10
    with trio.fail_after(20):
        report = await verify_disks(
            images.disk_images(),
            boot_id=vm.boot_id,
            acked=console.acked,
            slack=0,
            scratch_dir=tmp_path,
        )
    assert report.ok, report.problems()
    assert (report["vda"].checked, report["vdb"].checked) == (acks["vda"], acks["vdb"])
    assert report["vda"].fixed_checked == depth


@pytest.mark.qemu
async def test_realistic_vm_migrates_on_shared_storage(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object
) -> None:
    """The device set migrates (plain QMP, both QEMUs on the same images): the guest goes on
    on the target and every write it acknowledged on either side is on both disks."""
    sock = tmp_path / "mig.sock"
    with trio.fail_after(50):
        async with booted_realistic_vm(guest_image, tmp_path, syntax="drive", name="src") as vm:
            target_spec = realistic_vm_spec(
                guest_image,
                vm.images,
                qmp_socket=tmp_path / "dst.qmp",
                name="dst",
                syntax="drive",
                incoming=True,
            )
            async with (
                launched(target_spec, work_dir=tmp_path) as target,
                trio.open_nursery() as nursery,
            ):
                target_console = SerialConsole.of(target)
                nursery.start_soon(target_console.run)
                await vm.console.wait_heartbeat(5)
                async with (
                    open_monitor(vm.spec.qmp_socket, name="src") as src,
                    open_monitor(target_spec.qmp_socket, name="dst") as dst,
                ):
                    await migration.migrate_incoming(dst, f"unix:{sock}")
                    await migration.set_parameters(src, {"max-bandwidth": 1 << 40})
                    await migration.migrate(src, f"unix:{sock}")
                    for side in (src, dst):
                        await migration_completed(side)
                    await runstate.cont(dst)
                source_last = vm.console.acked("vdb")
                await target_console.wait_heartbeat(vm.console.last_acked + 5)
                await vm.qemu.stop()
                await target_console.send_line("poweroff")
                await target_console.wait_poweroff()
                assert await target.wait() == 0
                nursery.cancel_scope.cancel()
    assert target_console.acked("vdb") > source_last
    assert target_console.boot_ids == []  # the same boot went on
    with trio.fail_after(20):
        report = await verify_disks(
            vm.images.disk_images(),
            boot_id=vm.boot_id,
            acked=target_console.acked,
            slack=0,
            scratch_dir=tmp_path,
        )
    assert report.ok, report.problems()
