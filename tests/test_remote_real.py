"""Across hosts, for real: the realistic VM moves from one network namespace "host" to another,
the target launched and controlled through OpenSSH (an sshd the test starts), the data QEMU to
QEMU over TLS (a CA the test makes) or through ssh. Every invariant is checked on the target
host: the guest goes on there, every record on every disk is on its images, the target outlives
livemig, and nothing is left on either host."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from support.guest_fixtures import (  # noqa: F401  (guest_image_fixture provides "guest_image")
    RunningRealisticVm,
    booted_realistic_vm,
    guest_image_fixture,
    power_off_with_every_record,
)
from support.launched_targets import LIVEMIG, alive, killed_at_end, wait_heartbeats
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401  (provides "aio_loop")

from livemig.drivers import block, runstate
from livemig.drivers.qmp import open_monitor
from livemig.guest import GuestImage, verify_disks
from livemig.guest._hosts import TwoHosts, two_hosts

pytestmark = pytest.mark.qemu

#: livemig on the target host: this checkout's, run by its sshd.
REMOTE_LIVEMIG = f"{sys.executable} -m livemig"


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[TwoHosts]:
    with two_hosts(tmp_path / "lab") as lab:
        yield lab


def migrate_argv(
    hosts: TwoHosts, vm: RunningRealisticVm, tmp_path: Path, *extra: str | Path
) -> list[str]:
    return hosts.source.argv(
        [*LIVEMIG, "migrate", "--source-qmp", str(vm.spec.qmp_socket), "--json",
         "--work-dir", str(tmp_path / "work"), "--to", f"ssh://{hosts.target_name}",
         "--ssh-config", str(hosts.ssh_config), "--target-dir", str(tmp_path / "remote"),
         "--remote-livemig", REMOTE_LIVEMIG, *map(str, extra)]
    )  # fmt: skip


async def run_livemig(argv: Sequence[str]) -> tuple[int, dict[str, Any], str]:
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    out = done.stdout.decode() + done.stderr.decode()
    lines = done.stdout.splitlines()
    return done.returncode, (json.loads(lines[-1]) if lines else {}), out


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


async def check_target_runs_the_guest(
    vm: RunningRealisticVm, result: dict[str, Any], tmp_path: Path, *, copied: bool
) -> None:
    """The target alone runs the guest, the same boot, every acknowledged record on the disks it
    runs on; then it is quit."""
    target = result["target"]
    async with open_monitor(Path(target["qmp"]), name="target") as m:
        assert (await runstate.query_status(m)).running
        console = await wait_heartbeats(Path(target["serial"]), vm.console.last_acked + 5)
        await m.execute("quit")
    assert console.boot_ids == []  # no reboot
    while alive(target["pid"]):  # noqa: ASYNC110 - another process: no event to wait on
        await trio.sleep(0.05)
    copies = {Path(k): Path(v) for k, v in target["disks"].items()}
    if copied:
        assert set(copies) == {vm.images.root, vm.images.data}
    on_target = [
        attrs.evolve(d, path=copies[d.path], fmt="qcow2" if d.name == "vda" else "raw")
        if d.path in copies
        else d
        for d in vm.images.disk_images()
    ]
    report = await verify_disks(
        on_target, boot_id=vm.boot_id, acked=console.acked, scratch_dir=tmp_path
    )
    assert report.ok, report.problems()


@pytest.mark.parametrize("mode", ["tls", "tunnel"])
async def test_a_realistic_vm_moves_to_another_host(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object, hosts: TwoHosts, mode: str
) -> None:
    pids: list[int] = []
    data = ["--tls-dir", hosts.tls_dir] if mode == "tls" else ["--tunnel", "ssh"]
    with killed_at_end(pids), trio.fail_after(200):
        async with booted_realistic_vm(guest_image, tmp_path, wrapper=hosts.source.wrapper) as vm:
            await vm.console.wait_heartbeat(5)
            code, result, out = await run_livemig(
                migrate_argv(hosts, vm, tmp_path, "--storage", "non-shared", *data)
            )
            if "target" in result:
                pids.append(result["target"]["pid"])
            assert code == 0, out
            assert result["outcome"] == "finalized", out
            assert result["target"]["host"] == f"ssh://{hosts.target_name}"
            assert await vm.qemu.wait() == 0  # the source quit
        # livemig has exited and the source is gone: the target runs on, in the target's netns.
        pid = result["target"]["pid"]
        assert alive(pid)
        assert netns_of(pid) != netns_of(os.getpid())
        assert netns_of(pid) == netns_of(hosts.sshd_pid)
        await check_target_runs_the_guest(vm, result, tmp_path, copied=True)
        assert not list((tmp_path / "work").glob("lm-*")), list((tmp_path / "work").iterdir())


async def test_shared_storage_across_hosts_is_found_by_what_both_hosts_see(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object, hosts: TwoHosts
) -> None:
    """``--storage auto``: the images are on a file system both "hosts" mount at the same path
    (here: the same one); a marker written beside each on the source is read back on the target,
    so nothing is copied and the target opens the source's images."""
    pids: list[int] = []
    with killed_at_end(pids), trio.fail_after(200):
        async with booted_realistic_vm(guest_image, tmp_path, wrapper=hosts.source.wrapper) as vm:
            await vm.console.wait_heartbeat(5)
            code, result, out = await run_livemig(
                migrate_argv(hosts, vm, tmp_path, "--tls-dir", hosts.tls_dir)
            )
            if "target" in result:
                pids.append(result["target"]["pid"])
            assert code == 0, out
            assert result["outcome"] == "finalized", out
            assert {d["name"]: d["storage"] for d in result["disks"]} == {
                "vda": "shared",
                "vdb": "shared",
            }
            assert result["target"]["disks"] == {}
            assert await vm.qemu.wait() == 0
        assert netns_of(result["target"]["pid"]) == netns_of(hosts.sshd_pid)
        await check_target_runs_the_guest(vm, result, tmp_path, copied=False)
        assert not list(tmp_path.glob(".lm-*")), "a shared-storage marker was left"
        assert not list((tmp_path / "work").glob("lm-*"))


async def source_kept_the_guest(vm: RunningRealisticVm, tmp_path: Path) -> None:
    """After a revert: the source runs with nothing of the run left, the target livemig
    launched is gone, and the guest powers off with every record."""
    await source_untouched(vm)
    assert not (tmp_path / "remote").exists(), "the remote target was left"
    await power_off_with_every_record(vm, tmp_path)


async def source_untouched(vm: RunningRealisticVm) -> None:
    async with open_monitor(vm.spec.qmp_socket, name="check") as m:
        assert (await runstate.query_status(m)).running
        nodes = {n.node_name for n in await block.query_named_block_nodes(m)}
        assert not [n for n in nodes if n and n.startswith("lm-")]
        objects = await m.execute("qom-list", {"path": "/objects"})
        assert not [o for o in objects if str(o["name"]).startswith("lm-")]


@pytest.mark.parametrize("wrong", ["another-ca", "another-name", "plain-tcp"])
async def test_bad_credentials_and_plain_tcp_are_refused_before_anything_changes(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object, hosts: TwoHosts, wrong: str
) -> None:
    """A target certificate our CA did not sign, one that names another host, and no TLS at all
    to an address off the host: exit 2 and the reason, the source untouched, nothing started or
    created on the target host."""
    data: list[str | Path]
    if wrong == "another-ca":
        # Both "hosts" see one file system: the target's half of the directory (its server
        # certificate and key) comes from another CA, the source's half is the good one.
        other = hosts.x509_dir_of_another_ca(tmp_path / "other-ca")
        mixed = tmp_path / "mixed"
        shutil.copytree(hosts.tls_dir, mixed, ignore=shutil.ignore_patterns("ca"))
        for name in ("server-cert.pem", "server-key.pem"):
            shutil.copy2(other / name, mixed / name)
        data = ["--tls-dir", mixed]
        reason = "not signed"
    elif wrong == "another-name":
        data = ["--tls-dir", hosts.x509_dir_naming_elsewhere(tmp_path / "elsewhere")]
        reason = "does not name"
    else:
        data = []
        reason = "in the clear"
    with trio.fail_after(120):
        async with booted_realistic_vm(guest_image, tmp_path, wrapper=hosts.source.wrapper) as vm:
            await vm.console.wait_heartbeat(3)
            code, result, out = await run_livemig(migrate_argv(hosts, vm, tmp_path, *data))
            if "target" in result:  # it should not have moved: but if so, leave nothing
                os.kill(result["target"]["pid"], 9)
            assert code == 2, out
            assert reason in out, out
            assert result.get("outcome", "refused") == "refused"
            await source_untouched(vm)
            assert not (tmp_path / "remote").exists()  # nothing made on the target host
            await vm.console.wait_heartbeat(vm.console.last_acked + 2)
    assert not list((tmp_path / "work").glob("lm-*"))


async def test_an_ssh_connection_killed_mid_migration_is_made_again(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object, hosts: TwoHosts
) -> None:
    """sshd's connection processes are killed while the disks are copied: livemig's master
    connection comes back with its forwards and the migration finishes; the guest runs on the
    target alone."""
    pids: list[int] = []
    with killed_at_end(pids), trio.fail_after(240):
        async with booted_realistic_vm(guest_image, tmp_path, wrapper=hosts.source.wrapper) as vm:
            await vm.console.wait_heartbeat(5)
            argv = migrate_argv(
                hosts, vm, tmp_path, "--tls-dir", hosts.tls_dir, "--storage", "non-shared",
                "--max-bandwidth", "4",
            )  # fmt: skip
            proc = await trio.lowlevel.open_process(argv, stdout=-1, stderr=-1)
            try:
                lines = await read_until(proc, lambda e: e.get("state") == "mirroring")
                hosts.kill_ssh_sessions()
                rest = await read_to_end(proc)
                code = await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            result = json.loads(rest.splitlines()[-1]) if rest.strip() else lines[-1]
            if "target" in result:
                pids.append(result["target"]["pid"])
            details = (result.get("error"), result.get("undo_failures"), result["states"])
            # A command in flight when the connection dropped may or may not have run: livemig
            # reverts then. Between commands, the master comes back and the migration goes on.
            assert (code, result["outcome"]) in {(0, "finalized"), (3, "reverted")}, details
            assert any("dropped" in w for w in result["warnings"]), result["warnings"]
            if result["outcome"] == "reverted":
                await source_kept_the_guest(vm, tmp_path)
            else:
                assert await vm.qemu.wait() == 0
        if result["outcome"] == "finalized":
            await check_target_runs_the_guest(vm, result, tmp_path, copied=True)
        assert not list((tmp_path / "work").glob("lm-*"))


async def read_until(proc: trio.Process, seen: Any) -> list[dict[str, Any]]:
    """JSON lines from ``proc`` until one for which ``seen`` holds."""
    assert proc.stdout is not None
    lines: list[dict[str, Any]] = []
    buffer = b""
    while not any(seen(e) for e in lines):
        chunk = await proc.stdout.receive_some()
        assert chunk, lines
        *complete, buffer = (buffer + chunk).split(b"\n")
        lines += [json.loads(c) for c in complete if c]
        for c in complete:
            if c and b"progress" not in c:
                print("LINE", c[:300])
    proc.buffer = buffer  # type: ignore[attr-defined]
    return lines


async def read_to_end(proc: trio.Process) -> bytes:
    assert proc.stdout is not None
    rest: bytes = getattr(proc, "buffer", b"")
    while chunk := await proc.stdout.receive_some():
        rest += chunk
    return rest


@pytest.mark.parametrize("state", ["mirroring", "state-transfer", "pre-switchover"])
async def test_a_link_cut_before_the_switchover_reverts_with_every_write(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object, hosts: TwoHosts, state: str
) -> None:
    """The veth link goes down the moment the migration enters ``state`` (both ends, nothing
    passes): livemig gives up after ``--link-timeout``, reverts, and once the link is back the
    target it launched is removed. The guest ran on the source throughout, with every write."""
    cut = [
        ["ip", "-n", h.netns, "link", "set", h.interface, "down"]
        for h in (hosts.source, hosts.target)
    ]
    with trio.fail_after(300):
        async with booted_realistic_vm(guest_image, tmp_path, wrapper=hosts.source.wrapper) as vm:
            await vm.console.wait_heartbeat(5)
            argv = migrate_argv(
                hosts, vm, tmp_path, "--tls-dir", hosts.tls_dir, "--storage", "non-shared",
                "--link-timeout", "3",
            )  # fmt: skip
            argv[argv.index("livemig")] = "support.cut_link"  # the same CLI, with the fault
            env = {
                **os.environ,
                "LIVEMIG_CUT_AT": state,
                "LIVEMIG_CUT": json.dumps(cut),
                "PYTHONPATH": str(Path(__file__).parent),
            }
            proc = await trio.lowlevel.open_process(argv, stdout=-1, env=env)
            try:
                await read_until(proc, lambda e: e.get("event") == "link-cut")
                await read_until(proc, lambda e: e.get("event") == "reverting")
                hosts.link_up()  # the revert's last step, removing the target, needs it
                rest = await read_to_end(proc)
                code = await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                hosts.link_up()
            result = json.loads(rest.splitlines()[-1])
            assert (code, result["outcome"]) == (3, "reverted"), result
            assert state in result["states"], result["states"]
            assert not result["undo_failures"], result
            await source_kept_the_guest(vm, tmp_path)
    assert not list((tmp_path / "work").glob("lm-*"))


POSTCOPY = [
    # No downtime to raise, no throttle: the first stall switches to post-copy.
    "--postcopy", "--no-auto-converge", "--max-bandwidth", "48", "--downtime-limit", "300",
    "--max-downtime", "300", "--link-timeout", "2",
]  # fmt: skip


async def run_cut_in_postcopy(
    hosts: TwoHosts,
    vm: RunningRealisticVm,
    tmp_path: Path,
    *extra: str,
    restore: bool,
) -> tuple[int, dict[str, Any]]:
    """Migrate with the link cut the moment post-copy starts; with ``restore``, bring it back
    once livemig says post-copy paused. The exit status and the result."""
    cut = [
        ["ip", "-n", h.netns, "link", "set", h.interface, "down"]
        for h in (hosts.source, hosts.target)
    ]
    argv = migrate_argv(
        hosts, vm, tmp_path, "--tls-dir", hosts.tls_dir, "--storage", "non-shared",
        *POSTCOPY, *extra,
    )  # fmt: skip
    argv[argv.index("livemig")] = "support.cut_link"
    env = {
        **os.environ,
        "LIVEMIG_CUT_AT": "post-copy",
        "LIVEMIG_CUT": json.dumps(cut),
        "PYTHONPATH": str(Path(__file__).parent),
    }
    proc = await trio.lowlevel.open_process(argv, stdout=-1, env=env)
    try:
        await read_until(proc, lambda e: e.get("event") == "link-cut")
        await read_until(proc, lambda e: e.get("event") == "postcopy-paused")
        if restore:
            hosts.link_up()
        rest = await read_to_end(proc)
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        hosts.link_up()
    return code, json.loads(rest.splitlines()[-1])


async def test_postcopy_over_a_link_cut_and_restored_finishes(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object, hosts: TwoHosts
) -> None:
    """Post-copy cannot revert: when its link breaks, livemig pauses it, waits, and resumes it
    (``migrate-recover`` on the target, ``migrate … resume`` on the source) once the link is
    back. The guest runs on the target with every record, the same boot."""
    pids: list[int] = []
    with killed_at_end(pids), trio.fail_after(300):
        async with booted_realistic_vm(
            guest_image, tmp_path, wrapper=hosts.source.wrapper, dirty_mib_s="max"
        ) as vm:
            await vm.console.wait_heartbeat(5)
            code, result = await run_cut_in_postcopy(
                hosts, vm, tmp_path, "--postcopy-recover-timeout", "120", restore=True
            )
            if "target" in result:
                pids.append(result["target"]["pid"])
            assert (code, result["outcome"]) == (0, "finalized"), result["error"]
            assert result["states"][-2:] == ["post-copy", "finalized"]
            assert await vm.qemu.wait() == 0
        await check_target_runs_the_guest(vm, result, tmp_path, copied=True)


async def test_postcopy_over_a_link_cut_for_good_fails_saying_where_the_guest_is(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object, hosts: TwoHosts
) -> None:
    pids: list[int] = []
    with killed_at_end(pids), trio.fail_after(300):
        async with booted_realistic_vm(
            guest_image, tmp_path, wrapper=hosts.source.wrapper, dirty_mib_s="max"
        ) as vm:
            await vm.console.wait_heartbeat(5)
            code, result = await run_cut_in_postcopy(
                hosts, vm, tmp_path, "--postcopy-recover-timeout", "5", restore=False
            )
            if "target" in result:
                pids.append(result["target"]["pid"])
            assert (code, result["outcome"]) == (4, "failed"), result
            assert "not resumed in 5 s" in result["error"]
            assert "Both are kept" in result["error"]
            assert "MiB not yet sent" in result["error"]
            # Both QEMUs are kept, as it says: the source paused, the target there.
            assert vm.qemu.returncode is None
            assert alive(result["target"]["pid"])
            async with open_monitor(vm.spec.qmp_socket, name="check") as m:
                stats = await m.execute("query-migrate")
                assert stats["status"] == "postcopy-paused"


async def test_livemig_killed_mid_migration_is_recovered_on_both_hosts(
    guest_image: GuestImage, tmp_path: Path, aio_loop: object, hosts: TwoHosts
) -> None:
    """livemig is SIGKILLed while the RAM streams (its ssh master goes with it):
    ``livemig recover`` reaches the target's host again from the journal, reverts, and removes
    the target it launched there. The guest ran on the source throughout, with every write."""
    with trio.fail_after(240):
        async with booted_realistic_vm(guest_image, tmp_path, wrapper=hosts.source.wrapper) as vm:
            await vm.console.wait_heartbeat(5)
            argv = migrate_argv(
                hosts, vm, tmp_path, "--tls-dir", hosts.tls_dir, "--storage", "non-shared",
                "--max-bandwidth", "1",
            )  # fmt: skip
            proc = await trio.lowlevel.open_process(argv, stdout=-1)
            try:
                await read_until(proc, lambda e: e.get("state") == "state-transfer")
                proc.kill()
                await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert (tmp_path / "remote").exists()  # the target it launched is still there
            code, result, out = await run_livemig(
                hosts.source.argv(
                    [*LIVEMIG, "recover", "--work-dir", str(tmp_path / "work"), "--json"]
                )
            )
            assert (code, result.get("outcome")) == (3, "reverted"), out
            await source_kept_the_guest(vm, tmp_path)
    assert not list((tmp_path / "work").glob("lm-*"))
