"""livemig.drivers.process: the pure command line, and real QEMU processes started, stopped and
killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from support.guest_fixtures import require_qemu

from livemig.drivers.process import (
    DiskSpec,
    VmSpec,
    find_qemu_processes,
    launch,
    launched,
)
from livemig.transports.errors import ProcessError, UsageError

REPO = Path(__file__).resolve().parent.parent


def spec(tmp_path: Path, **changes: Any) -> VmSpec:
    base = VmSpec(name="vm", qmp_socket=tmp_path / "qmp.sock")
    return attrs.evolve(base, **changes)


def option(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` in ``argv``."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


# --- VmSpec.argv: pure -------------------------------------------------------------------------


def test_argv_defaults(tmp_path: Path) -> None:
    argv = spec(tmp_path).argv()
    assert argv[0] == "qemu-system-x86_64"
    assert option(argv, "-machine") == ["q35"]
    assert option(argv, "-accel") == ["tcg"]
    assert option(argv, "-m") == ["512"]
    assert option(argv, "-smp") == ["1"]
    assert option(argv, "-display") == ["none"]
    assert {"-nodefaults", "-no-user-config"} <= set(argv)
    assert option(argv, "-chardev") == [
        f"socket,id=qmp,path={tmp_path}/qmp.sock,server=on,wait=off",
        "stdio,id=serial0,signal=off",
    ]
    assert option(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert option(argv, "-serial") == ["chardev:serial0"]
    for absent in ("-S", "-incoming", "-no-reboot", "-cpu", "-kernel", "-blockdev"):
        assert absent not in argv


def test_argv_disk_nodes_and_device(tmp_path: Path) -> None:
    argv = spec(tmp_path, disks=[DiskSpec(path=tmp_path / "d.qcow2", fmt="qcow2")]).argv()
    assert option(argv, "-blockdev") == [
        f"driver=file,filename={tmp_path}/d.qcow2,node-name=root-file,cache.direct=off",
        "driver=qcow2,node-name=root,file=root-file",
    ]
    assert option(argv, "-device") == ["virtio-blk-pci,drive=root,id=vda"]


def test_argv_read_only_disk(tmp_path: Path) -> None:
    disk = DiskSpec(path=tmp_path / "d.raw", node_name="data", device_id="vdb", read_only=True)
    assert disk.argv() == [
        "-blockdev",
        f"driver=file,filename={tmp_path}/d.raw,node-name=data-file,cache.direct=off,read-only=on",
        "-blockdev",
        "driver=raw,node-name=data,file=data-file,read-only=on",
        "-device",
        "virtio-blk-pci,drive=data,id=vdb",
    ]


def test_argv_escapes_commas_in_paths(tmp_path: Path) -> None:
    argv = spec(
        tmp_path, qmp_socket=tmp_path / "a,b.sock", disks=[DiskSpec(path=tmp_path / "x,y.raw")]
    ).argv()
    assert f"path={tmp_path}/a,,b.sock," in option(argv, "-chardev")[0]
    assert f"filename={tmp_path}/x,,y.raw," in option(argv, "-blockdev")[0]


def test_argv_kernel_and_options(tmp_path: Path) -> None:
    argv = spec(
        tmp_path,
        kernel=Path("/k"),
        initrd=Path("/i"),
        append="console=ttyS0 a=b,c",
        memory_mib=1024,
        cpus=2,
        no_reboot=True,
        extra_args=("-rtc", "base=utc"),
    ).argv("/opt/qemu")
    assert argv[0] == "/opt/qemu"
    assert option(argv, "-kernel") == ["/k"]
    assert option(argv, "-initrd") == ["/i"]
    assert option(argv, "-append") == ["console=ttyS0 a=b,c"]  # not a key=value option
    assert option(argv, "-m") == ["1024"]
    assert option(argv, "-smp") == ["2"]
    assert "-no-reboot" in argv
    assert argv[-2:] == ["-rtc", "base=utc"]


@pytest.mark.parametrize(
    ("accel", "cpu", "expected"),
    [
        ("kvm", None, ["host"]),
        ("kvm", "EPYC", ["EPYC"]),
        ("tcg", "max", ["max"]),
        ("tcg", None, []),
    ],
)
def test_argv_accel_and_cpu(
    tmp_path: Path, accel: str, cpu: str | None, expected: list[str]
) -> None:
    argv = spec(tmp_path, accel=accel, cpu=cpu).argv()
    assert option(argv, "-accel") == [accel]
    assert option(argv, "-cpu") == expected


def test_as_incoming_keeps_the_machine_and_devices(tmp_path: Path) -> None:
    source = spec(tmp_path, disks=[DiskSpec(path=tmp_path / "d.raw")], kernel=Path("/k"))
    target = source.as_incoming(qmp_socket=tmp_path / "target.sock")
    assert (target.name, target.incoming, target.paused) == ("vm-target", "defer", True)
    t_argv = target.argv()
    assert option(t_argv, "-incoming") == ["defer"]
    assert "-S" in t_argv

    def devices(argv: list[str]) -> list[str]:
        return [a for a in argv if a.startswith(("virtio", "driver=", "q35", "stdio"))]

    assert devices(t_argv) == devices(source.argv())


def test_argv_serial_elsewhere(tmp_path: Path) -> None:
    argv = spec(tmp_path, serial="none").argv()
    assert option(argv, "-serial") == ["none"]
    assert "stdio,id=serial0,signal=off" not in argv


@pytest.mark.parametrize(
    "changes",
    [
        {"name": ""},
        {"name": "a/b"},
        {"memory_mib": 0},
        {"cpus": 0},
        {"accel": "hvf"},
        {"disks": [DiskSpec(path=Path("a")), DiskSpec(path=Path("b"))]},  # both "root"
    ],
)
def test_spec_rejects_bad_values(tmp_path: Path, changes: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        spec(tmp_path, **changes)


def test_disk_rejects_unknown_format() -> None:
    with pytest.raises(UsageError):
        DiskSpec(path=Path("a"), fmt="vvfat")  # type: ignore[arg-type]


# --- real processes ----------------------------------------------------------------------------


def exists(path: Path) -> bool:
    return path.exists()


def reaped(pid: int) -> bool:
    """Our child is gone from /proc only once we reaped it: no zombie left."""
    return not Path(f"/proc/{pid}").exists()


def gone(pid: int) -> bool:
    """Reaped, or a zombie whose reaping is not ours (re-parented to an init that lags)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def idle_spec(tmp_path: Path, **changes: Any) -> VmSpec:
    """A QEMU with no guest that stays paused: starts in a fraction of a second."""
    return spec(tmp_path, memory_mib=64, paused=True, serial="none", **changes)


@pytest.mark.qemu
async def test_launch_failure_reports_stderr_tail(tmp_path: Path) -> None:
    require_qemu()
    with trio.fail_after(10), pytest.raises(ProcessError) as info:
        await launch(idle_spec(tmp_path, extra_args=("-no-such-option",)), work_dir=tmp_path)
    assert info.value.returncode == 1
    assert "-no-such-option" in info.value.stderr_tail
    assert "-no-such-option" in str(info.value)
    assert find_qemu_processes(tmp_path) == []


@pytest.mark.qemu
async def test_launch_missing_binary(tmp_path: Path) -> None:
    with trio.fail_after(5), pytest.raises(ProcessError, match="cannot start"):
        await launch(idle_spec(tmp_path), work_dir=tmp_path, qemu_binary=str(tmp_path / "nope"))


@pytest.mark.qemu
async def test_stop_leaves_no_process(tmp_path: Path) -> None:
    require_qemu()
    with trio.fail_after(15):
        qemu = await launch(idle_spec(tmp_path), work_dir=tmp_path)
        assert find_qemu_processes(tmp_path) == [qemu.pid]
        assert qemu.returncode is None
        assert await qemu.stop() == 0  # SIGTERM: QEMU shuts down cleanly
        assert await qemu.stop() == 0  # idempotent
    assert reaped(qemu.pid)
    assert find_qemu_processes(tmp_path) == []
    assert not exists(tmp_path / "qmp.sock")  # QEMU removed its socket
    assert "terminating on signal 15" in qemu.stderr_tail()


@pytest.mark.qemu
async def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    require_qemu()
    with trio.fail_after(15):
        qemu = await launch(idle_spec(tmp_path), work_dir=tmp_path)
        os.kill(qemu.pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
        assert await qemu.stop(grace=0.2) == -signal.SIGKILL
    assert reaped(qemu.pid)


@pytest.mark.qemu
async def test_wait_sees_qemu_killed_mid_run(tmp_path: Path) -> None:
    require_qemu()
    with trio.fail_after(15):
        async with launched(idle_spec(tmp_path), work_dir=tmp_path) as qemu:
            os.kill(qemu.pid, signal.SIGKILL)
            assert await qemu.wait() == -signal.SIGKILL
            assert qemu.returncode == -signal.SIGKILL
    assert find_qemu_processes(tmp_path) == []


@pytest.mark.qemu
async def test_launched_stops_qemu_when_cancelled(tmp_path: Path) -> None:
    require_qemu()
    pid = None
    with trio.fail_after(15):
        with trio.move_on_after(0.5) as scope:
            async with launched(idle_spec(tmp_path), work_dir=tmp_path) as qemu:
                pid = qemu.pid
                await trio.sleep_forever()
        assert scope.cancelled_caught
    assert pid is not None
    assert reaped(pid)
    assert find_qemu_processes(tmp_path) == []


@pytest.mark.qemu
async def test_qmp_socket_in_use_is_refused_and_stale_one_replaced(tmp_path: Path) -> None:
    require_qemu()
    sock_path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock_path))
        listener.listen()
        with trio.fail_after(5), pytest.raises(UsageError, match="in use"):
            await launch(idle_spec(tmp_path), work_dir=tmp_path)
    assert exists(sock_path)  # now stale: nobody listens
    with trio.fail_after(15):
        async with launched(idle_spec(tmp_path), work_dir=tmp_path) as qemu:
            assert qemu.returncode is None


@pytest.mark.qemu
async def test_serial_streams_need_stdio(tmp_path: Path) -> None:
    require_qemu()
    with trio.fail_after(15):
        async with launched(idle_spec(tmp_path), work_dir=tmp_path) as qemu:
            with pytest.raises(UsageError):
                _ = qemu.serial_send_stream


@pytest.mark.qemu
async def test_qemu_dies_with_its_parent(tmp_path: Path) -> None:
    """A test run killed with SIGKILL leaves no QEMU behind (PR_SET_PDEATHSIG)."""
    require_qemu()
    script = textwrap.dedent(
        f"""
        import sys, trio
        from pathlib import Path
        from livemig.drivers.process import VmSpec, launch

        async def main():
            spec = VmSpec(name="orphan", qmp_socket=Path({str(tmp_path / "qmp.sock")!r}),
                          memory_mib=64, paused=True, serial="none")
            qemu = await launch(spec, work_dir=Path({str(tmp_path)!r}))
            print(qemu.pid, flush=True)
            await trio.sleep_forever()

        trio.run(main)
        """
    )
    with trio.fail_after(20):
        parent = await trio.lowlevel.open_process(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO
        )
        assert parent.stdout is not None
        line = await parent.stdout.receive_some()
        qemu_pid = int(line.decode())
        assert not gone(qemu_pid)
        parent.kill()
        await parent.wait()
        await parent.stdout.aclose()
        while not gone(qemu_pid):  # noqa: ASYNC110  (no event tells us; poll /proc)
            await trio.sleep(0.05)
    assert find_qemu_processes(tmp_path) == []
