"""Whether a migration may start, decided from what both QEMUs said: pure, no I/O, no clock.

The ``connect`` script (:mod:`livemig.fsm.script`) asks each QEMU what it is — run state, RAM,
version, machine, migration, jobs, block graph, disks, capabilities — into one :class:`QemuView`
per side, and :func:`precheck` decides: it raises :class:`PrecheckError` naming the first thing
that would make the migration wrong (nothing has been touched yet), or answers with the
:class:`RootDisk` the run will move. Every rule is here, in the order an operator would fix them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import attrs

from livemig.drivers.block import BlockDevice, BlockNode
from livemig.drivers.jobs import JobInfo
from livemig.drivers.migration import MigrationStats
from livemig.drivers.runstate import QemuVersion, RunStatus
from livemig.drivers.status import RunState
from livemig.fsm.machine import StorageMode
from livemig.fsm.plan import Plan
from livemig.transports.errors import PrecheckError

__all__ = ["REQUIRED_CAPABILITIES", "QemuView", "RootDisk", "precheck", "same_path"]

#: What each side must offer. Without ``events`` no ``MIGRATION`` event is sent (every wait
#: for a status would never end); without ``pause-before-switchover`` the source does not stop
#: for the mirror to be completed while the guest is paused.
REQUIRED_CAPABILITIES = {
    "source": ("events", "pause-before-switchover"),
    "target": ("events",),
}

SameFile = Callable[[str, str], bool]


def same_path(a: str, b: str) -> bool:
    """Whether two QEMU filenames name one file (both QEMUs run on this host's view of it)."""
    return os.path.realpath(a) == os.path.realpath(b)


@attrs.frozen
class QemuView:
    """What one QEMU said about itself at connect."""

    status: RunStatus
    ram_bytes: int
    version: QemuVersion
    machine: str
    migration: MigrationStats
    jobs: tuple[JobInfo, ...]
    nodes: tuple[BlockNode, ...]
    disks: tuple[BlockDevice, ...]
    capabilities: Mapping[str, bool]

    def node(self, name: str) -> BlockNode | None:
        return next((n for n in self.nodes if n.node_name == name), None)


@attrs.frozen
class RootDisk:
    """The disk the run moves: its node on each side (the two may differ: ``-drive`` nodes
    are auto-named) and what the base copy needs to know."""

    source_node: str
    target_node: str
    #: The source image (filename, format driver).
    base_image: tuple[str, str]
    base_size: int
    target_image: str
    #: Bytes the source image and the target image take on their hosts (``None``: unknown).
    base_allocated: int | None = None
    target_allocated: int | None = None


def resolve_disk(view: QemuView, name: str, side: str) -> str:
    """The node the disk ``name`` runs on: ``name`` itself when it is a node, else the top node
    of the disk whose BlockBackend (``-drive …,id=``) or guest device has that name.

    :raise PrecheckError: when nothing there has that name.
    """
    if view.node(name) is not None:
        return name
    for disk in view.disks:
        if disk.node_name is not None and disk.named(name):
            return disk.node_name
    raise PrecheckError(
        f"the {side} has no disk {name!r} (--disk: a block node, a -drive id or a device id)"
    )


def precheck(
    plan: Plan, source: QemuView, target: QemuView, *, same_file: SameFile = same_path
) -> RootDisk:
    """Decide whether ``plan`` may start on these two QEMUs.

    :raise PrecheckError: naming what is wrong.
    """
    _check_guests(source, target)
    root = _check_root_disk(plan, source, target, same_file)
    _check_other_disks(plan, source, target, root, same_file)
    for side, view in (("source", source), ("target", target)):
        if missing := [c for c in REQUIRED_CAPABILITIES[side] if c not in view.capabilities]:
            raise PrecheckError(f"the {side} QEMU lacks migration capabilities {missing}")
    return root


def _check_guests(source: QemuView, target: QemuView) -> None:
    if not source.status.running:
        raise PrecheckError(f"source guest is not running (status {source.status.status})")
    if target.status.status is not RunState.INMIGRATE:
        raise PrecheckError(
            f"target is not waiting for an incoming migration (status {target.status.status}); "
            "start it with -incoming defer"
        )
    if source.ram_bytes != target.ram_bytes:
        raise PrecheckError(
            f"RAM differs: source {source.ram_bytes} bytes, target {target.ram_bytes} bytes"
        )
    if source.version.major != target.version.major:
        raise PrecheckError(
            f"QEMU major versions differ: source {source.version}, target {target.version}"
        )
    if source.machine != target.machine:
        raise PrecheckError(
            f"machine types differ: source {source.machine}, target {target.machine}"
        )
    if source.migration.status.in_progress:
        raise PrecheckError("the source already has a migration in progress")
    for side, view in (("source", source), ("target", target)):
        if blocked := view.migration.blocked_reasons:
            raise PrecheckError(f"the {side} QEMU cannot migrate this guest: {'; '.join(blocked)}")
    if source.jobs:
        raise PrecheckError("the source has block jobs running; wait for them to end")


def _check_root_disk(
    plan: Plan, source: QemuView, target: QemuView, same_file: SameFile
) -> RootDisk:
    name = plan.disk_node
    src_node = resolve_disk(source, name, "source")
    dst_node = resolve_disk(target, name, "target")
    src, dst = source.node(src_node), target.node(dst_node)
    if src is None or dst is None:  # a disk's top node that the block graph does not list
        raise PrecheckError(f"disk {name!r} has no block node QEMU describes")
    if src.virtual_size != dst.virtual_size:
        raise PrecheckError(
            f"disk {name!r} sizes differ: source {src.virtual_size}, target {dst.virtual_size}"
        )
    one_file = same_file(src.filename, dst.filename)
    if plan.storage is StorageMode.SHARED and not one_file:
        raise PrecheckError(
            f"storage is shared but the disks are different images ({src.filename} and "
            f"{dst.filename}); use --storage non-shared"
        )
    if plan.storage is StorageMode.NON_SHARED and one_file:
        raise PrecheckError(
            f"storage is non-shared but both QEMUs open {src.filename}; use --storage shared"
        )
    for leftover in (plan.overlay_node, plan.nbd_node):
        if source.node(leftover) is not None:
            raise PrecheckError(f"the source already has a node named {leftover!r}")
    if plan.storage is StorageMode.NON_SHARED and src.driver not in ("raw", "qcow2"):
        raise PrecheckError(f"disk {name!r} is {src.driver}; livemig copies raw and qcow2 images")
    return RootDisk(
        source_node=src_node,
        target_node=dst_node,
        base_image=(src.filename, src.driver),
        base_size=src.virtual_size,
        target_image=dst.filename,
        base_allocated=src.allocated_bytes,
        target_allocated=dst.allocated_bytes,
    )


def _check_other_disks(
    plan: Plan, source: QemuView, target: QemuView, root: RootDisk, same_file: SameFile
) -> None:
    """Refuse a VM with writable disks livemig would not carry over.

    Only ``--disk`` is copied (non-shared): any other writable disk would be left behind, and
    the guest would come up on the target with that disk's writes lost. With shared storage,
    the other disks are fine when the target opens the same files. Read-only media and empty
    drives do not count. ``query-block`` lists one entry per device, so the protocol and format
    nodes of one disk are one disk here.
    """
    others = [d for d in source.disks if d.writable and d.node_name != root.source_node]
    if not others:
        return
    if plan.storage is StorageMode.NON_SHARED:
        names = ", ".join(f"{d.node_name} ({d.filename})" for d in others)
        raise PrecheckError(
            f"the source has writable disks besides {plan.disk_node!r} that livemig does not "
            f"copy: {names}; detach them or make them read-only"
        )
    there_by_device = {d.qdev: d for d in target.disks}
    for disk in others:
        there = there_by_device.get(disk.qdev)
        if there is None or there.filename is None or disk.filename is None:
            raise PrecheckError(
                f"storage is shared but the target has no disk for {disk.qdev} "
                f"({disk.node_name}, {disk.filename})"
            )
        if not same_file(disk.filename, there.filename):
            raise PrecheckError(
                f"storage is shared but disk {disk.node_name!r} is {disk.filename} on the source "
                f"and {there.filename} on the target"
            )
