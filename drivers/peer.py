"""Which process listens on a QMP socket, and the command line it runs.

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
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

from livemig.transports.errors import UsageError

__all__ = ["qemu_argv", "qmp_peer_pid", "read_cmdline"]

_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
_CONNECT_TIMEOUT = 5.0  # seconds; a unix connect completes at once or not at all


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
