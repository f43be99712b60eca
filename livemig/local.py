"""``livemig migrate --to local``: launch the target on this host from the source, then migrate.

Nobody writes a second QEMU command line: the source is asked what it runs
(`livemig.drivers.peer.describe_qemu`), the disks to copy are chosen from the plan (`copied_disks`,
pure), the target is derived and started detached (`livemig.drivers.launch`), and the migration
runs against it (`livemig.fsm.runner.migrate`). How it ends decides the target's fate:

- **finalized**: the target runs the guest and is left running, detached from livemig (a VM
  outlives the tool that moved it); the result's ``target`` names its QMP socket, pid, serial and
  images;
- **reverted** or **refused**: the target never ran the guest; it is stopped and its images and
  files are removed (the source runs on, untouched or restored);
- **failed**: the report says where the guest is; the target is left as it is for the operator
  (it may hold the only running copy), and named in the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio

from livemig.drivers.block import BlockDevice, BlockNode
from livemig.drivers.image import COPIED_FORMATS, ImageFormat
from livemig.drivers.launch import (
    DiskImage,
    LocalTarget,
    derive_local_target,
    start_local_target,
)
from livemig.drivers.peer import PeerQemu, describe_qemu, disk_files
from livemig.fsm.events import Event, MigrationResult, Outcome
from livemig.fsm.machine import StorageChoice
from livemig.fsm.plan import Plan
from livemig.fsm.runner import migrate
from livemig.transports.endpoints import UnixEndpoint
from livemig.transports.errors import LivemigError, UsageError

__all__ = ["copied_disks", "migrate_to_local"]


def copied_disks(
    devices: Sequence[BlockDevice],
    nodes: Sequence[BlockNode],
    *,
    storage: StorageChoice,
    disks: Sequence[str] = (),
) -> dict[str, DiskImage]:
    """The source images a local target gets its own copy of, with their format and size.

    On one host every file is open to both QEMUs, so what is shared is a choice: ``shared``
    copies nothing; ``non-shared`` and ``auto`` copy every writable disk, or only those ``disks``
    names (``auto`` then leaves the others shared: the LXD case of a local root disk beside a
    shared data volume; ``non-shared`` refuses them in the prechecks). Read-only media, empty
    drives and network images are never copied.

    :raise UsageError: for a copied disk livemig cannot copy (not raw or qcow2).
    """
    if storage is StorageChoice.SHARED:
        return {}
    local = set(disk_files(tuple(devices)))
    by_node = {n.node_name: n for n in nodes if n.node_name is not None}
    chosen: dict[str, DiskImage] = {}
    for device in devices:
        if device.filename not in local or device.node_name is None:
            continue
        if disks and not any(device.named(name) for name in disks):
            continue
        node = by_node.get(device.node_name)
        if node is None:
            raise UsageError(f"the source describes no block node for {device.filename}")
        if node.driver not in COPIED_FORMATS:
            raise UsageError(
                f"disk {device.filename} is {node.driver}; livemig copies "
                f"{', '.join(COPIED_FORMATS)} images"
            )
        fmt: ImageFormat = node.driver  # one of COPIED_FORMATS
        chosen[device.filename] = DiskImage(format=fmt, virtual_size=node.virtual_size)
    return chosen


async def migrate_to_local(
    plan: Plan,
    *,
    target_dir: Path,
    on_event: Callable[[Event], None] | None = None,
    interrupt: trio.Event | None = None,
) -> MigrationResult:
    """Launch a target for ``plan``'s source in ``target_dir`` and migrate to it.

    ``plan.target_qmp`` is replaced by the launched target's socket. Never raises for a
    migration fault (as :func:`~livemig.fsm.runner.migrate`); a launch that fails is reported as
    a refused run (nothing was touched on the source).

    :raise UsageError: for bad input found before anything was created.
    """
    source: PeerQemu = await describe_qemu(plan.source_qmp.path)
    copies = copied_disks(source.devices, source.nodes, storage=plan.storage, disks=plan.disks)
    launch = derive_local_target(
        source, source_qmp=plan.source_qmp.path, target_dir=target_dir, copy_disks=copies
    )
    try:
        target = await start_local_target(launch)
    except UsageError:
        raise
    except LivemigError as err:
        return _launch_failed(err)
    made = (target.directory,) if target.created_dir else ()
    plan = attrs.evolve(
        plan,
        target_qmp=UnixEndpoint(target.qmp),
        target_files=(*made, *target.files, *target.disks.values()),
    )
    try:
        result = await migrate(plan, on_event=on_event, interrupt=interrupt)
    except BaseException:
        with trio.CancelScope(shield=True):
            await _remove(target)
        raise
    if result.outcome in (Outcome.REVERTED, Outcome.REFUSED):
        with trio.CancelScope(shield=True):
            warning = await _remove(target)
        if warning is not None:
            return attrs.evolve(result, warnings=(*result.warnings, warning))
        return result
    return attrs.evolve(result, target=target.as_json())


async def _remove(target: LocalTarget) -> str | None:
    try:
        await target.remove()
    except LivemigError as err:
        return f"could not remove the launched target (pid {target.pid}): {err}"
    return None


def _launch_failed(err: LivemigError) -> MigrationResult:
    return MigrationResult(
        outcome=Outcome.REFUSED,
        states=("idle",),
        total_ms=0.0,
        error=f"the target could not be started: {err}",
        error_type=type(err).__name__,
        failed_in="idle",
    )
