"""livemig.guest._hosts: two "hosts" in network namespaces on this machine, an sshd on the target,
x509 credentials a real QEMU accepts; and a QEMU started in the source namespace.

Every test makes its own lab (well under a second) and checks what it leaves behind. Nothing here
sends a packet outside the lab's namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import trio

from livemig.drivers.process import VmSpec, find_qemu_processes, launched
from livemig.guest import _hosts
from livemig.guest._hosts import NetnsHost, TwoHosts, two_hosts
from livemig.transports.errors import ToolError, UsageError
from livemig.transports.tls import CA, SERVER_CERT, check_client_dir, check_server_cert

pytestmark = pytest.mark.qemu

GUARD = 60.0  # seconds: a bound for what takes a fraction of one
NBD_PORT = 10809  # in the target namespace: nothing else listens there


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[TwoHosts]:
    with two_hosts(tmp_path / "lab") as lab:
        yield lab


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=GUARD, check=False)


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def netns_inside(host: NetnsHost) -> str:
    """The namespace a process started with ``host.argv`` is in (``net:[inode]``)."""
    return run(host.argv(["readlink", "/proc/self/ns/net"])).stdout.strip()


def namespaces() -> str:
    return run(["ip", "netns", "list"]).stdout


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and text in argv and int(entry.name) != os.getpid():
            found.append(argv.replace("\0", " "))
    return found


def read_line(stream: IO[str] | None) -> str:
    assert stream is not None
    return stream.readline().strip()


def assert_torn_down(lab: TwoHosts, directory: Path) -> None:
    assert lab.source.netns not in namespaces()
    assert lab.target.netns not in namespaces()
    assert not alive(lab.sshd_pid)
    assert processes_mentioning(str(directory)) == []


# --- the lab -------------------------------------------------------------------------------------


def test_lab_comes_up_with_sshd_in_the_target(hosts: TwoHosts) -> None:
    assert netns_of(hosts.sshd_pid) == netns_inside(hosts.target)
    assert netns_inside(hosts.source) != netns_inside(hosts.target)
    assert netns_inside(hosts.source) != netns_of(os.getpid())
    shown = run(hosts.ssh_argv("ip", "-o", "-4", "addr", "show", "dev", hosts.target.interface))
    assert shown.returncode == 0, shown.stderr
    assert f"inet {hosts.target.address}/" in shown.stdout  # the shell ran on the target
    names = {p.name: p.stat().st_mode & 0o777 for p in hosts.tls_dir.iterdir() if p.is_file()}
    assert names == {
        "ca-cert.pem": 0o644,
        "server-cert.pem": 0o644,
        "server-key.pem": 0o600,
        "client-cert.pem": 0o644,
        "client-key.pem": 0o600,
    }
    check_client_dir(hosts.tls_dir)
    for hostname in (hosts.target_name, hosts.target.address):
        ca, cert = (hosts.tls_dir / name for name in (CA, SERVER_CERT))
        check_server_cert(ca.read_bytes(), cert.read_bytes(), hostname=hostname)


def test_ssh_uses_nothing_but_the_lab_files(hosts: TwoHosts) -> None:
    """``ssh -G`` prints the options ssh would use: the lab's key and known hosts, no agent."""
    options = run(hosts.ssh_argv(options=["-G"])).stdout.lower().splitlines()
    ssh_dir = str(hosts.ssh_config.parent).lower()
    assert f"hostname {hosts.target.address}" in options
    assert "user root" in options
    assert "batchmode yes" in options
    assert "stricthostkeychecking true" in options
    assert [o for o in options if o.startswith("identityfile ")] == [
        f"identityfile {ssh_dir}/client_ed25519_key"
    ]
    assert f"userknownhostsfile {ssh_dir}/known_hosts" in options
    assert "identityagent none" in options


def test_the_target_is_not_reachable_from_the_root_namespace(hosts: TwoHosts) -> None:
    """Neither the link nor its addresses exist outside the namespaces: the root namespace would
    route the target's address like any other (to a gateway, if it has one). Checked from the
    routing tables: a connection attempt would send packets off this machine."""
    assert hosts.source.interface not in run(["ip", "-o", "link"]).stdout
    assert hosts.target.interface not in run(["ip", "-o", "link"]).stdout
    root_addresses = run(["ip", "-o", "addr"]).stdout
    assert f" {hosts.source.address}/" not in root_addresses
    assert f" {hosts.target.address}/" not in root_addresses
    route = run(["ip", "route", "get", hosts.target.address])
    assert not route.stdout.startswith("local ")
    assert "lm-veth" not in route.stdout


def test_link_down_cuts_the_link_and_link_up_restores_it(hosts: TwoHosts) -> None:
    # A session open across the cut: it stalls but is not reset, and goes on once restored.
    with subprocess.Popen(
        hosts.ssh_argv("cat"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as session:
        assert session.stdin is not None
        session.stdin.write("before\n")
        session.stdin.flush()
        assert read_line(session.stdout) == "before"
        hosts.link_down()
        refused = run(hosts.ssh_argv("true"))
        assert refused.returncode == 255
        assert "Network is unreachable" in refused.stderr
        hosts.link_up()
        assert run(hosts.ssh_argv("true")).returncode == 0
        session.stdin.write("after\n")
        session.stdin.flush()
        assert read_line(session.stdout) == "after"
        session.stdin.close()
        assert session.wait(GUARD) == 0


def test_kill_ssh_sessions_drops_a_live_session(hosts: TwoHosts) -> None:
    with subprocess.Popen(
        hosts.ssh_argv("echo $$; exec sleep 60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as session:
        remote_sleep = int(read_line(session.stdout))  # the session is up: its shell answered
        assert alive(remote_sleep)
        started = time.monotonic()
        hosts.kill_ssh_sessions()
        assert session.wait(GUARD) == 255
        assert time.monotonic() - started < GUARD
        assert session.stderr is not None
        assert "closed by remote host" in session.stderr.read()
    assert not alive(remote_sleep)  # what ran in the session went with it
    assert alive(hosts.sshd_pid)  # the listener stays
    assert run(hosts.ssh_argv("true")).returncode == 0


def test_two_labs_at_once_do_not_meet(hosts: TwoHosts, tmp_path: Path) -> None:
    with two_hosts(tmp_path / "second") as second:
        assert {second.source.netns, second.target.netns}.isdisjoint(
            {hosts.source.netns, hosts.target.netns}
        )
        assert second.target.address == hosts.target.address  # each in namespaces of its own
        for lab in (hosts, second):
            pid = run(lab.ssh_argv("readlink", "/proc/$PPID/ns/net"))
            assert pid.stdout.strip() == netns_of(lab.sshd_pid)


# --- tear-down -----------------------------------------------------------------------------------


def test_teardown_leaves_nothing(tmp_path: Path) -> None:
    with two_hosts(tmp_path / "lab") as lab:
        session = subprocess.Popen(lab.ssh_argv("echo up; exec sleep 60"), stdout=subprocess.PIPE)
        assert session.stdout is not None
        assert session.stdout.readline() == b"up\n"
    assert session.wait(GUARD) == 255  # its sshd was killed with the lab
    session.stdout.close()
    assert_torn_down(lab, tmp_path)


def test_teardown_after_an_error_in_the_body(tmp_path: Path) -> None:
    labs: list[TwoHosts] = []

    def body() -> None:
        with two_hosts(tmp_path / "lab") as lab:
            labs.append(lab)
            raise RuntimeError("in the body")

    with pytest.raises(RuntimeError, match="in the body"):
        body()
    assert_torn_down(labs[0], tmp_path)


def test_a_missing_sshd_is_an_error_not_a_skip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ip", "ssh", "ssh-keygen", "openssl"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(_hosts, "_SBIN", str(bin_dir))
    with pytest.raises(ToolError, match="sshd is not installed"), two_hosts(tmp_path / "lab"):
        pass
    assert not (tmp_path / "lab").exists()  # refused before anything was made


# --- QEMU across the namespaces ------------------------------------------------------------------


def listening(pid: int, port: int) -> bool:
    """Whether the process listens on TCP ``port`` (in its own network namespace)."""
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except FileNotFoundError:
        return False
    return any(
        fields[1].endswith(f":{port:04X}") and fields[3] == "0A"  # 0A: LISTEN
        for fields in (line.split() for line in lines)
    )


class NbdServer:
    """``qemu-nbd`` in the target namespace, serving ``image`` over TLS with ``tls_dir``."""

    def __init__(self, hosts: TwoHosts, image: Path, tls_dir: Path) -> None:
        creds = f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer=on"
        argv = ["qemu-nbd", "--object", creds, "--tls-creds", "tls0"]
        argv += ["-b", hosts.target.address, "-p", str(NBD_PORT), "-x", "disk0"]
        argv += ["-f", "raw", "-r", "-t", str(image)]
        self.process = subprocess.Popen(hosts.target.argv(argv), stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> NbdServer:
        deadline = time.monotonic() + GUARD
        while not listening(self.process.pid, NBD_PORT):
            assert self.process.poll() is None, self.process.communicate()[1]
            assert time.monotonic() < deadline, "qemu-nbd does not listen"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.communicate(timeout=GUARD)


def qemu_img_info(hosts: TwoHosts, tls_dir: Path) -> subprocess.CompletedProcess[str]:
    """``qemu-img info`` of the export, from the source namespace, over TLS with ``tls_dir``."""
    creds = f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=client"
    image = (
        f"driver=nbd,server.type=inet,server.host={hosts.target.address},"
        f"server.port={NBD_PORT},export=disk0,tls-creds=tls0,tls-hostname={hosts.target_name}"
    )
    return run(hosts.source.argv(["qemu-img", "info", "--object", creds, "--image-opts", image]))


def test_qemu_tls_across_the_namespaces(hosts: TwoHosts, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    another_ca = hosts.x509_dir_of_another_ca(tmp_path / "another-ca")
    elsewhere = hosts.x509_dir_naming_elsewhere(tmp_path / "elsewhere")

    with NbdServer(hosts, image, hosts.tls_dir):
        good = qemu_img_info(hosts, hosts.tls_dir)
        assert good.returncode == 0, good.stderr
        assert "virtual size: 1 MiB" in good.stdout
        refused = qemu_img_info(hosts, another_ca)
        assert refused.returncode == 1
        assert "hasn't got a known issuer" in refused.stderr

    with NbdServer(hosts, image, elsewhere):
        refused = qemu_img_info(hosts, hosts.tls_dir)
        assert refused.returncode == 1
        assert f"does not match the hostname {hosts.target_name}" in refused.stderr
    # livemig's own check says so before QEMU is asked
    with pytest.raises(UsageError, match=f"does not name {hosts.target_name} "):
        check_server_cert(
            (hosts.tls_dir / CA).read_bytes(),
            (elsewhere / SERVER_CERT).read_bytes(),
            hostname=hosts.target_name,
        )


async def test_a_qemu_launched_in_the_source_namespace(hosts: TwoHosts, tmp_path: Path) -> None:
    """Its monitor is a unix socket (a path: reachable from any network namespace), so the launch
    waits for it as for any QEMU's."""
    spec = VmSpec(
        name="in-source",
        qmp_socket=tmp_path / "qmp.sock",
        memory_mib=64,
        paused=True,
        serial="none",
    )
    with trio.fail_after(GUARD):
        async with launched(spec, work_dir=tmp_path, wrapper=hosts.source.wrapper) as qemu:
            assert find_qemu_processes(tmp_path) == [qemu.pid]  # ip execs: the pid is QEMU's
            assert netns_of(qemu.pid) == netns_inside(hosts.source)
        assert qemu.returncode == 0  # stopped cleanly by SIGTERM, reaped
    assert find_qemu_processes(tmp_path) == []
