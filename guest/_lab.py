"""A migration lab: the test guest running on a source QEMU, a target QEMU waiting for it, and
the checks that prove a migration (or a revert) lost nothing.

Used by ``livemig demo``, the real-QEMU tests and the benchmark. The checks are the safety
invariants: exactly one QEMU runs the guest and it is running; its heartbeat continues (no
reboot); every disk record the guest acknowledged is on the surviving disk after a clean
shutdown; nothing is left behind.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

from livemig.drivers import block, image, jobs, nbd, runstate
from livemig.drivers.image import ImageFormat
from livemig.drivers.process import QemuProcess, VmSpec, find_qemu_processes, launched
from livemig.drivers.qmp import open_monitor
from livemig.guest._build import GuestImage
from livemig.guest._console import Heartbeat, SerialConsole
from livemig.guest._realistic import RealisticImages, make_realistic_images, realistic_vm_spec
from livemig.guest._records import DiskImage, RecordReport, verify_disks, verify_records
from livemig.guest._spec import guest_vm_spec

__all__ = ["Lab", "Storage", "Verdict", "migration_lab", "realistic_migration_lab"]

Storage = Literal["shared", "non-shared"]


@attrs.define(eq=False)
class Lab:
    """Both QEMUs of one migration, with their consoles being read."""

    work_dir: Path
    storage: Storage
    source: QemuProcess
    target: QemuProcess
    source_console: SerialConsole
    target_console: SerialConsole
    source_disk: Path
    target_disk: Path
    boot_id: int
    #: Block nodes each side had before the migration (what a clean run leaves).
    source_nodes: frozenset[str] = frozenset()
    target_nodes: frozenset[str] = frozenset()
    #: Every disk the guest writes, on each side, when it writes several (the realistic VM);
    #: empty: the one raw disk ``source_disk``/``target_disk``.
    source_disks: tuple[DiskImage, ...] = ()
    target_disks: tuple[DiskImage, ...] = ()
    #: The format of :attr:`source_disk` and :attr:`target_disk`.
    disk_format: ImageFormat = "raw"

    @property
    def copied_disks(self) -> int:
        """How many disks a non-shared migration of this lab copies."""
        return max(len(self.source_disks), 1) if self.storage == "non-shared" else 0

    @property
    def source_qmp(self) -> Path:
        return self.source.spec.qmp_socket

    @property
    def target_qmp(self) -> Path:
        return self.target.spec.qmp_socket

    def heartbeats(self) -> list[Heartbeat]:
        """Every heartbeat either console saw, in seq order."""
        both = list(self.source_console.heartbeats) + list(self.target_console.heartbeats)
        return sorted(both, key=lambda h: h.seq)

    async def verify(self, *, expect: Literal["source", "target"]) -> Verdict:
        """Check every invariant with the guest expected on ``expect``, then shut it down.

        Call once the migration has ended. Afterwards both QEMUs have exited.
        """
        problems: list[str] = []
        survivor, other = (
            (self.target, self.source) if expect == "target" else (self.source, self.target)
        )
        console = self.target_console if expect == "target" else self.source_console
        disk = self.target_disk if expect == "target" else self.source_disk
        nodes_before = self.target_nodes if expect == "target" else self.source_nodes

        with trio.move_on_after(10):
            await other.wait()
        if other.returncode is None:
            problems.append(f"the {_side(other, self)} QEMU still runs beside the guest")
        last_before = max((h.seq for h in self.heartbeats()), default=0)
        try:
            with trio.fail_after(15):
                await console.wait_heartbeat(last_before)
        except (trio.TooSlowError, Exception) as err:
            problems.append(f"no heartbeat after {last_before} on the {expect}: {err!r}")
        problems += await self._leftovers(survivor, nodes_before)
        gap_ms = _largest_gap_ms(self.heartbeats())

        await console.send_line("poweroff")
        with trio.fail_after(30):
            last_acked = await console.wait_poweroff()
            await survivor.wait()
        disks = self.target_disks if expect == "target" else self.source_disks
        if disks:
            report = await verify_disks(
                disks, boot_id=self.boot_id, acked=console.acked, slack=0, scratch_dir=self.work_dir
            )
            problems += report.problems()
            records = report.reports[0][1]
        else:
            records = await verify_records(
                disk, boot_id=self.boot_id, last_acked=last_acked, slack=0, fmt=self.disk_format
            )
            if not records.ok:
                problems.append(
                    f"{records.missing_count} acknowledged records missing: {records.notes}"
                )
        problems += _files_left(self.work_dir)
        if pids := find_qemu_processes(self.work_dir):
            problems.append(f"QEMU processes left: {pids}")
        return Verdict(
            survivor=expect,
            heartbeat_gap_ms=gap_ms,
            records=records,
            last_acked=last_acked,
            problems=tuple(problems),
        )

    async def _leftovers(self, survivor: QemuProcess, nodes_before: frozenset[str]) -> list[str]:
        problems: list[str] = []
        async with open_monitor(survivor.spec.qmp_socket, name="check") as m:
            status = await runstate.query_status(m)
            if not status.running:
                problems.append(f"the guest is not running on the survivor ({status.status})")
            nodes = frozenset(
                n.node_name for n in await block.query_named_block_nodes(m) if n.node_name
            )
            if extra := nodes - nodes_before:
                problems.append(f"block nodes left: {sorted(extra)}")
            if left := await jobs.query_jobs(m):
                problems.append(f"block jobs left: {[j.id for j in left]}")
            if exports := await nbd.query_block_exports(m):
                problems.append(f"NBD exports left: {[e.id for e in exports]}")
        return problems


def _side(process: QemuProcess, lab: Lab) -> str:
    return "source" if process is lab.source else "target"


def _largest_gap_ms(beats: Iterable[Heartbeat]) -> float:
    """The longest time between two consecutive heartbeats, as the host read them."""
    gaps = [(b.at - a.at) * 1000 for a, b in itertools.pairwise(beats)]
    return max(gaps, default=0.0)


def _files_left(work_dir: Path) -> list[str]:
    left = sorted(p.name for p in work_dir.iterdir() if p.name.startswith("lm-"))
    return [f"files left in the work dir: {left}"] if left else []


@attrs.frozen
class Verdict:
    """What :meth:`Lab.verify` found. ``ok`` when every invariant held."""

    survivor: str
    heartbeat_gap_ms: float
    records: RecordReport
    last_acked: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@contextlib.asynccontextmanager
async def migration_lab(
    guest_image: GuestImage,
    work_dir: Path,
    *,
    storage: Storage = "non-shared",
    memory_mib: int = 512,
    dirty_mib_s: int | Literal["max"] = 0,
    dirty_buf_mib: int = 64,
    accel: Literal["tcg", "kvm"] = "tcg",
    disk_bytes: int = 64 << 20,
    warm_up_heartbeats: int = 5,
    disk_format: ImageFormat = "raw",
) -> AsyncIterator[Lab]:
    """Boot the guest on a source QEMU and start a target QEMU for it (``-S -incoming defer``).

    The target has its own empty disk of the same size and format (non-shared) or opens the
    source's disk (shared). ``disk_format`` ``vdi`` (or ``vhdx``) gives the source a blocker of
    live migration, in QEMU's words. Needs a trio-asyncio loop (for QMP). Both QEMUs are
    stopped on the way out.
    """
    source_disk = work_dir / f"source.{disk_format}"
    target_disk = source_disk if storage == "shared" else work_dir / f"target.{disk_format}"
    await image.create(source_disk, disk_format, disk_bytes)
    if target_disk != source_disk:
        await image.create(target_disk, disk_format, disk_bytes)
    spec = guest_vm_spec(
        guest_image,
        disk=source_disk,
        disk_fmt=disk_format,
        qmp_socket=work_dir / "source.qmp",
        name="source",
        memory_mib=memory_mib,
        accel=accel,
        dirty_mib_s=dirty_mib_s,
        dirty_buf_mib=dirty_buf_mib,
    )
    target_spec = _target_spec(spec, target_disk, work_dir)
    async with _running_pair(spec, target_spec, work_dir, warm_up_heartbeats) as pair:
        yield Lab(
            work_dir=work_dir,
            storage=storage,
            **pair,
            source_disk=source_disk,
            target_disk=target_disk,
            disk_format=disk_format,
        )


@contextlib.asynccontextmanager
async def _running_pair(
    spec: VmSpec, target_spec: VmSpec, work_dir: Path, warm_up_heartbeats: int
) -> AsyncIterator[dict[str, Any]]:
    """Boot the source, start the target, read both consoles, and warm the guest up: the
    lab's fields that are the same for every guest."""
    async with (
        launched(spec, work_dir=work_dir) as source,
        trio.open_nursery() as nursery,
    ):
        source_console = SerialConsole.of(source)
        nursery.start_soon(source_console.run)
        boot_id = await source_console.wait_boot()
        async with launched(target_spec, work_dir=work_dir) as target:
            target_console = SerialConsole.of(target)
            nursery.start_soon(target_console.run)
            for _ in range(warm_up_heartbeats):
                await source_console.wait_heartbeat()
            yield {
                "source": source,
                "target": target,
                "source_console": source_console,
                "target_console": target_console,
                "boot_id": boot_id,
                "source_nodes": await _node_names(source),
                "target_nodes": await _node_names(target),
            }
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def realistic_migration_lab(
    guest_image: GuestImage,
    work_dir: Path,
    *,
    storage: Storage = "non-shared",
    syntax: Literal["blockdev", "drive"] = "blockdev",
    dirty_mib_s: int | Literal["max"] = 0,
    warm_up_heartbeats: int = 5,
) -> AsyncIterator[Lab]:
    """:func:`migration_lab` for the realistic VM (q35, 2 vCPUs, 1 GiB, a qcow2 root on a
    backing file, a raw data disk, a CD-ROM, a NIC, an RNG, a USB tablet): the target has its
    own empty images of the same sizes (non-shared: a plain qcow2 root, a raw data disk; the
    CD-ROM is the source's) or opens the source's (shared). The lab's disks are both writable
    disks, checked on the survivor (a target's flat root must show the source's whole chain)."""
    images = await make_realistic_images(work_dir / "source", depth=1)
    target_images = images
    if storage == "non-shared":
        (work_dir / "target").mkdir()
        target_images = attrs.evolve(
            images,
            root=work_dir / "target" / images.root.name,
            backing=(),
            data=work_dir / "target" / images.data.name,
        )
        await image.create(target_images.root, "qcow2", images.root_bytes)
        data_bytes = (await trio.Path(images.data).stat()).st_size
        await image.create(target_images.data, "raw", data_bytes)
    spec = realistic_vm_spec(
        guest_image,
        images,
        qmp_socket=work_dir / "source.qmp",
        name="source",
        syntax=syntax,
        dirty_mib_s=dirty_mib_s,
    )
    target_spec = realistic_vm_spec(
        guest_image,
        target_images,
        qmp_socket=work_dir / "target.qmp",
        name="target",
        syntax=syntax,
        dirty_mib_s=dirty_mib_s,
        incoming=True,
    )
    async with _running_pair(spec, target_spec, work_dir, warm_up_heartbeats) as pair:
        yield Lab(
            work_dir=work_dir,
            storage=storage,
            **pair,
            source_disk=images.root,
            target_disk=target_images.root,
            source_disks=images.disk_images(),
            target_disks=_markers_of(target_images, images),
        )


def _markers_of(images: RealisticImages, source: RealisticImages) -> tuple[DiskImage, ...]:
    return images.disk_images(markers_from=source)


def _target_spec(spec: VmSpec, disk: Path, work_dir: Path) -> VmSpec:
    target = spec.as_incoming(qmp_socket=work_dir / "target.qmp", name="target")
    disks = tuple(attrs.evolve(d, path=disk) for d in spec.disks)
    return attrs.evolve(target, disks=disks)


async def _node_names(qemu: QemuProcess) -> frozenset[str]:
    async with open_monitor(qemu.spec.qmp_socket, name=qemu.spec.name) as m:
        return frozenset(n.node_name for n in await block.query_named_block_nodes(m) if n.node_name)
