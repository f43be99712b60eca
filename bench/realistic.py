"""The realistic-VM scenario: ``livemig.guest``'s realistic VM with 1 GiB of allocated disk data.

The VM (``livemig.guest.realistic_vm_spec``): q35, 2 vCPUs, 1 GiB RAM, a qcow2 root (1 GiB
virtual) on a raw backing file, a raw data disk (1 GiB virtual), a CD-ROM, a NIC, an RNG and a
USB tablet. Its workload writes a record to both disks every 20 ms and acknowledges each on the
console (``heartbeat 17 vda=17 vdb=17``).

**Data.** Before the first run, once per bench invocation, the bench's work dir gets a cache
(:func:`ensure_cache`): the raw base under the root with :data:`FILL_BYTES` (512 MiB) of data and
the root's layer marker, the data disk with 512 MiB of data, the CD-ROM's ISO. The data is one
byte value per MiB, never zero, different on the two disks (:func:`fill_byte`); the rest of each
disk is a hole. Nothing on the way compresses or deduplicates, so it costs what any data does;
it makes the copy checkable: after every run the survivor's images must hold it
(:func:`check_fill`). Each run gets its own root (a fresh qcow2 over the cached base, which no
one writes: QEMU opens a backing file read-only) and its own copy of the data disk (``cp
--sparse=always``, fsynced before the boot: a snapshot's flush must not wait for the copy's
writeback).

**Consoles.** The serial console is a unix socket QEMU listens on (``-serial
unix:…,server=on,wait=off``), dialled by the bench; the source starts paused (``-S``) until its
console is connected. A target that livemig launches (``--to local``) gets a socket of the same
name in its target dir (``drivers/cmdline.py`` moves every listening socket there), which the
bench dials as soon as it appears, while the target still waits for the incoming migration.

**Invariants** (:func:`verify_survivor`), for every variant: the other QEMU has exited, the
survivor runs the guest with no block node, job or NBD export left, its heartbeat goes on (no
reboot), and after a clean ``poweroff`` every record the guest acknowledged on each disk is on
the survivor's images (``verify_disks``, exact), the root shows the backing file's layer marker,
and all the data of the fill is there; nothing is left in the work dir, no QEMU runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Literal

import attrs
import trio

from bench.model import CopiedDisk
from bench.scenarios import REALISTIC_DISK_BYTES, REALISTIC_FILL_BYTES, Scenario
from livemig.drivers import block, image, jobs, nbd, runstate
from livemig.drivers.process import QemuProcess, find_qemu_processes, launched
from livemig.drivers.qmp import open_monitor
from livemig.guest import (
    DiskImage,
    GuestImage,
    Heartbeat,
    RealisticImages,
    SerialConsole,
    make_realistic_images,
    realistic_vm_spec,
    verify_disks,
)
from livemig.guest._lab import Lab
from livemig.transports.errors import LivemigError

__all__ = [
    "AnyLab",
    "DialedConsole",
    "RealisticCache",
    "RealisticLab",
    "check_fill",
    "copied_disks",
    "data_bytes",
    "ensure_cache",
    "realistic_lab",
    "source_images",
    "verify_survivor",
]

FILL_BYTES = REALISTIC_FILL_BYTES
DISK_BYTES = REALISTIC_DISK_BYTES
_MIB = 1 << 20
_SERIAL = "serial.sock"
#: The disks' guest names and their -blockdev nodes (``livemig.guest._realistic``).
_NODES = {"vda": "root", "vdb": "data"}
_DIAL_INTERVAL_S = 0.01


def fill_byte(disk: str, mib: int) -> int:
    """The byte every byte of MiB ``mib`` of the fill holds on ``disk`` (``vda``: the root's
    base, ``vdb``: the data disk): never 0, not the same on the two disks."""
    offset = 0 if disk == "vda" else 128
    return (mib * 7 + offset) % 255 + 1


def _fill(path: Path, disk: str) -> None:
    with path.open("r+b") as f:
        for mib in range(FILL_BYTES // _MIB):
            os.pwrite(f.fileno(), bytes([fill_byte(disk, mib)]) * _MIB, mib * _MIB)
        os.fsync(f.fileno())


@attrs.frozen
class RealisticCache:
    """The images every realistic run shares or copies, made once by :func:`ensure_cache`.

    :param base: the raw base under every run's root (512 MiB of data, the layer marker).
    :param data: the data disk each run copies (512 MiB of data).
    :param iso: the CD-ROM (read-only, shared).
    """

    base: Path
    data: Path
    iso: Path


async def ensure_cache(directory: Path) -> RealisticCache:
    """Make the cache in ``directory`` unless it is there (a ``done`` file says it is)."""
    cache = RealisticCache(directory / "base.raw", directory / "data.raw", directory / "cdrom.iso")
    if (directory / "done").exists():
        return cache
    made = await make_realistic_images(
        directory, depth=1, root_bytes=DISK_BYTES, data_bytes=DISK_BYTES
    )
    assert made.backing == (cache.base,), made
    assert (made.data, made.iso) == (cache.data, cache.iso), made
    await trio.Path(made.root).unlink()
    await trio.to_thread.run_sync(_fill, cache.base, "vda")
    await trio.to_thread.run_sync(_fill, cache.data, "vdb")
    await trio.Path(directory / "done").write_text("")
    return cache


async def source_images(cache: RealisticCache, *, root: Path, data: Path) -> RealisticImages:
    """A run's source images: ``root`` a fresh qcow2 on the cached base, ``data`` a sparse copy
    of the cached data disk."""
    await image.create(root, "qcow2", None, backing=cache.base, backing_fmt="raw")
    await _run(["cp", "--sparse=always", str(cache.data), str(data)])
    # On disk before the guest boots: else the first flush of the data disk (every snapshot
    # flushes the image it freezes) waits for 512 MiB of writeback, a pause the copy made.
    await trio.to_thread.run_sync(_fsync, data)
    return RealisticImages(
        root=root, backing=(cache.base,), data=data, iso=cache.iso, root_bytes=DISK_BYTES
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def target_images(directory: Path, cache: RealisticCache) -> RealisticImages:
    """A pre-started target's images: a plain qcow2 root and a sparse raw data disk."""
    return await make_realistic_images(
        directory, depth=0, root_bytes=DISK_BYTES, data_bytes=DISK_BYTES, iso=cache.iso
    )


async def _run(argv: Sequence[str]) -> str:
    result = await trio.run_process(
        list(argv), capture_stdout=True, capture_stderr=True, check=False
    )
    if result.returncode != 0:
        err = (result.stdout + result.stderr).decode(errors="replace").strip()
        raise LivemigError(f"{argv[0]} failed ({result.returncode}): {err[-500:]}")
    return result.stdout.decode(errors="replace")


async def data_bytes(disk: CopiedDisk) -> int:
    """The data a copy of ``disk`` reads and sends (zeros skipped): a raw image's allocation
    (``actual-size``, as before); for a qcow2 image, every data extent of ``qemu-img map``,
    through its backing chain."""
    if disk.fmt == "raw":
        return (await image.info(disk.image)).actual_size
    out = await _run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", str(disk.image)])
    return sum(
        int(e["length"]) for e in json.loads(out) if e.get("data") and not e.get("zero", False)
    )


async def check_fill(disks: Sequence[DiskImage], *, ring_sectors: int) -> list[str]:
    """Whether every MiB of the fill is on each image (``qemu-io -r``, ``read -P``), but the
    first ones, which the workload's ring of ``ring_sectors`` records may have overwritten."""
    skip = -(-(ring_sectors + 1) * 512 // _MIB)
    problems: list[str] = []
    for disk in disks:
        commands: list[str] = []
        for mib in range(skip, FILL_BYTES // _MIB):
            commands += ["-c", f"read -q -P {fill_byte(disk.name, mib)} {mib}M 1M"]
        argv = ["qemu-io", "-r", "-f", disk.fmt, *commands, str(disk.path)]
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        text = (result.stdout + result.stderr).decode(errors="replace").strip()
        if result.returncode != 0 or text:
            lines = text.splitlines()
            problems.append(
                f"{disk.name}: the data copied is not all there ({len(lines)} MiB wrong; "
                f"{'; '.join(lines[:3])})"
            )
    return problems


# ---- consoles --------------------------------------------------------------------------------


def serial_option(path: Path) -> str:
    return f"unix:{path},server=on,wait=off"


@attrs.define(eq=False)
class DialedConsole:
    """A serial console QEMU listens on: dialled as soon as the socket accepts, then read."""

    name: str
    path: Path
    console: SerialConsole | None = None
    connected: trio.Event = attrs.field(factory=trio.Event)

    async def run(self) -> None:
        while True:
            try:
                stream = await trio.open_unix_socket(str(self.path))
            except OSError:
                await trio.sleep(_DIAL_INTERVAL_S)
                continue
            break
        self.console = SerialConsole(self.name, receive=stream, send=stream)
        self.connected.set()
        async with stream:
            await self.console.run()

    async def wait_console(self) -> SerialConsole:
        await self.connected.wait()
        assert self.console is not None
        return self.console

    @property
    def heartbeats(self) -> list[Heartbeat]:
        return list(self.console.heartbeats) if self.console else []


# ---- the lab ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class RealisticLab:
    """The realistic VM running on a source QEMU; a target waiting for it unless the variant
    launches its own (livemig ``--to local``)."""

    work_dir: Path
    images: RealisticImages
    source: QemuProcess
    source_console: SerialConsole
    boot_id: int
    source_nodes: frozenset[str]
    target: QemuProcess | None = None
    target_images: RealisticImages | None = None
    target_console: DialedConsole | None = None
    target_nodes: frozenset[str] = frozenset()
    storage: Literal["non-shared"] = "non-shared"

    @property
    def source_qmp(self) -> Path:
        return self.source.spec.qmp_socket

    @property
    def target_qmp(self) -> Path:
        if self.target is None:
            raise LivemigError("this lab has no target started beforehand")
        return self.target.spec.qmp_socket

    @property
    def copied(self) -> tuple[CopiedDisk, ...]:
        return (
            CopiedDisk("root", self.images.root, "qcow2"),
            CopiedDisk("data", self.images.data, "raw"),
        )


AnyLab = Lab | RealisticLab


def copied_disks(lab: AnyLab) -> tuple[CopiedDisk, ...]:
    """The disks a hand-driven variant copies: the test guest's one raw ``root``, or the
    realistic VM's qcow2 ``root`` (on its backing file) and raw ``data``."""
    if isinstance(lab, RealisticLab):
        return lab.copied
    return (CopiedDisk("root", lab.source_disk, "raw"),)


async def _named_nodes(qmp: Path) -> frozenset[str]:
    """Block nodes by the names given them (QEMU's own ``#block…`` names left out)."""
    async with open_monitor(qmp, name="nodes") as m:
        return frozenset(
            n.node_name
            for n in await block.query_named_block_nodes(m)
            if n.node_name and not n.node_name.startswith("#")
        )


@contextlib.asynccontextmanager
async def realistic_lab(
    guest: GuestImage,
    work: Path,
    scenario: Scenario,
    cache: RealisticCache,
    *,
    with_target: bool,
    warm_up_heartbeats: int = 5,
    wrapper: Sequence[str] = (),
) -> AsyncIterator[RealisticLab]:
    """Boot the realistic VM in ``work`` (and start its target, ``with_target``). Both QEMUs
    this starts are stopped on the way out. ``wrapper`` runs the source QEMU (``ip netns exec
    NAME``: a source on another "host"; the bench dials its console through the file system)."""
    images = await source_images(cache, root=work / "root.qcow2", data=work / "data.raw")
    spec = realistic_vm_spec(
        guest,
        images,
        qmp_socket=work / "source.qmp",
        name="source",
        memory_mib=scenario.memory_mib,
        dirty_mib_s=scenario.dirty_mib_s,
        dirty_buf_mib=scenario.dirty_buf_mib,
    )
    spec = attrs.evolve(spec, serial=serial_option(work / _SERIAL), paused=True)
    async with (
        launched(spec, work_dir=work, wrapper=wrapper) as source,
        trio.open_nursery() as nursery,
    ):
        dialed = DialedConsole("source", work / _SERIAL)
        nursery.start_soon(dialed.run)
        console = await dialed.wait_console()
        async with open_monitor(spec.qmp_socket, name="start") as m:
            await runstate.cont(m)
        boot_id = await console.wait_boot()
        lab = RealisticLab(
            work_dir=work,
            images=images,
            source=source,
            source_console=console,
            boot_id=boot_id,
            source_nodes=await _named_nodes(spec.qmp_socket),
        )
        if not with_target:
            for _ in range(warm_up_heartbeats):
                await console.wait_heartbeat()
            yield lab
            nursery.cancel_scope.cancel()
            return
        timages = await target_images(work / "target", cache)
        tspec = spec.as_incoming(qmp_socket=work / "target.qmp", name="target")
        tdisks = tuple(
            attrs.evolve(d, path=timages.root)
            if d.node_name == "root"
            else attrs.evolve(d, path=timages.data)
            if d.node_name == "data"
            else d
            for d in spec.disks
        )
        tspec = attrs.evolve(tspec, disks=tdisks, serial=serial_option(work / "target.serial"))
        async with launched(tspec, work_dir=work) as target:
            tconsole = DialedConsole("target", work / "target.serial")
            nursery.start_soon(tconsole.run)
            await tconsole.wait_console()
            for _ in range(warm_up_heartbeats):
                await console.wait_heartbeat()
            lab.target, lab.target_images, lab.target_console = target, timages, tconsole
            lab.target_nodes = await _named_nodes(tspec.qmp_socket)
            yield lab
        nursery.cancel_scope.cancel()


# ---- the invariants --------------------------------------------------------------------------


@attrs.frozen
class Survivor:
    """Where the guest is expected after a run: its monitor (``None``: not ours to open, as
    libvirt's), console, images and the block nodes it had before."""

    side: Literal["source", "target"]
    qmp: Path | None
    console: SerialConsole
    disks: tuple[DiskImage, ...]
    nodes_before: frozenset[str]


@attrs.frozen
class RealisticVerdict:
    problems: tuple[str, ...]
    records_checked: dict[str, int]
    markers_checked: int


async def verify_survivor(
    survivor: Survivor,
    *,
    boot_id: int,
    other_exited: trio.Event | None,
    survivor_exited: trio.Event,
    heartbeats: Sequence[Heartbeat],
    work_dir: Path,
    scratch_dir: Path,
) -> RealisticVerdict:
    """Check every invariant on ``survivor``, power the guest off and read its images.

    :param other_exited: set once the other QEMU exited (``None``: there is none to wait for).
    :param survivor_exited: set once the survivor's QEMU exited (after the ``poweroff``).
    :param heartbeats: every heartbeat seen so far, both consoles.
    """
    problems: list[str] = []
    if other_exited is not None:
        with trio.move_on_after(10):
            await other_exited.wait()
        if not other_exited.is_set():
            problems.append("the other QEMU still runs beside the guest")
    last_before = max((h.seq for h in heartbeats), default=0)
    console = survivor.console
    try:
        with trio.fail_after(15):
            await console.wait_heartbeat(last_before)
    except (trio.TooSlowError, LivemigError) as err:
        problems.append(f"no heartbeat after {last_before} on the {survivor.side}: {err!r}")
    if console.boot_ids and console.boot_ids[-1] != boot_id:
        problems.append(f"the guest rebooted on the {survivor.side}")
    try:
        if survivor.qmp is not None:
            await _check_monitor(survivor, problems)
    except LivemigError as err:
        problems.append(f"the {survivor.side}'s monitor: {err}")
    await console.send_line("poweroff")
    with trio.fail_after(30):
        await console.wait_poweroff()
        await survivor_exited.wait()
    report = await verify_disks(
        survivor.disks, boot_id=boot_id, acked=console.acked, slack=0, scratch_dir=scratch_dir
    )
    problems += report.problems()
    markers = report["vda"].fixed_checked
    if markers != 1:
        problems.append(f"vda: {markers} layer markers checked, not 1")
    ring = max(console.acked(d.name) for d in survivor.disks)
    problems += await check_fill(survivor.disks, ring_sectors=ring)
    files = await trio.to_thread.run_sync(lambda: sorted(p.name for p in work_dir.rglob("lm-*")))
    if files:
        problems.append(f"files left in the work dir: {files}")
    return RealisticVerdict(
        tuple(problems), {name: r.checked for name, r in report.reports}, markers
    )


async def _check_monitor(survivor: Survivor, problems: list[str]) -> None:
    assert survivor.qmp is not None
    async with open_monitor(survivor.qmp, name="check") as m:
        if not (await runstate.query_status(m)).running:
            problems.append(f"the guest is not running on the {survivor.side}")
        nodes = {
            n.node_name
            for n in await block.query_named_block_nodes(m)
            if n.node_name and not n.node_name.startswith("#")
        }
        if extra := nodes - survivor.nodes_before:
            problems.append(f"block nodes left: {sorted(extra)}")
        if left := await jobs.query_jobs(m):
            problems.append(f"block jobs left: {[j.id for j in left]}")
        if exports := await nbd.query_block_exports(m):
            problems.append(f"NBD exports left: {[e.id for e in exports]}")


def disks_on(images: RealisticImages, *, markers_from: RealisticImages) -> tuple[DiskImage, ...]:
    return images.disk_images(markers_from=markers_from)


def disks_at(source: RealisticImages, copies: dict[Path, Path]) -> tuple[DiskImage, ...]:
    """The source's disks at the paths a launched target got for them (flat qcow2 root)."""
    return tuple(attrs.evolve(d, path=copies.get(d.path, d.path)) for d in source.disk_images())


def exited_event(process: QemuProcess, nursery: trio.Nursery) -> trio.Event:
    """An event set once ``process`` (ours) exited."""
    done = trio.Event()

    async def wait() -> None:
        await process.wait()
        done.set()

    nursery.start_soon(wait)
    return done


def pid_exited_event(pid: int, nursery: trio.Nursery) -> trio.Event:
    """An event set once ``pid`` (not ours: no reaping, a pidfd) exited."""
    done = trio.Event()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        done.set()
        return done

    async def wait() -> None:
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        done.set()

    nursery.start_soon(wait)
    return done


def kill_qemus_under(directory: Path) -> list[int]:
    """SIGKILL every QEMU whose command line names ``directory`` (a launched target, not our
    child, is not stopped with the lab); returns their pids."""
    pids = find_qemu_processes(directory)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return pids
