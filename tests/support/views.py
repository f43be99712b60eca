"""What two QEMUs say about themselves at connect, as values for pure tests (prechecks,
scripts): a running source and an incoming target with one raw root disk each."""

from __future__ import annotations

from typing import Any

import attrs

from livemig.drivers.block import BlockDevice, BlockNode
from livemig.drivers.migration import MigrationStats
from livemig.drivers.runstate import QemuVersion, RunStatus
from livemig.drivers.status import MigrationStatus, RunState
from livemig.fsm.prechecks import QemuView

MiB = 1 << 20


def node(name: str, filename: str, driver: str = "raw", size: int = 64 * MiB) -> BlockNode:
    return BlockNode(name, driver, filename, None, False, True, size)


def disk(
    node_name: str | None, filename: str | None, *, ro: bool = False, **kw: str
) -> BlockDevice:
    return BlockDevice(
        qdev=kw.get("qdev", "/machine/peripheral/vda/virtio-backend"),
        node_name=node_name,
        filename=filename,
        read_only=ro,
        backend=kw.get("backend", ""),
    )


def view(filename: str, *, running: bool = True, **changes: Any) -> QemuView:
    status = RunStatus(RunState.RUNNING, True) if running else RunStatus(RunState.INMIGRATE, False)
    base = QemuView(
        status=status,
        ram_bytes=512 * MiB,
        version=QemuVersion(10, 0, 2),
        machine="pc-q35-10.0",
        migration=MigrationStats(MigrationStatus.NONE),
        jobs=(),
        nodes=(node("root", filename),),
        disks=(disk("root", filename),),
        capabilities={"events": False, "pause-before-switchover": False},
    )
    return attrs.evolve(base, **changes)


SRC, DST = view("/src.raw"), view("/dst.raw", running=False)
