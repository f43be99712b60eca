"""The prechecks as a pure function of what both QEMUs said: each rule, its message, and the
disks it moves, each copied or shared (``-drive`` names included). No QEMU, no I/O."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from support.views import DST, SRC, MiB, disk, node, view

from livemig.drivers.block import BlockDevice
from livemig.drivers.jobs import JobInfo
from livemig.drivers.migration import MigrationStats
from livemig.drivers.runstate import GuestDevice, QemuVersion, RunStatus
from livemig.drivers.status import JobStatus, MigrationStatus, RunState
from livemig.fsm.machine import StorageMode, Transfer
from livemig.fsm.plan import Plan
from livemig.fsm.prechecks import Disk, QemuView, precheck
from livemig.transports.errors import PrecheckError


def plan(storage: str = "non-shared", disks: tuple[str, ...] = (), transfer: str = "auto") -> Plan:
    return Plan.create(
        source_qmp="/s.qmp",
        target_qmp="/t.qmp",
        storage=storage,
        work_dir=Path("/w"),
        run_id="r1",
        disks=disks,
        transfer=transfer,
    )


def same_name(a: str, b: str) -> bool:
    return a == b


VDISK0 = "/machine/peripheral/vdisk0/virtio-backend"


def test_a_good_pair_passes_and_names_the_disk() -> None:
    p = plan()
    verdict = precheck(p, SRC, DST, same_file=same_name)
    assert verdict.disks == (
        Disk(
            "vda", "root", "root", True, ("/src.raw", "raw"), 64 * MiB, "/dst.raw", names=p.names(0)
        ),
    )
    assert verdict.storage is StorageMode.NON_SHARED
    shared = view("/src.raw", running=False)
    verdict = precheck(plan("shared"), SRC, shared, same_file=same_name)
    assert [(d.target_image, d.copied, d.names) for d in verdict.disks] == [
        ("/src.raw", False, None)
    ]
    assert verdict.storage is StorageMode.SHARED


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
            # A blocker of live migration, and no mode cpr-reboot to save past it.
            src(migration=MigrationStats(MigrationStatus.NONE, blocked_reasons=("no vvfat",))),
            "non-shared",
            "the source QEMU cannot migrate this guest: no vvfat; nor can a stateful stop be "
            "done: saving the state past the blockers needs migration mode cpr-reboot (QEMU 8.2 "
            "or later), which the source and the target QEMU lacks",
        ),
        (
            src(jobs=(JobInfo("j", "mirror", JobStatus.RUNNING, 0, 1, None),)),
            "non-shared",
            "block jobs running",
        ),
        (dst(nodes=(node("root", "/dst.raw", size=32 * MiB),)), "non-shared", "sizes differ"),
        (
            dst(nodes=(), disks=()),
            "non-shared",
            "the target has no disk for /machine/peripheral/vda",
        ),
        (lambda s, d: (s, view("/src.raw", running=False)), "non-shared", "both QEMUs open"),
        (lambda s, d: (s, d), "shared", "storage is shared but the disks are different images"),
        (
            src(nodes=(node("root", "/src.raw"), node("lm-r1-d0-overlay", "/o.qcow2"))),
            "non-shared",
            "already has a node named 'lm-r1-d0-overlay'",
        ),
        (src(nodes=(node("root", "/src.fat", driver="vvfat"),)), "non-shared", "is vvfat"),
        (
            src(disks=(disk("root", "/src.raw"), disk("data", "/data.raw", qdev="vdb"))),
            "non-shared",
            "the target has no disk for vdb (the source's vdb, /data.raw)",
        ),
        (
            src(capabilities={}),
            "non-shared",
            "the source QEMU lacks migration capabilities ['events', 'pause-before-switchover']; "
            "nor can a stateful stop be done: the source QEMU lacks migration capabilities "
            "['events']",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_each_rule_refuses_with_its_message(change: Change, storage: str, message: str) -> None:
    source, target = change(SRC, DST)
    with pytest.raises(PrecheckError, match=re.escape(message)):
        precheck(plan(storage), source, target, same_file=same_name)


def media(root: str) -> tuple[BlockDevice, ...]:
    return (
        disk("root", root),
        disk("cd", "/seed.iso", ro=True, qdev="cd0"),
        disk(None, None, ro=True, qdev="ide2-cd0"),
    )


def test_read_only_media_and_empty_drives_are_not_moved() -> None:
    source, target = (
        attrs.evolve(SRC, disks=media("/src.raw")),
        attrs.evolve(DST, disks=media("/dst.raw")),
    )
    assert [d.source_node for d in precheck(plan(), source, target, same_file=same_name).disks] == [
        "root"
    ]


def test_read_only_media_must_be_on_the_target() -> None:
    source = attrs.evolve(SRC, disks=media("/src.raw"))
    no_cd = attrs.evolve(
        DST, disks=(disk("root", "/dst.raw"), disk(None, None, ro=True, qdev="cd0"))
    )
    with pytest.raises(
        PrecheckError, match=r"the target's cd0 has no medium; the source's holds /seed.iso"
    ):
        precheck(plan(), source, no_cd, same_file=same_name)
    with pytest.raises(PrecheckError, match="is read-only media"):
        precheck(
            plan(disks=("cd",)),
            source,
            attrs.evolve(DST, disks=media("/dst.raw")),
            same_file=same_name,
        )


def two_disks(root: str, data: str, *, data_size: int = 64 * MiB) -> dict[str, Any]:
    return {
        "nodes": (node("root", root), node("data", data, size=data_size)),
        "disks": (disk("root", root), disk("data", data, qdev="vdb")),
    }


def test_every_disk_is_copied_each_with_its_own_names() -> None:
    p = plan()
    source = attrs.evolve(SRC, **two_disks("/src.raw", "/data.raw"))
    target = attrs.evolve(DST, **two_disks("/dst.raw", "/dst-data.raw"))
    verdict = precheck(p, source, target, same_file=same_name)
    assert [(d.name, d.source_node, d.target_image, d.names) for d in verdict.disks] == [
        ("vda", "root", "/dst.raw", p.names(0)),
        ("vdb", "data", "/dst-data.raw", p.names(1)),
    ]
    assert p.names(1).overlay_node == "lm-r1-d1-overlay"


def test_auto_copies_the_disks_the_target_does_not_share() -> None:
    source = attrs.evolve(SRC, **two_disks("/src.raw", "/data.raw"))
    target = attrs.evolve(DST, **two_disks("/dst.raw", "/data.raw"))
    verdict = precheck(plan("auto"), source, target, same_file=same_name)
    assert [(d.name, d.copied) for d in verdict.disks] == [("vda", True), ("vdb", False)]
    assert verdict.storage is StorageMode.NON_SHARED
    everything_shared = attrs.evolve(DST, **two_disks("/src.raw", "/data.raw"))
    verdict = precheck(plan("auto"), source, everything_shared, same_file=same_name)
    assert verdict.copied == ()
    assert verdict.storage is StorageMode.SHARED


@pytest.mark.parametrize(
    ("storage", "data_there", "message"),
    [
        ("non-shared", "/dst-data.raw", "writable disk 'vdb' (/data.raw) that --disk leaves out"),
        ("auto", "/dst-data.raw", "disk 'vdb' is left out by --disk but is not shared"),
        ("auto", "/data.raw", None),
    ],
)
def test_a_disk_left_out_must_be_shared(storage: str, data_there: str, message: str | None) -> None:
    source = attrs.evolve(SRC, **two_disks("/src.raw", "/data.raw"))
    target = attrs.evolve(DST, **two_disks("/dst.raw", data_there))
    if message is None:
        verdict = precheck(plan(storage, disks=("vda",)), source, target, same_file=same_name)
        assert [(d.name, d.copied) for d in verdict.disks] == [("vda", True), ("vdb", False)]
        return
    with pytest.raises(PrecheckError, match=re.escape(message)):
        precheck(plan(storage, disks=("vda",)), source, target, same_file=same_name)


def test_a_second_disk_of_another_size_is_refused() -> None:
    source = attrs.evolve(SRC, **two_disks("/src.raw", "/data.raw"))
    target = attrs.evolve(DST, **two_disks("/dst.raw", "/dst-data.raw", data_size=32 * MiB))
    with pytest.raises(
        PrecheckError, match="disk 'vdb' sizes differ: source 67108864, target 33554432"
    ):
        precheck(plan(), source, target, same_file=same_name)


def test_two_names_of_one_disk_are_refused() -> None:
    with pytest.raises(PrecheckError, match="'root' and 'vda' name one disk"):
        precheck(plan(disks=("root", "vda")), SRC, DST, same_file=same_name)


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

    (root,) = precheck(
        plan(disks=(name,)),
        drive_view("#block141", "/src.raw", running=True),
        drive_view("#block308", "/dst.raw", running=False),
        same_file=same_name,
    ).disks
    assert (root.source_node, root.target_node) == ("#block141", "#block308")


def test_a_target_without_a_device_the_source_has_is_refused() -> None:
    nic, rng = (
        GuestDevice("nic0", "virtio-net-pci"),
        GuestDevice("device[0]", "virtio-rng-pci", True),
    )
    source = attrs.evolve(SRC, devices=(nic, rng))
    assert precheck(plan(), source, attrs.evolve(DST, devices=(nic, rng)), same_file=same_name)
    with pytest.raises(
        PrecheckError, match=re.escape("lacks devices the source has: nic0 (virtio-net-pci)")
    ):
        precheck(plan(), source, attrs.evolve(DST, devices=(rng,)), same_file=same_name)
    with pytest.raises(PrecheckError, match=re.escape("1 x virtio-rng-pci (no id)")):
        precheck(plan(), source, attrs.evolve(DST, devices=(nic,)), same_file=same_name)
    renamed = GuestDevice("nic0", "e1000e")
    with pytest.raises(PrecheckError, match=re.escape("nic0 (virtio-net-pci)")):
        precheck(plan(), source, attrs.evolve(DST, devices=(renamed, rng)), same_file=same_name)


def test_a_disk_on_a_backing_chain_counts_the_whole_chain_as_its_base() -> None:
    """The base copy reads the guest-visible data through the chain: what it sends is the
    chain's allocated data, not the top image's alone."""
    top = attrs.evolve(
        node("root", "/root.qcow2", driver="qcow2"), backing_file="/base.raw", allocated_bytes=MiB
    )
    base = attrs.evolve(node("#block1", "/base.raw"), allocated_bytes=10 * MiB)
    base_file = attrs.evolve(node("#block2", "/base.raw", driver="file"), allocated_bytes=99 * MiB)
    source = attrs.evolve(SRC, nodes=(top, base, base_file), disks=(disk("root", "/root.qcow2"),))
    target = attrs.evolve(DST, nodes=(node("root", "/dst.qcow2", driver="qcow2"),))
    (root,) = precheck(plan(), source, target, same_file=same_name).disks
    assert root.base_allocated == 11 * MiB


BLOCKED = MigrationStats(MigrationStatus.NONE, blocked_reasons=("The vdi format does not",))
WITH_MODE = {"mode": "normal"}


def test_live_is_chosen_when_it_can_be_and_a_blocker_falls_back_to_a_stateful_stop() -> None:
    verdict = precheck(plan(), SRC, DST, same_file=same_name)
    assert (verdict.transfer, verdict.fallback, verdict.cpr_reboot) == (Transfer.LIVE, None, False)
    blocked = attrs.evolve(SRC, migration=BLOCKED, parameters=WITH_MODE)
    verdict = precheck(
        plan(), blocked, attrs.evolve(DST, parameters=WITH_MODE), same_file=same_name
    )
    assert verdict.transfer is Transfer.STATEFUL_STOP
    assert verdict.fallback == "the source QEMU cannot migrate this guest: The vdi format does not"
    assert verdict.cpr_reboot


def test_a_plan_for_live_refuses_what_only_a_stateful_stop_can_do() -> None:
    blocked = attrs.evolve(SRC, migration=BLOCKED, parameters=WITH_MODE)
    with pytest.raises(PrecheckError, match=r"cannot migrate this guest: .*--mode stateful-stop"):
        precheck(plan(transfer="live"), blocked, DST, same_file=same_name)
    no_pause = attrs.evolve(SRC, capabilities={"events": False})
    with pytest.raises(PrecheckError, match=r"lacks migration capabilities \['pause-before"):
        precheck(plan(transfer="live"), no_pause, DST, same_file=same_name)
    verdict = precheck(plan(), no_pause, DST, same_file=same_name)
    assert verdict.transfer is Transfer.STATEFUL_STOP
    assert verdict.fallback is not None
    assert "pause-before-switchover" in verdict.fallback
    assert not verdict.cpr_reboot


def test_a_forced_stateful_stop_needs_no_blocker_and_no_cpr_reboot() -> None:
    verdict = precheck(plan(transfer="stateful-stop"), SRC, DST, same_file=same_name)
    assert (verdict.transfer, verdict.fallback, verdict.cpr_reboot) == (
        Transfer.STATEFUL_STOP,
        None,
        False,
    )


def test_a_shared_image_of_a_format_that_blocks_live_migration_is_refused_for_a_stateful_stop() -> (
    None
):
    vdi = (node("root", "/src.vdi", driver="vdi"),)
    source = attrs.evolve(SRC, nodes=vdi, disks=(disk("root", "/src.vdi"),))
    target = attrs.evolve(DST, nodes=vdi, disks=(disk("root", "/src.vdi"),))
    with pytest.raises(PrecheckError, match="is a vdi image both QEMUs open"):
        precheck(plan("shared", transfer="stateful-stop"), source, target, same_file=same_name)


def test_a_copied_vdi_disk_is_copied_and_a_target_blocker_is_only_noted() -> None:
    source = attrs.evolve(
        SRC, nodes=(node("root", "/src.vdi", driver="vdi"),), disks=(disk("root", "/src.vdi"),)
    )
    target = attrs.evolve(DST, migration=BLOCKED)
    verdict = precheck(plan(transfer="stateful-stop"), source, target, same_file=same_name)
    assert verdict.disks[0].base_image == ("/src.vdi", "vdi")
    assert verdict.notes == (
        "the target QEMU will not migrate this guest live again: The vdi format does not",
    )
