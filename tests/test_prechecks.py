"""The prechecks as a pure function of what both QEMUs said: each rule, its message, and the root
disk it picks (``-drive`` names included). No QEMU, no I/O."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from support.views import DST, SRC, MiB, disk, node, view

from livemig.drivers.jobs import JobInfo
from livemig.drivers.migration import MigrationStats
from livemig.drivers.runstate import QemuVersion, RunStatus
from livemig.drivers.status import JobStatus, MigrationStatus, RunState
from livemig.fsm.plan import Plan
from livemig.fsm.prechecks import QemuView, RootDisk, precheck
from livemig.transports.errors import PrecheckError


def plan(storage: str = "non-shared", disk_node: str = "root") -> Plan:
    return Plan.create(
        source_qmp="/s.qmp",
        target_qmp="/t.qmp",
        storage=storage,
        work_dir=Path("/w"),
        run_id="r1",
        disk_node=disk_node,
    )


def same_name(a: str, b: str) -> bool:
    return a == b


VDISK0 = "/machine/peripheral/vdisk0/virtio-backend"


def test_a_good_pair_passes_and_names_the_root_disk() -> None:
    assert precheck(plan(), SRC, DST, same_file=same_name) == RootDisk(
        "root", "root", ("/src.raw", "raw"), 64 * MiB, "/dst.raw"
    )
    shared = view("/src.raw", running=False)
    assert precheck(plan("shared"), SRC, shared, same_file=same_name).target_image == "/src.raw"


Change = Callable[[QemuView, QemuView], tuple[QemuView, QemuView]]


def src(**changes: Any) -> Change:
    return lambda s, d: (attrs.evolve(s, **changes), d)


def dst(**changes: Any) -> Change:
    return lambda s, d: (s, attrs.evolve(d, **changes))


@pytest.mark.parametrize(
    ("change", "storage", "message"),
    [
        (
            src(status=RunStatus(RunState.PAUSED, False)),
            "non-shared",
            "source guest is not running",
        ),
        (dst(status=RunStatus(RunState.RUNNING, True)), "non-shared", "target is not waiting"),
        (dst(ram_bytes=256 * MiB), "non-shared", "RAM differs"),
        (dst(version=QemuVersion(9, 2, 0)), "non-shared", "QEMU major versions differ"),
        (dst(machine="pc-i440fx-10.0"), "non-shared", "machine types differ"),
        (
            src(migration=MigrationStats(MigrationStatus.ACTIVE)),
            "non-shared",
            "already has a migration in progress",
        ),
        (
            dst(migration=MigrationStats(MigrationStatus.NONE, blocked_reasons=("no vvfat",))),
            "non-shared",
            "the target QEMU cannot migrate this guest: no vvfat",
        ),
        (
            src(jobs=(JobInfo("j", "mirror", JobStatus.RUNNING, 0, 1, None),)),
            "non-shared",
            "block jobs running",
        ),
        (dst(nodes=(node("root", "/dst.raw", size=32 * MiB),)), "non-shared", "sizes differ"),
        (dst(nodes=(), disks=()), "non-shared", "the target has no disk 'root'"),
        (lambda s, d: (s, view("/src.raw", running=False)), "non-shared", "both QEMUs open"),
        (lambda s, d: (s, d), "shared", "storage is shared but the disks are different images"),
        (
            src(nodes=(node("root", "/src.raw"), node("lm-r1-overlay", "/o.qcow2"))),
            "non-shared",
            "already has a node named 'lm-r1-overlay'",
        ),
        (src(nodes=(node("root", "/src.vmdk", driver="vmdk"),)), "non-shared", "is vmdk"),
        (
            src(disks=(disk("root", "/src.raw"), disk("data", "/data.raw", qdev="vdb"))),
            "non-shared",
            "writable disks besides 'root' that livemig does not copy: data (/data.raw)",
        ),
        (
            src(capabilities={"events": False}),
            "non-shared",
            "the source QEMU lacks migration capabilities ['pause-before-switchover']",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_each_rule_refuses_with_its_message(change: Change, storage: str, message: str) -> None:
    source, target = change(SRC, DST)
    with pytest.raises(PrecheckError, match=re.escape(message)):
        precheck(plan(storage), source, target, same_file=same_name)


def test_read_only_and_empty_drives_are_not_other_disks() -> None:
    source = attrs.evolve(
        SRC,
        disks=(
            disk("root", "/src.raw"),
            disk("cd", "/seed.iso", ro=True, qdev="cd0"),
            disk(None, None, ro=True, qdev="ide2-cd0"),
        ),
    )
    assert precheck(plan(), source, DST, same_file=same_name).source_node == "root"


@pytest.mark.parametrize("name", ["drive0", "vdisk0"])
def test_a_drive_disk_is_found_by_drive_or_device_id_on_each_side(name: str) -> None:
    """``-drive`` nodes are auto-named, differently on each QEMU."""

    def drive_view(auto: str, filename: str, *, running: bool) -> QemuView:
        return view(
            filename,
            running=running,
            nodes=(node(auto, filename), node(auto + "f", filename, driver="file")),
            disks=(
                disk(
                    auto,
                    filename,
                    backend="drive0",
                    qdev="/machine/peripheral/vdisk0/virtio-backend",
                ),
            ),
        )

    root = precheck(
        plan(disk_node=name),
        drive_view("#block141", "/src.raw", running=True),
        drive_view("#block308", "/dst.raw", running=False),
        same_file=same_name,
    )
    assert (root.source_node, root.target_node) == ("#block141", "#block308")
