"""Two hosts on one machine, for cross-host migration tests: a *source* and a *target* network
namespace joined by a veth link, an sshd listening in the target, and x509 credentials in QEMU's
layout (``tls-creds-x509``)::

    with two_hosts(tmp_path / "lab") as hosts:
        subprocess.run(hosts.ssh_argv("true"), check=True)  # from the source, over the link
        qemu = await launch(spec, work_dir=work, wrapper=hosts.source.wrapper)  # a source QEMU
        hosts.link_down()  # the link is cut
        …

Only the namespaces have the link and its addresses (``10.199.77.1`` and ``.2``): nothing outside
them is configured or contacted, and two labs at once do not meet (each has its own namespaces,
named with a random suffix). Under ``directory`` the lab writes ``ssh/`` (sshd's config, host
key, log and pid file; the client's key, known-hosts file and config) and ``tls/`` (the good
credentials; their CA's key in ``tls/ca/``).

On the way out, also on an error in the ``with`` body, the lab kills sshd's sessions (and what
runs in them), stops and reaps sshd and deletes both namespaces. Processes the caller started in
a namespace (a QEMU, a ``qemu-nbd``) are the caller's to stop first: deleting a namespace only
removes its name, and it lives on, with its end of the link, while a process is still in it.

Needs root, ``ip`` (iproute2) with network namespaces, OpenSSH's ``sshd``, ``ssh`` and
``ssh-keygen``, and ``openssl``: otherwise a :class:`~livemig.transports.errors.ToolError` says
which is missing (``scripts/setup.sh`` installs them all).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import attrs

from livemig.transports.errors import ToolError
from livemig.transports.tls import CA, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY

__all__ = ["NetnsHost", "TwoHosts", "X509Ca", "make_x509_dir", "two_hosts"]

_SUBNET = "10.199.77"  # exists only inside the lab's namespaces
_PREFIX_LEN = 24
_SSH_PORT = 22
_TARGET_NAME = "lm-target"
_ELSEWHERE = ("lm-elsewhere", f"{_SUBNET}.99")  # names no lab host has
_PRIVSEP_DIR = Path("/run/sshd")  # compiled into Debian's sshd, which will not start without it
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"  # where sshd is when it is not on PATH
# Generous bounds: they only matter when something is broken, and a loaded machine is slow.
_COMMAND_TIMEOUT = 60.0  # seconds for one command the lab runs
_SSHD_READY_TIMEOUT = 60.0  # seconds for sshd to accept the first login
_SSHD_STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
_LINK_UP_TIMEOUT = 30.0  # seconds for both ends of the link to be up
_KILL_TIMEOUT = 30.0  # seconds for a SIGKILLed process to be dead
_POLL_INTERVAL = 0.05
_LOG_TAIL = 4096


@attrs.frozen
class NetnsHost:
    """One "host": a network namespace and its end of the link."""

    netns: str  #: the namespace's name (``ip netns``)
    address: str  #: its IPv4 address on the link
    interface: str  #: its end of the veth link

    @property
    def wrapper(self) -> tuple[str, ...]:
        """The command that runs its arguments in this namespace, and execs them (the pid of a
        process started so is the program's): ``launch(…, wrapper=host.wrapper)``."""
        return ("ip", "netns", "exec", self.netns)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` to be run in this namespace."""
        return [*self.wrapper, *argv]


@attrs.frozen
class X509Ca:
    """A certificate authority made for tests: its certificate and its private key."""

    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path, *, name: str = "livemig test CA") -> X509Ca:
        """A new CA (EC P-256, ten years) in ``directory`` (made 0700): ``ca-cert.pem`` and
        ``ca-key.pem`` (0600)."""
        _private_mkdir(directory)
        ca = cls(cert=directory / CA, key=directory / "ca-key.pem")
        _openssl(
            *("req", "-x509", "-new", "-nodes", "-days", "3650"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-keyout", str(ca.key), "-out", str(ca.cert), "-subj", f"/CN={name}"),
            *("-addext", "basicConstraints=critical,CA:TRUE"),
            *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        )
        ca.key.chmod(0o600)
        return ca


def make_x509_dir(
    directory: Path,
    *,
    server_names: Sequence[str],
    ca: X509Ca | None = None,
    client_name: str = "livemig-client",
    days: int = 30,
) -> Path:
    """Credentials in QEMU's ``tls-creds-x509`` layout, for both ends, in ``directory``.

    ``ca-cert.pem``; ``server-cert.pem`` and ``server-key.pem`` for a TLS server (serverAuth)
    whose subjectAltName has every one of ``server_names`` (an IP address as an IP address, any
    other as a DNS name; the first is also its common name); ``client-cert.pem`` and
    ``client-key.pem`` for a TLS client (clientAuth) called ``client_name``. EC P-256 keys, with
    the key usages QEMU's sanity check of the files wants. The directory is 0700, the keys 0600.

    :param ca: the CA that signs both certificates; ``None``: a new one, in ``directory/ca``.
    :param days: how long both certificates are valid from now; ``-1``: they expired yesterday.
    :return: ``directory``.
    """
    if not server_names:
        raise ValueError("a server certificate needs at least one name")
    _private_mkdir(directory)
    ca = ca if ca is not None else X509Ca.create(directory / "ca")
    if ca.cert != directory / CA:
        shutil.copyfile(ca.cert, directory / CA)
    leaf = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
    ]
    sans = ",".join(_san(name) for name in server_names)
    server = [*leaf, "extendedKeyUsage=serverAuth", f"subjectAltName={sans}"]
    client = [*leaf, "extendedKeyUsage=clientAuth"]
    with tempfile.TemporaryDirectory(prefix="livemig-x509-") as scratch:
        for cert, key, common_name, extensions in (
            (SERVER_CERT, SERVER_KEY, server_names[0], server),
            (CLIENT_CERT, CLIENT_KEY, client_name, client),
        ):
            _issue(
                ca,
                cert=directory / cert,
                key=directory / key,
                common_name=common_name,
                extensions=extensions,
                days=days,
                scratch=Path(scratch),
            )
    return directory


@attrs.frozen
class TwoHosts:
    """The lab :func:`two_hosts` made: see the module's documentation."""

    source: NetnsHost
    target: NetnsHost
    #: The target's name: the ``Host`` of :attr:`ssh_config`, a DNS name of its server certificate.
    target_name: str
    #: An OpenSSH client config that reaches the target as :attr:`target_name` from the source
    #: namespace, as root, with the lab's key and host key only (nothing from ``~/.ssh``).
    ssh_config: Path
    #: Good credentials in QEMU's layout: the server certificate names :attr:`target_name` and
    #: the target's address, both certificates are signed by :attr:`ca`.
    tls_dir: Path
    ca: X509Ca
    sshd_pid: int

    def ssh_argv(self, *command: str, options: Sequence[str] = ()) -> list[str]:
        """``ssh`` from the source to the target, running ``command`` there."""
        ssh = ["ssh", "-F", str(self.ssh_config), *options, self.target_name, *command]
        return self.source.argv(ssh)

    def link_down(self) -> None:
        """Cut the link: both ends down (no packet passes; connections stall, new ones fail)."""
        for host in (self.source, self.target):
            _run(["ip", "-n", host.netns, "link", "set", host.interface, "down"])

    def link_up(self) -> None:
        """Restore the link cut by :meth:`link_down`; returns once both ends are up (packets
        pass: a connection that stalled goes on)."""
        _link_up(self.source, self.target)

    def kill_ssh_sessions(self) -> None:
        """Drop every ssh connection: SIGKILL sshd's per-connection processes and what runs under
        them, and return once they are dead. The listening sshd stays and takes new ones."""
        with contextlib.ExitStack() as close:
            pidfds = []
            for pid, parent in _descendants(self.sshd_pid):
                pidfd = _pidfd(pid, parent)
                if pidfd is not None:
                    close.callback(os.close, pidfd)
                    pidfds.append(pidfd)
            for pidfd in pidfds:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            _wait_exited(pidfds)

    def x509_dir_of_another_ca(self, directory: Path) -> Path:
        """Credentials like :attr:`tls_dir`'s (the same names) from a CA of their own: a peer
        with the good ones refuses them, and they refuse it."""
        return make_x509_dir(directory, server_names=(self.target_name, self.target.address))

    def x509_dir_naming_elsewhere(self, directory: Path) -> Path:
        """Credentials from the lab's CA whose server certificate names neither
        :attr:`target_name` nor the target's address."""
        return make_x509_dir(directory, server_names=_ELSEWHERE, ca=self.ca)


@contextlib.contextmanager
def two_hosts(directory: Path) -> Iterator[TwoHosts]:
    """Make the lab under ``directory``, yield it, and tear it down (see the module).

    Returns once an ssh login from the source to the target has worked.

    :raise ToolError: when a tool the lab needs is missing or fails, or sshd does not accept a
        login in time (with the end of its log).
    """
    tools = _required_tools()
    directory.mkdir(parents=True, exist_ok=True)
    suffix = secrets.token_hex(4)
    source = NetnsHost(f"lm-src-{suffix}", f"{_SUBNET}.1", "lm-veth0")
    target = NetnsHost(f"lm-dst-{suffix}", f"{_SUBNET}.2", "lm-veth1")
    with contextlib.ExitStack() as undo:
        for host in (source, target):
            _run(["ip", "netns", "add", host.netns])
            undo.callback(_run, ["ip", "netns", "delete", host.netns])
        _connect(source, target)
        ca = X509Ca.create(directory / "tls" / "ca")
        tls_dir = make_x509_dir(
            directory / "tls", server_names=(_TARGET_NAME, target.address), ca=ca
        )
        ssh_config = _make_ssh_files(directory / "ssh", target)
        sshd = _start_sshd(tools["sshd"], directory / "ssh", target)
        undo.callback(_stop_sshd, sshd)
        hosts = TwoHosts(source, target, _TARGET_NAME, ssh_config, tls_dir, ca, sshd.pid)
        undo.callback(hosts.kill_ssh_sessions)  # before sshd stops: its sessions outlive it
        _wait_ssh_login(hosts, sshd, directory / "ssh" / "sshd.log")
        yield hosts


def _required_tools() -> dict[str, str]:
    if os.geteuid() != 0:
        raise ToolError(["ip", "netns", "add"], 1, "the two-host lab needs root")
    found = {tool: shutil.which(tool) for tool in ("ip", "ssh", "ssh-keygen", "openssl")}
    found["sshd"] = shutil.which("sshd") or shutil.which("sshd", path=_SBIN)
    for tool, path in found.items():
        if path is None:
            raise ToolError([tool], 127, f"{tool} is not installed (scripts/setup.sh installs it)")
    return {tool: path for tool, path in found.items() if path is not None}


def _run(argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> str:
    """Run one command of the lab's and return its stdout.

    :raise ToolError: when it fails or outlives a generous bound.
    """
    try:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_COMMAND_TIMEOUT,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise ToolError(argv, -signal.SIGKILL, f"no answer in {_COMMAND_TIMEOUT} s") from err
    except OSError as err:
        raise ToolError(argv, 127, f"cannot run {argv[0]}: {err}") from err
    if result.returncode != 0:
        raise ToolError(argv, result.returncode, result.stderr)
    return result.stdout


def _openssl(*args: str) -> None:
    # The system's trust store is of no use here, and openssl's x509 command parses all of it
    # for nothing (some 40 ms a certificate): pointed at nothing.
    _run(
        ["openssl", *args],
        env={**os.environ, "SSL_CERT_FILE": os.devnull, "SSL_CERT_DIR": os.devnull},
    )


def _private_mkdir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)


def _san(name: str) -> str:
    try:
        return f"IP:{ipaddress.ip_address(name)}"
    except ValueError:
        return f"DNS:{name}"


def _issue(
    ca: X509Ca,
    *,
    cert: Path,
    key: Path,
    common_name: str,
    extensions: Sequence[str],
    days: int,
    scratch: Path,
) -> None:
    """A new key and a certificate for it signed by ``ca``."""
    request, extfile = scratch / f"{cert.name}.csr", scratch / f"{cert.name}.ext"
    extfile.write_text("".join(f"{line}\n" for line in extensions))
    _openssl(
        *("req", "-new", "-nodes", "-subj", f"/CN={common_name}"),
        *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
        *("-keyout", str(key), "-out", str(request)),
    )
    key.chmod(0o600)
    _openssl(
        *("x509", "-req", "-in", str(request), "-out", str(cert)),
        *("-CA", str(ca.cert), "-CAkey", str(ca.key), "-days", str(days)),
        # A serial of its own: -CAcreateserial would write a file next to the CA's.
        *("-set_serial", str(secrets.randbits(63)), "-extfile", str(extfile)),
    )


def _connect(source: NetnsHost, target: NetnsHost) -> None:
    """The veth link, made right in the namespaces: no interface or address outside them."""
    _run(
        [
            *("ip", "-n", source.netns, "link", "add", source.interface, "type", "veth"),
            *("peer", "name", target.interface, "netns", target.netns),
        ]
    )
    for host in (source, target):
        address = f"{host.address}/{_PREFIX_LEN}"
        _run(["ip", "-n", host.netns, "addr", "add", address, "dev", host.interface])
        _run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
    _link_up(source, target)


def _link_up(*hosts: NetnsHost) -> None:
    """Both ends up, then wait until the kernel says so: a veth end's operational state follows
    its peer's a moment later (the kernel's link watch), and until then it sends nothing."""
    for host in hosts:
        _run(["ip", "-n", host.netns, "link", "set", host.interface, "up"])
    deadline = time.monotonic() + _LINK_UP_TIMEOUT
    for host in hosts:
        argv = ["ip", "-n", host.netns, "-o", "link", "show", "dev", host.interface]
        while " state UP " not in (shown := _run(argv)):
            if time.monotonic() > deadline:
                raise ToolError(argv, 0, f"{host.interface} is not up: {shown}")
            time.sleep(_POLL_INTERVAL)


def _quoted(path: Path) -> str:
    return f'"{path}"'


def _make_ssh_files(ssh_dir: Path, target: NetnsHost) -> Path:
    """sshd's config and host key, the client's key, known-hosts file and config."""
    _private_mkdir(ssh_dir)
    host_key, client_key = ssh_dir / "host_ed25519_key", ssh_dir / "client_ed25519_key"
    for key, comment in ((host_key, "livemig-lab-host"), (client_key, "livemig-lab-client")):
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])
    (ssh_dir / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    host_public = host_key.with_suffix(".pub").read_text().split()
    (ssh_dir / "known_hosts").write_text(f"{_TARGET_NAME} {host_public[0]} {host_public[1]}\n")
    (ssh_dir / "sshd_config").write_text(
        "\n".join(
            [
                f"ListenAddress {target.address}",
                f"Port {_SSH_PORT}",
                f"HostKey {_quoted(host_key)}",
                f"AuthorizedKeysFile {_quoted(ssh_dir / 'authorized_keys')}",
                f"PidFile {_quoted(ssh_dir / 'sshd.pid')}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "AllowStreamLocalForwarding yes",
                "AllowTcpForwarding yes",
                "StreamLocalBindUnlink yes",
                "UseDNS no",
                "PrintMotd no",
                "MaxStartups 64",
                "Subsystem sftp internal-sftp",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    config = ssh_dir / "ssh_config"
    config.write_text(
        "\n".join(
            [
                f"Host {_TARGET_NAME}",
                f"  HostName {target.address}",
                f"  Port {_SSH_PORT}",
                "  User root",
                f"  IdentityFile {_quoted(client_key)}",
                "  IdentitiesOnly yes",
                "  IdentityAgent none",
                f"  UserKnownHostsFile {_quoted(ssh_dir / 'known_hosts')}",
                f"  GlobalKnownHostsFile {os.devnull}",
                f"  HostKeyAlias {_TARGET_NAME}",
                "  StrictHostKeyChecking yes",
                "  UpdateHostKeys no",
                "  BatchMode yes",
                "  PasswordAuthentication no",
                "  KbdInteractiveAuthentication no",
                "  ConnectTimeout 10",
                "  LogLevel ERROR",
                "",
            ]
        )
    )
    return config


def _start_sshd(sshd: str, ssh_dir: Path, target: NetnsHost) -> subprocess.Popen[bytes]:
    """sshd in the target namespace, in the foreground (``-D``: the process is our child),
    logging to ``ssh_dir/sshd.log``."""
    _PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    argv = [sshd, "-D", "-e", "-f", str(ssh_dir / "sshd_config"), *_sshd_options(sshd, ssh_dir)]
    with (ssh_dir / "sshd.log").open("ab") as log:
        try:
            return subprocess.Popen(
                target.argv(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        except OSError as err:
            raise ToolError(argv, 127, f"cannot start sshd: {err}") from err


def _sshd_options(sshd: str, ssh_dir: Path) -> list[str]:
    """Check the config (``sshd -t``); and where sshd has them (OpenSSH 9.8 on), turn off the
    penalties it gives an address whose connections end without a login or are killed, which
    would lock the source out after :meth:`TwoHosts.kill_ssh_sessions`."""
    check = [sshd, "-t", "-f", str(ssh_dir / "sshd_config")]
    penalties = ["-o", "PerSourcePenalties=no"]
    try:
        _run([*check, *penalties])
    except ToolError as err:
        if "PerSourcePenalties" not in err.stderr:
            raise
        _run(check)
        return []
    return penalties


def _wait_ssh_login(hosts: TwoHosts, sshd: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until ``ssh target true`` from the source works: sshd listens and lets us in."""
    deadline = time.monotonic() + _SSHD_READY_TIMEOUT
    argv = hosts.ssh_argv("true")
    while True:
        if (returncode := sshd.poll()) is not None:
            raise ToolError(["sshd"], returncode, _tail(log))
        try:
            _run(argv)
        except ToolError as err:
            if time.monotonic() > deadline:
                raise ToolError(
                    argv, err.returncode, f"{err.stderr.strip()}; sshd's log: {_tail(log)}"
                ) from err
            time.sleep(_POLL_INTERVAL)
        else:
            return


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _LOG_TAIL))
        return f.read().decode(errors="replace").strip()
    return ""


def _stop_sshd(sshd: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it lingers; reaped either way."""
    sshd.terminate()
    try:
        sshd.wait(_SSHD_STOP_GRACE)
    except subprocess.TimeoutExpired:
        sshd.kill()
        sshd.wait()


def _parent(pid: int) -> int | None:
    """The parent of a live process (``/proc/<pid>/stat``); ``None`` when it is gone or a zombie
    (dead, its exit status not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in {"Z", "X"} else int(fields[1])


def _pidfd(pid: int, parent: int) -> int | None:
    """A pidfd of ``pid`` if it still runs under the ``parent`` it was listed under (a pid reused
    meanwhile is no process of the tree), else ``None``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if _parent(pid) != parent:
        os.close(pidfd)
        return None
    return pidfd


def _wait_exited(pidfds: Sequence[int]) -> None:
    """Wait until every process exited (a pidfd turns readable): a SIGKILLed process dies once it
    is next scheduled, on a loaded machine a while later."""
    poller = select.poll()
    for pidfd in pidfds:
        poller.register(pidfd, select.POLLIN)
    waiting, deadline = len(pidfds), time.monotonic() + _KILL_TIMEOUT
    while waiting:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ToolError(["kill", "-KILL"], 0, f"{waiting} of sshd's sessions outlive SIGKILL")
        for pidfd, _ in poller.poll(remaining * 1000):
            poller.unregister(pidfd)
            waiting -= 1


def _descendants(pid: int) -> list[tuple[int, int]]:
    """The live processes under ``pid`` with their parents, parents before their children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        parent = _parent(int(entry.name)) if entry.name.isdigit() else None
        if parent is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found: list[tuple[int, int]] = []
    queue = [(child, pid) for child in children.get(pid, [])]
    while queue:
        child, parent = queue.pop(0)
        found.append((child, parent))
        queue += [(grandchild, child) for grandchild in children.get(child, [])]
    return found
