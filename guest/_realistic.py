"""A realistic VM around the test guest: the devices a real VM has, cheap enough for TCG.

What the test guest alone lacks to look like a VM a user migrates: a q35 machine with 2 vCPUs
and 1 GiB of RAM, a qcow2 root disk on a backing chain, a raw data disk, a CD-ROM holding an ISO,
a network card, a random number generator and a USB tablet. The guest writes its records to both
writable disks (``livemig.disks=vda,vdb``) and loads no driver for the rest, so they cost no
boot time: they are there for QEMU (the command line, ``query-block``, the migration stream).

======  =======================  ====================  =============  ================  ========
guest   image                    ``-blockdev`` node    ``-drive`` id  device            id
======  =======================  ====================  =============  ================  ========
vda     ``root.qcow2`` on its    ``root``              ``drive0``     virtio-blk-pci    ``vda``
        backing chain
vdb     ``data.raw`` (sparse)    ``data``              ``drive1``     virtio-blk-pci    ``vdb``
—       ``cdrom.iso``            ``cdrom`` (read-only) ``drive2``     ide-cd (AHCI)     ``cd0``
======  =======================  ====================  =============  ================  ========

and ``-netdev user,id=net0`` with virtio-net-pci ``nic0``, virtio-rng-pci ``rng0`` (on
``/dev/urandom``), qemu-xhci ``usb`` with usb-tablet ``input0``. The backing chain is opened from
the qcow2 headers in both syntaxes, so its nodes get names QEMU makes up.

Host side::

    images = await make_realistic_images(tmp_path, depth=2)
    spec = realistic_vm_spec(image, images, qmp_socket=sock, name="vm", syntax="drive")
    async with launched(spec, work_dir=tmp_path) as qemu, trio.open_nursery() as nursery:
        console = SerialConsole.of(qemu)
        …
        await console.send_line("poweroff")
        await console.wait_poweroff()
        await qemu.wait()
    report = await verify_disks(
        images.disk_images(), boot_id=boot_id, acked=console.acked, slack=0, scratch_dir=tmp_path
    )
    assert report.ok, report.problems()
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import attrs
import trio

from livemig.drivers import image as qemu_img
from livemig.drivers.process import DiskSpec, VmSpec
from livemig.guest._build import GuestImage
from livemig.guest._records import RECORD_SIZE, DiskImage, Record, encode_record
from livemig.guest._spec import check_workload_settings, kernel_cmdline
from livemig.transports.errors import ToolError, UsageError

__all__ = [
    "CDROM_DEVICE",
    "DATA_DISK",
    "LAYER_MARKER_BOOT_ID",
    "REALISTIC_DEVICE_ARGS",
    "ROOT_DISK",
    "RealisticImages",
    "Syntax",
    "make_iso",
    "make_realistic_images",
    "realistic_vm_spec",
]

Syntax = Literal["blockdev", "drive"]

ROOT_DISK = "vda"  # the guest's name and the device id of the root disk
DATA_DISK = "vdb"
CDROM_DEVICE = "cd0"
DEFAULT_ROOT_BYTES = 32 << 20
DEFAULT_DATA_BYTES = 64 << 20
#: The boot id of the marker record in each layer of the root's backing chain ("LVMGBASE").
LAYER_MARKER_BOOT_ID = int.from_bytes(b"LVMGBASE", "big")
_CLUSTER_SECTORS = (64 << 10) // RECORD_SIZE  # one marker per qcow2 cluster (the default 64 KiB)
_ISO_TOOLS = ("xorriso", "genisoimage", "mkisofs")
_ISO_VOLUME = "LIVEMIG"

#: The devices beside the disks, the same on a source and its migration target.
REALISTIC_DEVICE_ARGS: tuple[str, ...] = (
    "-netdev", "user,id=net0",
    "-device", "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:6c:6d:01",
    "-object", "rng-random,id=objrng0,filename=/dev/urandom",
    "-device", "virtio-rng-pci,rng=objrng0,id=rng0",
    "-device", "qemu-xhci,id=usb",
    "-device", "usb-tablet,id=input0,bus=usb.0,port=1",
)  # fmt: skip


@attrs.frozen
class RealisticImages:
    """The images of a realistic VM, made by :func:`make_realistic_images`.

    :param root: the root disk (qcow2, the guest's ``vda``).
    :param backing: the root's backing chain, nearest first: ``backing[-1]`` is the raw base,
        the others are qcow2; empty for a root without backing file.
    :param data: the data disk (raw, sparse, the guest's ``vdb``).
    :param iso: the CD-ROM's ISO 9660 image (read-only to the VM).
    :param root_bytes: the root disk's virtual size.
    """

    root: Path
    backing: tuple[Path, ...]
    data: Path
    iso: Path
    root_bytes: int = DEFAULT_ROOT_BYTES

    @property
    def depth(self) -> int:
        """The length of the root's backing chain (1: qcow2 on a raw base)."""
        return len(self.backing)

    @property
    def writable(self) -> tuple[Path, Path]:
        """The images the guest writes to: the root and the data disk."""
        return (self.root, self.data)

    def layer_markers(self) -> tuple[tuple[int, Record], ...]:
        """The marker record each backing layer holds, as ``(sector, record)``: the layer
        ``backing[-1 - k]`` (``k = 0`` the raw base) holds seq ``k + 1`` of boot
        :data:`LAYER_MARKER_BOOT_ID` at the last sector of the ``k``-th cluster from the end.
        Read through the root, all of them must show: the guest-visible data is the chain's."""
        return tuple(_layer_marker(k, self.root_bytes) for k in range(self.depth))

    def disk_images(
        self, *, markers_from: RealisticImages | None = None
    ) -> tuple[DiskImage, DiskImage]:
        """The writable disks to check with :func:`~livemig.guest.verify_disks`, by the guest's
        names: the root (qcow2, with the layer markers) and the data disk (raw).

        :param markers_from: whose layer markers the root must show, when not its own: after a
            non-shared migration a target's flat root holds its source's whole chain.
        """
        markers = (markers_from if markers_from is not None else self).layer_markers()
        return (
            DiskImage(ROOT_DISK, self.root, "qcow2", fixed=markers),
            DiskImage(DATA_DISK, self.data, "raw"),
        )


async def make_realistic_images(
    directory: Path,
    *,
    depth: int = 1,
    root_bytes: int = DEFAULT_ROOT_BYTES,
    data_bytes: int = DEFAULT_DATA_BYTES,
    iso: Path | None = None,
    prefix: str = "",
) -> RealisticImages:
    """Create the images of a realistic VM in ``directory`` (created if missing).

    The root is ``root.qcow2`` on a backing chain ``depth`` long: 1 puts it on ``base.raw``, 2
    on ``backing-1.qcow2`` on ``base.raw``, and so on; 0 makes it a plain qcow2 (what a
    migration target starts with). Every backing layer holds a marker record
    (:meth:`RealisticImages.layer_markers`); backing files are recorded by absolute path. The
    data disk ``data.raw`` is sparse. The CD-ROM image ``cdrom.iso`` (one small text file, made
    with xorriso, genisoimage or mkisofs) is created unless ``iso`` names one to use, e.g. the
    source's for its target: a read-only medium can be shared. ``prefix`` goes before every file
    name, for two VMs in one directory.

    :raise UsageError: when a size is not a positive multiple of 64 KiB or the depth is negative
        or too deep for the root's size.
    :raise ToolError: when ``qemu-img``, ``qemu-io`` or the ISO tool fails or is missing.
    """
    if depth < 0:
        raise UsageError(f"depth must be at least 0, not {depth}")
    cluster = _CLUSTER_SECTORS * RECORD_SIZE
    for what, size in (("root_bytes", root_bytes), ("data_bytes", data_bytes)):
        if size < cluster or size % cluster:
            raise UsageError(f"{what} must be a positive multiple of {cluster}, not {size}")
    if depth * cluster > root_bytes:
        raise UsageError(f"a root of {root_bytes} bytes has no room for {depth} layer markers")
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)

    backing: list[Path] = []  # bottom up
    if depth:
        base = directory / f"{prefix}base.raw"
        await qemu_img.create(base, "raw", root_bytes)
        await trio.to_thread.run_sync(_put_record, base, *_layer_marker(0, root_bytes))
        backing.append(base)
    for k in range(1, depth):
        layer = directory / f"{prefix}backing-{k}.qcow2"
        below_fmt: qemu_img.ImageFormat = "raw" if k == 1 else "qcow2"
        await qemu_img.create(layer, "qcow2", None, backing=backing[-1], backing_fmt=below_fmt)
        await _qemu_io_write_record(layer, *_layer_marker(k, root_bytes))
        backing.append(layer)
    root = directory / f"{prefix}root.qcow2"
    if backing:
        top_fmt: qemu_img.ImageFormat = "raw" if depth == 1 else "qcow2"
        await qemu_img.create(root, "qcow2", None, backing=backing[-1], backing_fmt=top_fmt)
    else:
        await qemu_img.create(root, "qcow2", root_bytes)
    data = directory / f"{prefix}data.raw"
    await qemu_img.create(data, "raw", data_bytes)
    if iso is None:
        iso = directory / f"{prefix}cdrom.iso"
        await make_iso(iso)
    return RealisticImages(
        root=root, backing=tuple(reversed(backing)), data=data, iso=iso, root_bytes=root_bytes
    )


def _layer_marker(k: int, root_bytes: int) -> tuple[int, Record]:
    """The ``(sector, record)`` of the marker in the ``k``-th layer from the bottom."""
    return (
        root_bytes // RECORD_SIZE - 1 - k * _CLUSTER_SECTORS,
        Record(k + 1, LAYER_MARKER_BOOT_ID),
    )


def _put_record(path: Path, sector: int, record: Record) -> None:
    with path.open("r+b") as f:
        os.pwrite(f.fileno(), encode_record(record.seq, record.boot_id), sector * RECORD_SIZE)


async def _run_tool(argv: list[str], *, cwd: Path | None = None) -> None:
    try:
        result = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, cwd=cwd
        )
    except OSError as err:
        raise ToolError(argv, 127, f"cannot run {argv[0]}: {err}") from err
    if result.returncode != 0:
        raise ToolError(argv, result.returncode, result.stderr.decode(errors="replace"))


async def _qemu_io_write_record(layer: Path, sector: int, record: Record) -> None:
    """Write one record into a qcow2 layer itself (not into its backing file) with qemu-io.

    qemu-io splits its ``-c`` command at blanks, so the record goes through a file with a
    plain relative name in a directory of its own."""
    with tempfile.TemporaryDirectory(prefix="livemig-marker-") as tmp:
        (Path(tmp) / "record").write_bytes(encode_record(record.seq, record.boot_id))
        command = f"write -q -s record {sector * RECORD_SIZE} {RECORD_SIZE}"
        await _run_tool(["qemu-io", "-f", "qcow2", "-c", command, str(layer)], cwd=Path(tmp))


async def make_iso(path: Path) -> None:
    """Write a small ISO 9660 image (volume ``LIVEMIG``, one text file) to ``path``.

    :raise ToolError: when neither xorriso, genisoimage nor mkisofs is installed, or it fails.
    """
    tool = next((t for t in _ISO_TOOLS if shutil.which(t)), None)
    if tool is None:
        raise ToolError(
            list(_ISO_TOOLS), 127, "no ISO 9660 tool: install xorriso (scripts/setup.sh does)"
        )
    head = [tool, "-as", "mkisofs"] if tool == "xorriso" else [tool]
    with tempfile.TemporaryDirectory(prefix="livemig-iso-") as tmp:
        (Path(tmp) / "README.TXT").write_text("livemig test guest CD-ROM\n")
        await _run_tool([*head, "-quiet", "-R", "-V", _ISO_VOLUME, "-o", str(path), tmp])


def _disks(images: RealisticImages, syntax: Syntax) -> tuple[DiskSpec, ...]:
    if syntax not in ("blockdev", "drive"):
        raise UsageError(f"syntax must be 'blockdev' or 'drive', not {syntax!r}")
    return (
        DiskSpec(
            path=images.root,
            fmt="qcow2",
            node_name="root",
            drive_id="drive0",
            device_id=ROOT_DISK,
            syntax=syntax,
        ),
        DiskSpec(
            path=images.data,
            fmt="raw",
            node_name="data",
            drive_id="drive1",
            device_id=DATA_DISK,
            syntax=syntax,
        ),
        DiskSpec(
            path=images.iso,
            fmt="raw",
            node_name="cdrom",
            drive_id="drive2",
            device_id=CDROM_DEVICE,
            syntax=syntax,
            media="cdrom",
            read_only=True,
        ),
    )


def realistic_vm_spec(
    image: GuestImage,
    images: RealisticImages,
    *,
    qmp_socket: Path,
    name: str,
    syntax: Syntax = "blockdev",
    incoming: bool = False,
    memory_mib: int = 1024,
    cpus: int = 2,
    accel: Literal["tcg", "kvm"] = "tcg",
    dirty_mib_s: int | Literal["max"] = 0,
    dirty_buf_mib: int = 64,
    tick_ms: int = 20,
    extra_args: Sequence[str] = (),
) -> VmSpec:
    """The spec of a realistic VM (see the module's table) running the test guest on
    ``images``, its disks given with ``-blockdev`` or with ``-drive`` (``syntax``).

    As for :func:`~livemig.guest.guest_vm_spec`: the serial console is on stdio, ``-no-reboot``,
    direct kernel boot of ``image``; ``incoming=True`` gives a migration target's spec (``-S
    -incoming defer``), on its own ``images`` or on the source's (shared storage). The guest
    writes to ``vda`` and ``vdb``; its heartbeat is the root's. ``extra_args`` go last.

    :raise UsageError: when a setting is out of range or the syntax unknown.
    """
    check_workload_settings(
        memory_mib=memory_mib, dirty_mib_s=dirty_mib_s, dirty_buf_mib=dirty_buf_mib, tick_ms=tick_ms
    )
    return VmSpec(
        name=name,
        qmp_socket=qmp_socket,
        memory_mib=memory_mib,
        cpus=cpus,
        machine="q35",
        accel=accel,
        kernel=image.kernel,
        initrd=image.initrd,
        append=kernel_cmdline(
            tick_ms=tick_ms,
            dirty_mib_s=dirty_mib_s,
            dirty_buf_mib=dirty_buf_mib,
            disks=(ROOT_DISK, DATA_DISK),
        ),
        disks=_disks(images, syntax),
        no_reboot=True,
        incoming="defer" if incoming else None,
        paused=incoming,
        extra_args=(*REALISTIC_DEVICE_ARGS, *extra_args),
    )
