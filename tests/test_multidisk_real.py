"""The realistic VM (q35, 1 GiB, a qcow2 root on a backing chain, a raw data disk, a CD-ROM, a
NIC, an RNG, a USB tablet) and ``--to local`` beyond the plain non-shared move that
``tests/test_to_local.py`` proves: a revert from each state that touches the disks puts both
back on their own images with every acknowledged write and leaves no target behind; ``--storage
auto --disk vda`` copies the root and shares the data disk; ``--storage shared`` copies nothing;
QEMU's own migration blocker refuses the run and removes the target livemig launched.

Real QEMU, real guest: every record the guest acknowledged on each disk is checked on the image
that disk ends on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from support.guest_fixtures import (  # noqa: F401  (guest_image_fixture provides "guest_image")
    RunningRealisticVm,
    booted_realistic_vm,
    guest_image_fixture,
)
from support.launched_targets import LIVEMIG, alive, killed_at_end, wait_exit, wait_heartbeats
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401  (provides "aio_loop")

from livemig.drivers import block, image, jobs, migration, runstate
from livemig.drivers.process import find_qemu_processes
from livemig.drivers.qmp import open_monitor
from livemig.fsm.events import Event, Outcome, StateEntered
from livemig.fsm.plan import Plan
from livemig.guest import GuestImage, verify_disks
from livemig.local import migrate_to_local

pytestmark = pytest.mark.qemu


def gone(target_dir: Path) -> bool:
    """The launched target left nothing: its directory is absent or empty."""
    return not target_dir.exists() or not any(target_dir.iterdir())


async def cli(*args: str | Path) -> tuple[int, dict[str, Any], str]:
    """``livemig …`` to its end: exit code, result line, everything it printed."""
    done = await trio.run_process(
        [*LIVEMIG, *map(str, args)], capture_stdout=True, capture_stderr=True, check=False
    )
    out = done.stdout.decode() + done.stderr.decode()
    lines = done.stdout.splitlines()
    result = json.loads(lines[-1]) if lines else {}
    return done.returncode, result, out


async def source_is_back(vm: RunningRealisticVm) -> None:
    """The source runs the guest on its own top nodes, as before the run: no livemig node, no
    job, QEMU's migration defaults."""
    async with open_monitor(vm.spec.qmp_socket, name="check") as m:
        assert (await runstate.query_status(m)).running
        nodes = {n.node_name for n in await block.query_named_block_nodes(m)}
        assert not [n for n in nodes if n and n.startswith("lm-")], nodes
        devices = {d.device_id: d for d in await block.query_block(m)}
        # Each guest device is back on its own image, not on an overlay (or its backing file).
        assert devices["vda"].node_name == "root"
        assert devices["vdb"].node_name == "data"
        assert devices["vda"].filename == str(vm.images.root)
        assert devices["vdb"].filename == str(vm.images.data)
        assert await jobs.query_block_jobs(m) == ()
        caps = await migration.query_capabilities(m)
        assert not caps["pause-before-switchover"]
        assert not caps["events"]


async def power_off_and_verify(vm: RunningRealisticVm, scratch: Path) -> None:
    """The guest goes on on the source; after a clean poweroff every record it acknowledged on
    each disk is on the source's images, exactly."""
    await vm.console.wait_heartbeat(vm.console.last_acked + 5)
    await vm.console.send_line("poweroff")
    await vm.console.wait_poweroff()
    assert await vm.qemu.wait() == 0
    report = await verify_disks(
        vm.images.disk_images(), boot_id=vm.boot_id, acked=vm.console.acked, slack=0,
        scratch_dir=scratch,
    )  # fmt: skip
    assert report.ok, report.problems()
    assert report["vda"].fixed_checked == vm.images.depth  # the chain is whole under the root
    assert report["vda"].checked > 0
    assert report["vdb"].checked > 0


# --- reverts: each overlay merged back, the launched target gone ------------------------------


@pytest.mark.parametrize(
    ("stop_in", "depth"),
    [("snapshotted", 1), ("mirroring", 2), ("state-transfer", 1), ("pre-switchover", 1)],
)
async def test_revert_from(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object, stop_in: str, depth: int
) -> None:
    """Interrupted on entering ``stop_in`` (in-process, so it stops exactly there, even in the
    brief ``pre-switchover``): the run reverts; both disks are back on their own nodes with every
    write, the target livemig launched is stopped and its images and directory are gone."""
    target_dir = tmp_path / "target"
    interrupt = trio.Event()
    target_pids: list[int] = []
    entered: list[str] = []

    def on_event(event: Event) -> None:
        if not isinstance(event, StateEntered):
            return
        entered.append(event.state)
        if event.state == "connected":  # launched by now: note its pid
            target_pids.extend(find_qemu_processes(target_dir))
        if event.state == stop_in:
            interrupt.set()

    with killed_at_end(target_pids), trio.fail_after(60):
        async with booted_realistic_vm(guest_image, tmp_path, depth=depth) as vm:
            await vm.console.wait_heartbeat(3)
            plan = Plan.create(
                source_qmp=vm.spec.qmp_socket,
                target_qmp=target_dir / vm.spec.qmp_socket.name,
                storage="auto",
                work_dir=tmp_path / "work",
            )
            result = await migrate_to_local(
                plan, target_dir=target_dir, on_event=on_event, interrupt=interrupt
            )
            assert result.outcome is Outcome.REVERTED, result
            assert result.states[-2:] == (stop_in, "reverted"), result.states
            assert result.error_type == "Interrupted", result
            assert result.undo_failures == ()
            assert result.target is None
            assert {d.name: d.copied for d in result.disks} == {"vda": True, "vdb": True}
            assert len(target_pids) == 1, target_pids  # it was launched
            assert not alive(target_pids[0])
            assert gone(target_dir)
            assert not find_qemu_processes(target_dir)
            await source_is_back(vm)
            await power_off_and_verify(vm, tmp_path)
    assert not list((tmp_path / "work").glob("lm-*"))


# --- what is shared and what is copied --------------------------------------------------------


async def test_auto_copies_the_named_root_and_shares_the_data_disk(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object
) -> None:
    """``--storage auto --to local --disk vda``: only the root is copied (its backing chain of
    depth 2 flattened into one image with no backing file), the target opens the source's data
    file itself; every record is on the disk the guest wrote it to, on either side."""
    pids: list[int] = []
    with killed_at_end(pids), trio.fail_after(90):
        async with booted_realistic_vm(guest_image, tmp_path, depth=2) as vm:
            await vm.console.wait_heartbeat(3)
            code, result, out = await cli(
                "migrate", "--source-qmp", vm.spec.qmp_socket, "--json", "--storage", "auto",
                "--disk", "vda", "--work-dir", tmp_path / "work", "--target-dir",
                tmp_path / "target",
            )  # fmt: skip
            target = result.get("target") or {}
            if "pid" in target:
                pids.append(target["pid"])
            assert code == 0, out
            assert result["outcome"] == "finalized", out
            assert await vm.qemu.wait() == 0  # the source quit
            acked_on_source = vm.console.last_acked
        by_name = {d["name"]: d["storage"] for d in result["disks"]}
        assert by_name["vda"] == "non-shared"
        assert by_name.get("vdb", "shared") == "shared"  # listed: test_auto_disk_lists_the_shared
        assert set(target["disks"]) == {str(vm.images.root)}  # no copy of the data disk
        root_copy = Path(target["disks"][str(vm.images.root)])
        assert root_copy.parent == tmp_path / "target"
        async with open_monitor(Path(target["qmp"]), name="target") as m:
            assert (await runstate.query_status(m)).running
            devices = {d.device_id: d for d in await block.query_block(m)}
            assert devices["vda"].filename == str(root_copy)
            assert devices["vdb"].filename == str(vm.images.data)  # the source's own file
            assert devices["cd0"].filename == str(vm.images.iso)
            console = await wait_heartbeats(Path(target["serial"]), acked_on_source + 5)
            await m.execute("quit")
        await wait_exit(target["pid"])
        assert console.boot_ids == []  # the same boot went on
        copy = await image.info(root_copy)
        assert (copy.format, copy.backing) == ("qcow2", None)  # the chain, flattened
        assert copy.actual_size < copy.virtual_size // 4  # zeros were not written
        root, data = vm.images.disk_images()
        report = await verify_disks(
            [attrs.evolve(root, path=root_copy), data], boot_id=vm.boot_id,
            acked=console.acked, scratch_dir=tmp_path,
        )  # fmt: skip
        assert report.ok, report.problems()
        assert report["vda"].fixed_checked == 2  # both layers' markers, in the one copy
        assert report["vdb"].checked > 0
    assert not list((tmp_path / "work").glob("lm-*"))


async def test_auto_disk_lists_the_shared_data_disk_in_the_result(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object
) -> None:
    """``--storage auto --disk vda``: the result lists every disk the guest has on the target,
    the one copied and the one left shared (the data disk the target opens as it is)."""
    pids: list[int] = []
    with killed_at_end(pids), trio.fail_after(60):
        async with booted_realistic_vm(guest_image, tmp_path) as vm:
            await vm.console.wait_heartbeat(3)
            code, result, out = await cli(
                "migrate", "--source-qmp", vm.spec.qmp_socket, "--json", "--storage", "auto",
                "--disk", "vda", "--work-dir", tmp_path / "work", "--target-dir",
                tmp_path / "target",
            )  # fmt: skip
            target = result.get("target") or {}
            if "pid" in target:
                pids.append(target["pid"])
            assert code == 0, out
        by_name = {d["name"]: d for d in result["disks"]}
        assert {n: d["storage"] for n, d in by_name.items()} == {
            "vda": "non-shared",
            "vdb": "shared",
        }
        assert by_name["vdb"]["source"] == by_name["vdb"]["target"] == str(vm.images.data)


async def test_shared_storage_copies_nothing(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object
) -> None:
    """``--storage shared --to local``: no image is created, the target opens the source's root
    (on its backing file) and data disk, and every record is there."""
    pids: list[int] = []
    with killed_at_end(pids), trio.fail_after(90):
        async with booted_realistic_vm(guest_image, tmp_path) as vm:
            await vm.console.wait_heartbeat(3)
            code, result, out = await cli(
                "migrate", "--source-qmp", vm.spec.qmp_socket, "--json", "--storage", "shared",
                "--work-dir", tmp_path / "work", "--target-dir", tmp_path / "target",
            )  # fmt: skip
            target = result.get("target") or {}
            if "pid" in target:
                pids.append(target["pid"])
            assert code == 0, out
            assert result["outcome"] == "finalized", out
            assert await vm.qemu.wait() == 0
            acked_on_source = vm.console.last_acked
        assert {d["name"]: d["storage"] for d in result["disks"]} == {
            "vda": "shared",
            "vdb": "shared",
        }
        assert target["disks"] == {}
        assert not list((tmp_path / "target").glob("*.qcow2"))
        assert not list((tmp_path / "target").glob("*.raw"))
        async with open_monitor(Path(target["qmp"]), name="target") as m:
            assert (await runstate.query_status(m)).running
            devices = {d.device_id: d for d in await block.query_block(m)}
            assert devices["vda"].filename == str(vm.images.root)
            assert devices["vdb"].filename == str(vm.images.data)
            console = await wait_heartbeats(Path(target["serial"]), acked_on_source + 5)
            await m.execute("quit")
        await wait_exit(target["pid"])
        assert console.boot_ids == []
        report = await verify_disks(
            vm.images.disk_images(), boot_id=vm.boot_id, acked=console.acked,
            scratch_dir=tmp_path,
        )  # fmt: skip
        assert report.ok, report.problems()
        assert report["vda"].fixed_checked == 1
        assert report["vdb"].checked > 0
    assert not list((tmp_path / "work").glob("lm-*"))


# --- prechecks: refused in QEMU's words, the launched target removed --------------------------


async def test_a_migration_blocker_refuses_and_removes_the_target(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object
) -> None:
    """A source QEMU that lists a migration blocker (a read-write vvfat drive) is refused before
    anything is touched, in QEMU's words; the target livemig launched to find out is gone."""
    (tmp_path / "fat").mkdir()
    blocker = (
        "-drive", f"file=fat:rw:{tmp_path / 'fat'},format=vvfat,if=none,id=vv0",
        "-device", "virtio-blk-pci,drive=vv0,id=vv0dev",
    )  # fmt: skip
    target_dir = tmp_path / "target"
    with trio.fail_after(60):
        async with booted_realistic_vm(guest_image, tmp_path, extra_args=blocker) as vm:
            await vm.console.wait_heartbeat(3)
            code, result, out = await cli(
                "migrate", "--source-qmp", vm.spec.qmp_socket, "--json",
                "--work-dir", tmp_path / "work", "--target-dir", target_dir,
            )  # fmt: skip
            assert code == 2, out
            assert result["outcome"] == "refused", out
            assert result["states"] == ["idle"], result
            assert "target" not in result
            assert "the source QEMU cannot migrate this guest: " in result["error"]
            # QEMU's own words ("The vvfat (rw) format used by node '#block291' does not
            # support live migration"), naming what blocks it.
            assert "The vvfat (rw) format used by node" in result["error"], result["error"]
            assert "does not support live migration" in result["error"]
            assert "Traceback" not in out
            assert gone(target_dir)
            assert not find_qemu_processes(target_dir)
            async with open_monitor(vm.spec.qmp_socket, name="check") as m:
                assert (await runstate.query_status(m)).running
                caps = await migration.query_capabilities(m)
                assert not caps["pause-before-switchover"]
                assert not caps["events"]
                nodes = {n.node_name for n in await block.query_named_block_nodes(m)}
                assert not [n for n in nodes if n and n.startswith("lm-")]
            await vm.console.wait_heartbeat(vm.console.last_acked + 3)
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").iterdir())
