"""Which process listens on a QMP socket, the command line it runs, and what its monitor says.

`qmp_peer_pid` connects to the socket and asks the kernel for the credentials of the other end
(``SO_PEERCRED``), then closes at once without reading or writing a byte: QMP is never spoken.
Connecting needs no free monitor: a unix socket's peer credentials are those of the process that
put it in the listening state, and the connection completes in the listen backlog even while
QEMU serves another client, who is not disturbed; QEMU later accepts the closed connection, finds
it hung up and listens again. Until then it takes one of the two places in QEMU's backlog
(``listen(fd, 1)``): while a client holds the monitor, two probes fill it, and the next client to
connect is refused with ``EAGAIN``, which qemu.qmp's asyncio reports as ``Invalid argument``
(*measured*). So probe once, best while holding the monitor yourself (``livemig
target-command`` does): the probe is then drained as soon as you leave.

A socket QEMU did not bind itself (handed over as ``-chardev socket,fd=N`` by systemd, libvirt or
a test) names the process that called ``listen()``: `qemu_argv` refuses a command line that is not
a QEMU's.

`describe_qemu` is all a derived target needs to know of its source: the probe above, then the
source's versioned machine type and disks from its monitor, over one QMP connection of its own.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio
import trio_asyncio

from livemig.drivers import block, runstate
from livemig.drivers.qmp import open_monitor
from livemig.transports.errors import QMPError, UsageError

__all__ = [
    "MONITOR_TIMEOUT",
    "PeerQemu",
    "describe_qemu",
    "disk_files",
    "qemu_argv",
    "qmp_peer_pid",
    "read_cmdline",
    "read_cwd",
]

_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
_CONNECT_TIMEOUT = 5.0  # seconds; a unix connect completes at once or not at all
#: Seconds a QEMU's monitor may take to greet and answer (it greets no second client).
MONITOR_TIMEOUT = 10.0
_PROTOCOL = re.compile(r"^(json:|[a-z][a-z0-9+.-]*:)")


def qmp_peer_pid(path: os.PathLike[str] | str) -> int:
    """The pid of the process listening on the unix socket ``path``.

    :raise UsageError: when ``path`` is not a socket, nobody listens on it, or the kernel gives
        no pid (a process in another pid namespace).
    """
    where = os.fspath(path)
    if not Path(where).is_socket():
        raise UsageError(f"{where} does not exist or is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_CONNECT_TIMEOUT)
        try:
            sock.connect(where)
        except (ConnectionRefusedError, FileNotFoundError) as err:
            raise UsageError(f"nothing listens on {where}: {err.strerror}") from err
        except PermissionError as err:
            raise UsageError(f"cannot connect to {where}: {err.strerror}") from err
        except TimeoutError as err:
            raise UsageError(f"connecting to {where} timed out") from err
        except OSError as err:
            if err.errno == errno.EAGAIN:
                raise UsageError(
                    f"{where} accepts no connection now (its backlog is full): try again"
                ) from err
            raise UsageError(f"cannot connect to {where}: {err}") from err
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid: int = _UCRED.unpack(creds)[0]
    if pid <= 0:
        raise UsageError(f"the process listening on {where} is not visible from here")
    return pid


def read_cmdline(pid: int, *, proc: Path = Path("/proc")) -> list[str]:
    """The argv of process ``pid``, from ``/proc/PID/cmdline`` (NUL-separated).

    :raise UsageError: when there is no such process, it is a zombie, or it may not be read.
    """
    where = proc / str(pid) / "cmdline"
    try:
        raw = where.read_bytes()
    except FileNotFoundError as err:
        raise UsageError(f"no process {pid} (it exited?)") from err
    except PermissionError as err:
        raise UsageError(f"may not read the command line of process {pid}: {err}") from err
    except OSError as err:
        raise UsageError(f"cannot read the command line of process {pid}: {err}") from err
    if not raw:
        raise UsageError(f"process {pid} has no command line (it exited?)")
    return [os.fsdecode(word) for word in raw.removesuffix(b"\0").split(b"\0")]


def qemu_argv(path: os.PathLike[str] | str, *, proc: Path = Path("/proc")) -> tuple[int, list[str]]:
    """The pid and argv of the QEMU listening on the QMP socket ``path``.

    :raise UsageError: as `qmp_peer_pid` and `read_cmdline`, and when the listener is not a QEMU
        (the socket was handed to QEMU by the process that created it).
    """
    pid = qmp_peer_pid(path)
    argv = read_cmdline(pid, proc=proc)
    if "qemu" not in Path(argv[0]).name:
        raise UsageError(
            f"{os.fspath(path)} is held by process {pid} ({argv[0]}), not a QEMU: was the socket "
            "passed to QEMU as a file descriptor? Give its own QMP socket"
        )
    return pid, argv


def read_cwd(pid: int, *, proc: Path = Path("/proc")) -> Path | None:
    """The working directory of process ``pid`` (what the relative paths on its command line are
    relative to), or ``None`` when it may not be read."""
    try:
        return Path(os.readlink(proc / str(pid) / "cwd"))
    except OSError:
        return None


def disk_files(devices: Sequence[block.BlockDevice]) -> list[str]:
    """The image files of the disks the guest can write to, in device order (read-only media
    and network images are left out: a target can open them as they are)."""
    return [
        d.filename
        for d in devices
        if d.writable and d.filename is not None and not _PROTOCOL.match(d.filename)
    ]


@attrs.frozen
class PeerQemu:
    """A running QEMU as its QMP socket shows it.

    :param pid: its process id.
    :param argv: its command line.
    :param cwd: its working directory; ``None`` when it may not be read.
    :param machine: the versioned machine type it runs (``pc-q35-10.0``).
    :param devices: its guest's block devices (``query-block``), in device order.
    :param nodes: its block graph (``query-named-block-nodes``): each disk's format and size.
    """

    pid: int
    argv: tuple[str, ...]
    cwd: Path | None
    machine: str
    devices: tuple[block.BlockDevice, ...]
    nodes: tuple[block.BlockNode, ...] = ()

    @property
    def disk_files(self) -> list[str]:
        """See `disk_files`."""
        return disk_files(self.devices)


async def describe_qemu(
    path: Path, *, monitor_timeout: float = MONITOR_TIMEOUT, name: str = "source"
) -> PeerQemu:
    """The QEMU serving QMP on ``path``: its process (`qemu_argv`) and, from its monitor, its
    machine type and disks. Opens a trio-asyncio loop of its own (a caller's may be open).

    :param monitor_timeout: seconds for the whole: the monitor greets one client at a time, and
        one that holds it (a running migration) makes this wait.
    :param name: what the QEMU is to the caller, for the messages (``"source"``).
    :raise UsageError: when the socket is not a QEMU's, its monitor does not answer within
        ``monitor_timeout`` or answers with an error.
    """
    try:
        with trio.fail_after(monitor_timeout):
            async with trio_asyncio.open_loop(), open_monitor(path, name=name) as monitor:
                # Found while the monitor is ours: the probe's connection then waits in QEMU's
                # listen backlog only until we leave, and takes no slot from another client.
                pid, argv = qemu_argv(path)
                machine = await runstate.query_machine(monitor)
                devices = await block.query_block(monitor)
                nodes = await block.query_named_block_nodes(monitor)
    except trio.TooSlowError as err:
        raise UsageError(
            f"the {name}'s monitor {path} did not answer within {monitor_timeout:g} s "
            "(another client connected to it?)"
        ) from err
    except QMPError as err:
        raise UsageError(f"cannot ask the {name}: {err}") from err
    return PeerQemu(
        pid=pid,
        argv=tuple(argv),
        cwd=read_cwd(pid),
        machine=machine,
        devices=devices,
        nodes=nodes,
    )
