"""Whether a migration may start, decided from what both QEMUs said: pure, no I/O, no clock.

The ``connect`` script (:mod:`livemig.fsm.script`) asks each QEMU what it is — run state, RAM,
version, machine, migration, jobs, block graph, disks, capabilities — into one :class:`QemuView`
per side, and :func:`precheck` decides: it raises :class:`PrecheckError` naming the first thing
that would make the migration wrong (nothing has been touched yet), or answers with the
:class:`Verdict`: the disks the run moves, each copied or shared. Every rule is here, in the
order an operator would fix them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping

import attrs

from livemig.drivers.block import BlockDevice, BlockNode
from livemig.drivers.formats import COPIED_FORMATS
from livemig.drivers.jobs import JobInfo
from livemig.drivers.migration import MigrationStats
from livemig.drivers.runstate import GuestDevice, QemuVersion, RunStatus
from livemig.drivers.status import RunState
from livemig.fsm.machine import StorageChoice, StorageMode, Transfer, TransferChoice
from livemig.fsm.plan import DiskNames, Plan
from livemig.transports.errors import PrecheckError

__all__ = ["REQUIRED_CAPABILITIES", "Disk", "QemuView", "Verdict", "precheck", "same_path"]

#: What each side must offer. Without ``events`` no ``MIGRATION`` event is sent (every wait
#: for a status would never end); without ``pause-before-switchover`` the source does not stop
#: for the mirror to be completed while the guest is paused.
REQUIRED_CAPABILITIES = {
    "source": ("events", "pause-before-switchover"),
    "target": ("events",),
}

SameFile = Callable[[str, str], bool]

#: Image formats QEMU re-reads when a QEMU takes an image over from another: only these can be
#: shared (others are blockers of live migration, and a stateful stop refuses them shared).
SHARED_FORMATS = ("raw", "qcow2")


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
    #: Its machine's devices (``qom-list``); empty when not asked.
    devices: tuple[GuestDevice, ...] = ()
    #: Its migration parameters (``query-migrate-parameters``); empty when not asked.
    parameters: Mapping[str, object] = attrs.field(factory=dict)

    def node(self, name: str) -> BlockNode | None:
        return next((n for n in self.nodes if n.node_name == name), None)


@attrs.frozen
class Disk:
    """One disk the run moves: its node on each side (the two may differ: ``-drive`` nodes
    are auto-named), whether it is copied, and what the base copy needs to know."""

    #: How it is reported: its guest device's id, else its BlockBackend's name, else its node.
    name: str
    source_node: str
    target_node: str
    #: Copied to the target (overlay, base copy, mirror); ``False``: the target opens the same
    #: image (shared storage).
    copied: bool
    #: The source image (filename, format driver).
    base_image: tuple[str, str]
    base_size: int
    target_image: str
    #: Bytes the source image and the target image take on their hosts (``None``: unknown).
    base_allocated: int | None = None
    target_allocated: int | None = None
    #: What the run creates for it (copied disks only).
    names: DiskNames | None = None

    def created(self) -> DiskNames:
        """The names of what the run creates for this copied disk."""
        if self.names is None:
            raise ValueError(f"disk {self.name!r} is not copied")
        return self.names


@attrs.frozen
class Verdict:
    """What :func:`precheck` decided: the disks to move (in the source's device order) and the
    route they make."""

    disks: tuple[Disk, ...]
    #: How the guest's state moves.
    transfer: Transfer = Transfer.LIVE
    #: Why a stateful stop was chosen when the plan did not ask for one (``None``: it did, or
    #: the migration is live).
    fallback: str | None = None
    #: A stateful stop past migration blockers: the state is saved in mode ``cpr-reboot``,
    #: which QEMU's blockers of live migration do not stop.
    cpr_reboot: bool = False
    #: What the operator should know (not a reason to refuse).
    notes: tuple[str, ...] = ()

    @property
    def copied(self) -> tuple[Disk, ...]:
        return tuple(d for d in self.disks if d.copied)

    @property
    def storage(self) -> StorageMode:
        return StorageMode.NON_SHARED if self.copied else StorageMode.SHARED


def resolve_disk(view: QemuView, name: str, side: str) -> BlockDevice:
    """The disk ``name`` names: its top node, its BlockBackend (``-drive …,id=``) or its guest
    device.

    :raise PrecheckError: when no disk there has that name.
    """
    for disk in view.disks:
        if disk.node_name is not None and disk.named(name):
            return disk
    what = "a block node but no disk's top node" if view.node(name) is not None else "no disk"
    raise PrecheckError(
        f"the {side} has {what} {name!r} (--disk: a disk's block node, its -drive id or its "
        "device id)"
    )


def precheck(
    plan: Plan, source: QemuView, target: QemuView, *, same_file: SameFile = same_path
) -> Verdict:
    """Decide whether ``plan`` may start on these two QEMUs, and which disks it moves how.

    The transfer: live when it can be; a stateful stop when the plan asks for one or (plan
    ``auto``) when live transfer is impossible: the source has migration blockers, or lacks a
    capability only the live route needs.

    :raise PrecheckError: naming what is wrong.
    """
    _check_guests(source, target)
    live_problem = _live_problem(source)
    transfer, fallback = Transfer.LIVE, None
    if plan.transfer is TransferChoice.STATEFUL_STOP:
        transfer = Transfer.STATEFUL_STOP
    elif live_problem is not None:
        if plan.transfer is TransferChoice.LIVE:
            raise PrecheckError(f"{live_problem} (--mode stateful-stop pauses it instead)")
        transfer, fallback = Transfer.STATEFUL_STOP, live_problem
    try:
        _check_devices(source, target)
        verdict = _check_disks(plan, source, target, same_file, transfer)
        cpr_reboot = False
        if transfer is Transfer.STATEFUL_STOP:
            cpr_reboot = _check_stateful(plan, source, target)
        else:
            _check_capabilities("target", target, REQUIRED_CAPABILITIES["target"])
    except PrecheckError as err:
        if fallback is None:
            raise
        raise PrecheckError(f"{fallback}; nor can a stateful stop be done: {err}") from err
    notes: tuple[str, ...] = ()
    if blocked := target.migration.blocked_reasons:
        notes = (f"the target QEMU will not migrate this guest live again: {'; '.join(blocked)}",)
    return attrs.evolve(
        verdict, transfer=transfer, fallback=fallback, cpr_reboot=cpr_reboot, notes=notes
    )


#: What a stateful stop needs of each side: ``events`` (the saves and loads end in events).
STATEFUL_CAPABILITIES = ("events",)


def _live_problem(source: QemuView) -> str | None:
    """Why the source cannot migrate the guest live (``None``: it can)."""
    if blocked := source.migration.blocked_reasons:
        return f"the source QEMU cannot migrate this guest: {'; '.join(blocked)}"
    if missing := [c for c in REQUIRED_CAPABILITIES["source"] if c not in source.capabilities]:
        return f"the source QEMU lacks migration capabilities {missing}"
    return None


def _check_capabilities(side: str, view: QemuView, wanted: tuple[str, ...]) -> None:
    if missing := [c for c in wanted if c not in view.capabilities]:
        raise PrecheckError(f"the {side} QEMU lacks migration capabilities {missing}")


def _check_stateful(plan: Plan, source: QemuView, target: QemuView) -> bool:
    """What a stateful stop needs; whether it must save in mode ``cpr-reboot`` (the source has
    blockers of live migration, which that mode is not stopped by)."""
    if plan.remote is not None:
        raise PrecheckError(
            "a stateful stop to another host is not supported yet: the target reads the saved "
            "state from this host's work dir"
        )
    for side, view in (("source", source), ("target", target)):
        _check_capabilities(side, view, STATEFUL_CAPABILITIES)
    if not source.migration.blocked_reasons:
        return False
    lacking = [
        side for side, v in (("source", source), ("target", target)) if "mode" not in v.parameters
    ]
    if lacking:
        raise PrecheckError(
            f"saving the state past the blockers needs migration mode cpr-reboot (QEMU 8.2 or "
            f"later), which the {' and the '.join(lacking)} QEMU lacks"
        )
    return True


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
    if source.jobs:
        raise PrecheckError("the source has block jobs running; wait for them to end")


def _check_devices(source: QemuView, target: QemuView) -> None:
    """The target must have every device the source has (by id and type; the ones without an
    id, by type and count): the migration stream holds each one's state, and a target without
    it fails to load it, after the whole RAM was sent."""
    there = {(d.name, d.type) for d in target.devices if not d.anonymous}
    missing = [str(d) for d in source.devices if not d.anonymous and (d.name, d.type) not in there]
    anonymous = Counter(d.type for d in target.devices if d.anonymous)
    for kind, count in Counter(d.type for d in source.devices if d.anonymous).items():
        if (short := count - anonymous[kind]) > 0:
            missing.append(f"{short} x {kind} (no id)")
    if missing:
        raise PrecheckError(
            f"the target lacks devices the source has: {', '.join(missing)}; start it with the "
            "same devices"
        )


def _disk_name(disk: BlockDevice) -> str:
    return disk.device_id or disk.backend or disk.node_name or disk.qdev


def _counterpart(disk: BlockDevice, target: QemuView, named: str | None) -> BlockDevice:
    """The target's disk for the source's ``disk``: the one on the same guest device, else
    (for a disk named on the command line) the one of that name."""
    for there in target.disks:
        if there.qdev == disk.qdev:
            return there
    if named is not None:
        return resolve_disk(target, named, "target")
    raise PrecheckError(
        f"the target has no disk for {disk.qdev} (the source's {_disk_name(disk)}, "
        f"{disk.filename}): start it with the same devices"
    )


def _check_disks(
    plan: Plan, source: QemuView, target: QemuView, same_file: SameFile, transfer: Transfer
) -> Verdict:
    """Every disk of the source, in device order: read-only media must be on the target too
    (never copied), empty drives are skipped, writable disks are moved — copied or shared as
    ``plan.storage`` says — and a writable disk ``plan.disks`` leaves out must be shared."""
    chosen: dict[str, str] = {}  # source top node -> the name it was chosen by
    for name in plan.disks:
        disk = resolve_disk(source, name, "source")
        if not disk.writable:
            raise PrecheckError(
                f"disk {name!r} is read-only media ({disk.filename}): it is not copied, the "
                "target opens its own"
            )
        assert disk.node_name is not None
        if disk.node_name in chosen:
            raise PrecheckError(f"{chosen[disk.node_name]!r} and {name!r} name one disk")
        chosen[disk.node_name] = name
    moved: list[Disk] = []
    for disk in source.disks:
        if disk.node_name is None:
            continue  # an empty drive: nothing to move
        named = chosen.get(disk.node_name)
        there = _counterpart(disk, target, named)
        label = named or _disk_name(disk)
        if not disk.writable:
            if there.node_name is None:
                raise PrecheckError(
                    f"the target's {_disk_name(there)} has no medium; the source's holds "
                    f"{disk.filename} (read-only media are not copied: insert it there)"
                )
            continue
        if there.node_name is None:
            raise PrecheckError(
                f"the target's {_disk_name(there)} has no medium for the source's disk "
                f"{label!r} ({disk.filename})"
            )
        move = _check_disk(
            plan,
            label,
            disk,
            there,
            source=source,
            target=target,
            same_file=same_file,
            transfer=transfer,
        )
        if plan.disks and named is None and move.copied:
            raise _left_out(plan, move)
        moved.append(move)  # a disk --disk left out moves too: shared (and reported so)
    copied = 0
    for i, move in enumerate(moved):
        if move.copied:
            moved[i] = attrs.evolve(move, names=plan.names(copied))
            copied += 1
    for move in moved:
        if move.names is None:
            continue
        for leftover in (move.names.overlay_node, move.names.nbd_node):
            if source.node(leftover) is not None:
                raise PrecheckError(f"the source already has a node named {leftover!r}")
    return Verdict(tuple(moved))


def _check_disk(
    plan: Plan,
    name: str,
    disk: BlockDevice,
    there: BlockDevice,
    *,
    source: QemuView,
    target: QemuView,
    same_file: SameFile,
    transfer: Transfer,
) -> Disk:
    assert disk.node_name is not None
    assert there.node_name is not None
    src, dst = source.node(disk.node_name), target.node(there.node_name)
    if src is None or dst is None:  # a disk's top node that the block graph does not list
        raise PrecheckError(f"disk {name!r} has no block node QEMU describes")
    if src.virtual_size != dst.virtual_size:
        raise PrecheckError(
            f"disk {name!r} sizes differ: source {src.virtual_size}, target {dst.virtual_size}"
        )
    one_file = same_file(src.filename, dst.filename)
    if plan.storage is StorageChoice.SHARED and not one_file:
        raise PrecheckError(
            f"storage is shared but the disks are different images ({src.filename} and "
            f"{dst.filename}); use --storage non-shared or auto"
        )
    if plan.storage is StorageChoice.NON_SHARED and one_file:
        raise PrecheckError(
            f"storage is non-shared but both QEMUs open {src.filename}; use --storage shared "
            "or auto"
        )
    if not one_file and src.driver not in COPIED_FORMATS:
        raise PrecheckError(
            f"disk {name!r} is {src.driver}; livemig copies {', '.join(COPIED_FORMATS)} images"
        )
    if one_file and transfer is Transfer.STATEFUL_STOP and src.driver not in SHARED_FORMATS:
        # The target opened the image at its start: a format QEMU cannot re-read on taking it
        # over (live migration's blockers name them) would serve it stale metadata.
        raise PrecheckError(
            f"disk {name!r} is a {src.driver} image both QEMUs open: the target would not see "
            f"the source's last writes to its metadata; copy it (--storage non-shared)"
        )
    return Disk(
        name=name,
        source_node=disk.node_name,
        target_node=there.node_name,
        copied=not one_file,
        base_image=(src.filename, src.driver),
        base_size=src.virtual_size,
        target_image=dst.filename,
        base_allocated=_chain_allocated(source, src),
        target_allocated=dst.allocated_bytes,
    )


def _chain_allocated(view: QemuView, top: BlockNode) -> int | None:
    """Bytes the image ``top`` and its backing chain take on the host (what the base copy
    reads, flattened); ``None`` when QEMU does not tell for one of them."""
    total, node, seen = 0, top, set()
    while True:
        if node.allocated_bytes is None:
            return None
        total += node.allocated_bytes
        if node.backing_file is None or node.backing_file in seen:
            return total
        seen.add(node.backing_file)
        below = next(
            (n for n in view.nodes if n.filename == node.backing_file and n.driver != "file"),
            None,
        )
        if below is None:
            return total
        node = below


def _left_out(plan: Plan, disk: Disk) -> PrecheckError:
    """A writable disk ``--disk`` leaves out is not copied: it must be shared, or the guest
    would come up on the target with that disk's writes lost."""
    source, target = disk.base_image[0], disk.target_image
    if plan.storage is StorageChoice.NON_SHARED:
        return PrecheckError(
            f"the source has a writable disk {disk.name!r} ({source}) that --disk leaves out "
            "and livemig would not copy; name it too, or detach it or make it read-only"
        )
    return PrecheckError(
        f"disk {disk.name!r} is left out by --disk but is not shared: {source} on the "
        f"source, {target} on the target"
    )
