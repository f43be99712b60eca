"""``livemig migrate --source-qmp S`` with no target given: livemig launches the target from the
source (``--to local``) and the realistic VM (q35, 2 vCPUs, 1 GiB, qcow2 root on a backing chain,
raw data disk, CD-ROM, NIC, RNG, USB tablet) moves with every disk. Real QEMU, real guest: the
guest goes on on the target, which outlives livemig, and every record the guest acknowledged on
every disk is on the target's images; a revert leaves no target and no image behind."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from support.guest_fixtures import (  # noqa: F401  (guest_image_fixture provides "guest_image")
    booted_realistic_vm,
    guest_image_fixture,
    power_off_with_every_record,
)
from support.launched_targets import LIVEMIG, alive, killed_at_end, wait_heartbeats
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401  (provides "aio_loop")

from livemig.drivers import block, runstate
from livemig.drivers.process import find_qemu_processes
from livemig.drivers.qmp import open_monitor
from livemig.guest import GuestImage, Syntax, verify_disks
from livemig.testing.campaign_real import kill_on_state

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize(("syntax", "depth"), [("blockdev", 1), ("drive", 2)])
async def test_a_realistic_vm_moves_to_a_target_livemig_launches(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object, syntax: Syntax, depth: int
) -> None:
    pids: list[int] = []
    with killed_at_end(pids), trio.fail_after(150):
        async with booted_realistic_vm(guest_image, tmp_path, syntax=syntax, depth=depth) as vm:
            await vm.console.wait_heartbeat(5)
            done = await trio.run_process(
                [*LIVEMIG, "migrate", "--source-qmp", vm.spec.qmp_socket, "--json",
                 "--work-dir", tmp_path / "work", "--target-dir", tmp_path / "target"],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            out = done.stdout.decode() + done.stderr.decode()
            assert done.returncode == 0, out
            result = json.loads(done.stdout.splitlines()[-1])
            target = result["target"]
            pids.append(target["pid"])
            assert result["outcome"] == "finalized", out
            assert await vm.qemu.wait() == 0  # the source quit
            source_acked = {d: vm.console.acked(d) for d in ("vda", "vdb")}
        # livemig has exited and the source is gone: the target runs the guest on its own.
        assert alive(target["pid"])
        assert {d["name"]: d["storage"] for d in result["disks"]} == {
            "vda": "non-shared",
            "vdb": "non-shared",
        }
        async with open_monitor(Path(target["qmp"]), name="target") as m:
            assert (await runstate.query_status(m)).running
            assert await runstate.query_machine(m) == "pc-q35-10.0"
            devices = {d.device_id: d for d in await block.query_block(m)}
            assert devices["cd0"].filename == str(vm.images.iso)  # media are not copied
            console = await wait_heartbeats(Path(target["serial"]), vm.console.last_acked + 5)
            await m.execute("quit")
        assert console.boot_ids == []  # the same boot went on: no reboot
        assert all(console.acked(d) > source_acked[d] for d in ("vda", "vdb"))
        while alive(target["pid"]):  # noqa: ASYNC110 - another process: no event to wait on
            await trio.sleep(0.05)
        copies = {Path(k): Path(v) for k, v in target["disks"].items()}
        assert set(copies) == {vm.images.root, vm.images.data}
        on_target = [
            attrs.evolve(d, path=copies[d.path], fmt="qcow2" if d.name == "vda" else "raw")
            for d in vm.images.disk_images()
        ]
        report = await verify_disks(
            on_target, boot_id=vm.boot_id, acked=console.acked, scratch_dir=tmp_path
        )
        assert report.ok, report.problems()
        assert report["vda"].fixed_checked == depth  # the chain's data, flattened into one image
        data = copies[vm.images.data].stat()
        assert data.st_blocks * 512 < data.st_size // 4  # the sparse data disk stayed sparse
        assert not list((tmp_path / "work").glob("lm-*"))


async def test_a_revert_removes_the_launched_target_and_keeps_every_write(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object
) -> None:
    """SIGINT while the disks are mirrored: the guest stays on the source with every write on
    both disks (each overlay merged back), and the target livemig launched is gone with its
    images."""
    with trio.fail_after(150):
        async with booted_realistic_vm(guest_image, tmp_path) as vm:
            await vm.console.wait_heartbeat(5)
            proc = await trio.lowlevel.open_process(
                [*LIVEMIG, "migrate", "--source-qmp", str(vm.spec.qmp_socket), "--json",
                 "--work-dir", str(tmp_path / "work"), "--target-dir", str(tmp_path / "target"),
                 "--max-bandwidth", "1"],
                stdout=-1,
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                lines: list[dict[str, Any]] = []
                buffer = b""
                while not any(e.get("state") == "state-transfer" for e in lines):
                    chunk = await proc.stdout.receive_some()
                    assert chunk, lines
                    *complete, buffer = (buffer + chunk).split(b"\n")
                    lines += [json.loads(c) for c in complete if c]
                proc.send_signal(signal.SIGINT)
                rest = b""
                while chunk := await proc.stdout.receive_some():
                    rest += chunk
                assert await proc.wait() == 130
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            result = json.loads((buffer + rest).splitlines()[-1])
            assert result["outcome"] == "reverted", result
            assert "target" not in result
            assert not (tmp_path / "target").exists()
            async with open_monitor(vm.spec.qmp_socket, name="check") as m:
                assert (await runstate.query_status(m)).running
                nodes = {n.node_name for n in await block.query_named_block_nodes(m)}
                assert not [n for n in nodes if n and n.startswith("lm-")]
                vda = next(d for d in await block.query_block(m) if d.device_id == "vda")
                assert vda.node_name == "root"  # back on its own image, not its backing file
            await power_off_with_every_record(vm, tmp_path)
        assert not list((tmp_path / "work").glob("lm-*"))


@pytest.mark.parametrize("storage", ["non-shared", "shared"])
async def test_the_demo_moves_the_realistic_vm_and_checks_every_disk(
    tmp_path: Path, storage: str
) -> None:
    done = await trio.run_process(
        [*LIVEMIG, "demo", "--json", "--storage", storage, "--work-dir", str(tmp_path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, out
    events = [json.loads(line) for line in done.stdout.splitlines()]
    result = next(e for e in events if e["event"] == "result")
    verdict = next(e for e in events if e["event"] == "verdict")
    assert result["outcome"] == "finalized"
    assert {d["name"] for d in result["disks"]} == {"vda", "vdb"}
    assert verdict["ok"], verdict
    assert verdict["survivor"] == "target"
    assert verdict["records_checked"]["vda"] > 0
    assert verdict["records_checked"]["vdb"] > 0


async def test_a_crashed_run_is_recovered_and_the_launched_target_removed(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object
) -> None:
    """livemig SIGKILLed while the disks are mirrored to the target it launched: ``livemig
    recover`` quits that target, removes its images and directory (they are in the journal's
    undo steps), merges both overlays back and the guest goes on on the source."""
    target_dir = tmp_path / "target"
    with trio.fail_after(150):
        async with booted_realistic_vm(guest_image, tmp_path) as vm:
            await vm.console.wait_heartbeat(5)
            proc = await trio.lowlevel.open_process(
                [*LIVEMIG, "migrate", "--source-qmp", str(vm.spec.qmp_socket), "--json",
                 "--work-dir", str(tmp_path / "work"), "--target-dir", str(target_dir)],
                stdout=-1,
            )  # fmt: skip
            try:
                assert await kill_on_state(proc, "mirroring")
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
            assert any(target_dir.iterdir())  # the launched target and its images are there
            done = await trio.run_process(
                [*LIVEMIG, "recover", "--work-dir", tmp_path / "work", "--json"],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert done.returncode == 3, done.stdout.decode() + done.stderr.decode()
            assert not target_dir.exists()
            assert not find_qemu_processes(target_dir)
            async with open_monitor(vm.spec.qmp_socket, name="check") as m:
                assert (await runstate.query_status(m)).running
                nodes = {n.node_name for n in await block.query_named_block_nodes(m)}
                assert not [n for n in nodes if n and n.startswith("lm-")]
            await power_off_with_every_record(vm, tmp_path)
        assert not list((tmp_path / "work").glob("lm-*"))
