"""Start, own and stop QEMU processes.

A :class:`VmSpec` describes one QEMU as data and turns into a command line with the pure
:meth:`VmSpec.argv`. Migration needs the source and the target to be the same machine with the same
devices in the same order, so both sides are built from one spec: the target's differs only in
:attr:`VmSpec.incoming` (``"defer"``) and :attr:`VmSpec.paused` (``-S``), see
:meth:`VmSpec.as_incoming`.

:func:`launch` starts QEMU and returns once its QMP socket accepts connections; the
:class:`QemuProcess` it returns owns the process until :meth:`QemuProcess.stop` has reaped it.
:func:`launched` is the ``async with`` form that always stops it, also when cancelled. Either can
start QEMU through a ``wrapper`` that execs it, such as ``ip netns exec <name>`` (a QEMU in a
network namespace: see :mod:`livemig.guest._hosts`).

Nothing here takes a timeout: wrap calls in :func:`trio.fail_after`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

from livemig.drivers.image import COPIED_FORMATS, ImageFormat
from livemig.transports.children import die_with_parent_hook
from livemig.transports.errors import ProcessError, UsageError

__all__ = [
    "DiskSpec",
    "QemuProcess",
    "VmSpec",
    "find_qemu_processes",
    "launch",
    "launched",
    "qmp_answers",
]

DEFAULT_QEMU = "qemu-system-x86_64"
_QMP_POLL_INTERVAL = 0.02  # seconds between looks at the QMP socket while QEMU starts
_STDERR_TAIL_BYTES = 4096
_GREETING_MAX = 64 * 1024


def _escape(value: str) -> str:
    """Escape a value for QEMU's ``key=value,…`` option syntax, where ``,,`` is a literal comma."""
    return value.replace(",", ",,")


def _positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise UsageError(f"{attribute.name} must be at least 1, not {value}")


def _file_name(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value or "/" in value or value in {".", ".."}:
        raise UsageError(f"{attribute.name} must be usable as a file name, not {value!r}")


def _one_of(*allowed: str) -> Callable[[object, attrs.Attribute[str], str], None]:
    def check(_: object, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in allowed:
            raise UsageError(f"{attribute.name} must be one of {', '.join(allowed)}, not {value!r}")

    return check


@attrs.frozen(kw_only=True)
class DiskSpec:
    """One disk: its image, the nodes QEMU opens it with, and the guest device.

    Two command-line syntaxes (:attr:`syntax`):

    - ``"blockdev"`` (the default): a ``file`` node, a format node on top of it, and the device
      on the format node. The format node is the one to snapshot, mirror or export (``root`` by
      default); its protocol child is ``<node_name>-file``. A qcow2 image's backing chain is
      opened from its header, under names QEMU makes up (``#block123``).
    - ``"drive"``: ``-drive file=…,if=none,id=<drive_id>,format=…`` and the device on that
      BlockBackend; QEMU names every node itself, :attr:`node_name` is not used.

    The guest device is a ``virtio-blk-pci`` disk, or with ``media="cdrom"`` an ``ide-cd``
    drive (on q35's built-in AHCI controller), which is read-only (``read_only`` must be set).
    """

    path: Path = attrs.field(converter=Path)
    node_name: str = "root"
    fmt: ImageFormat = attrs.field(default="raw", validator=_one_of(*COPIED_FORMATS))
    device_id: str = "vda"
    read_only: bool = False
    syntax: Literal["blockdev", "drive"] = attrs.field(
        default="blockdev", validator=_one_of("blockdev", "drive")
    )
    drive_id: str = "drive0"
    media: Literal["disk", "cdrom"] = attrs.field(
        default="disk", validator=_one_of("disk", "cdrom")
    )

    def __attrs_post_init__(self) -> None:
        if self.media == "cdrom" and not self.read_only:
            raise UsageError(f"cd-rom {self.device_id} must be read-only (read_only=True)")

    @property
    def file_node_name(self) -> str:
        """The name of the ``file`` (protocol) node under :attr:`node_name` (``-blockdev``)."""
        return f"{self.node_name}-file"

    @property
    def drive(self) -> str:
        """What the device's ``drive=`` names: the format node (``-blockdev``) or the ``-drive``
        id. Either, like :attr:`device_id`, names the disk in QMP and in ``livemig --disk``."""
        return self.node_name if self.syntax == "blockdev" else self.drive_id

    @property
    def block_names(self) -> tuple[str, ...]:
        """The node and BlockBackend names this disk takes on the command line (one namespace
        in QEMU: no two disks may share one)."""
        if self.syntax == "blockdev":
            return (self.node_name, self.file_node_name)
        return (self.drive_id,)

    def argv(self) -> list[str]:
        """The ``-blockdev``/``-device`` (or ``-drive``/``-device``) options for this disk."""
        device = "ide-cd" if self.media == "cdrom" else "virtio-blk-pci"
        path = _escape(str(self.path))
        if self.syntax == "drive":
            media = ",media=cdrom" if self.media == "cdrom" else ""
            ro = ",readonly=on" if self.read_only else ""
            return [
                "-drive",
                f"file={path},if=none,id={self.drive_id},format={self.fmt}{media}{ro}",
                "-device",
                f"{device},drive={self.drive_id},id={self.device_id}",
            ]
        ro = ",read-only=on" if self.read_only else ""
        return [
            "-blockdev",
            f"driver=file,filename={path},node-name={self.file_node_name},cache.direct=off{ro}",
            "-blockdev",
            f"driver={self.fmt},node-name={self.node_name},file={self.file_node_name}{ro}",
            "-device",
            f"{device},drive={self.node_name},id={self.device_id}",
        ]


def _disk_tuple(disks: Iterable[DiskSpec]) -> tuple[DiskSpec, ...]:
    return tuple(disks)


def _str_tuple(args: Iterable[str]) -> tuple[str, ...]:
    return tuple(args)


def _unique_disks(
    _: object, __: attrs.Attribute[tuple[DiskSpec, ...]], disks: tuple[DiskSpec, ...]
) -> None:
    names = [n for d in disks for n in d.block_names]
    ids = [d.device_id for d in disks]
    if len(set(names)) != len(names) or len(set(ids)) != len(ids):
        raise UsageError("disks must have distinct node names, drive ids and device ids")


@attrs.frozen(kw_only=True)
class VmSpec:
    """Everything needed to start one QEMU, as data.

    :param name: the VM's name, also used for the stderr log file.
    :param qmp_socket: path of the unix socket QEMU listens on for QMP.
    :param accel: ``"tcg"`` (works everywhere, slow) or ``"kvm"`` (``-cpu host`` by default).
    :param cpu: the ``-cpu`` model; ``None`` takes QEMU's default for TCG and ``host`` for KVM.
    :param serial: ``"stdio"`` puts the first serial port on the process's stdin/stdout pipes;
        anything else is passed to ``-serial`` as is (``"none"``, ``"file:PATH"``, …).
    :param incoming: ``-incoming`` argument (``"defer"`` for a migration target).
    :param paused: start with ``-S`` (the CPUs stay stopped until ``cont``).
    :param no_reboot: ``-no-reboot``: a guest reboot or panic ends the process instead.
    """

    name: str = attrs.field(validator=_file_name)
    qmp_socket: Path = attrs.field(converter=Path)
    memory_mib: int = attrs.field(default=512, validator=_positive)
    cpus: int = attrs.field(default=1, validator=_positive)
    machine: str = "q35"
    accel: Literal["tcg", "kvm"] = attrs.field(default="tcg", validator=_one_of("tcg", "kvm"))
    cpu: str | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    disks: tuple[DiskSpec, ...] = attrs.field(
        default=(), converter=_disk_tuple, validator=_unique_disks
    )
    serial: str = "stdio"
    incoming: str | None = None
    paused: bool = False
    no_reboot: bool = False
    extra_args: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)

    @property
    def serial_on_stdio(self) -> bool:
        """Whether the serial console is on the process's stdin/stdout."""
        return self.serial == "stdio"

    def as_incoming(self, *, qmp_socket: Path, name: str | None = None) -> VmSpec:
        """The spec of a migration target for this VM: same machine and devices, its own QMP
        socket, started paused with ``-incoming defer``. Change its disks with
        :func:`attrs.evolve` when the target has its own image."""
        return attrs.evolve(
            self,
            name=name if name is not None else f"{self.name}-target",
            qmp_socket=qmp_socket,
            incoming="defer",
            paused=True,
        )

    def argv(self, qemu_binary: str = DEFAULT_QEMU) -> list[str]:
        """The full QEMU command line. Pure: reads nothing, checks no file."""
        args = [qemu_binary, "-name", _escape(self.name), "-machine", self.machine]
        args += ["-accel", self.accel]
        cpu = self.cpu if self.cpu is not None else ("host" if self.accel == "kvm" else None)
        if cpu is not None:
            args += ["-cpu", cpu]
        args += ["-m", str(self.memory_mib), "-smp", str(self.cpus)]
        args += ["-nodefaults", "-no-user-config", "-display", "none"]
        args += [
            "-chardev",
            f"socket,id=qmp,path={_escape(str(self.qmp_socket))},server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
        ]
        if self.serial_on_stdio:
            args += ["-chardev", "stdio,id=serial0,signal=off", "-serial", "chardev:serial0"]
        else:
            args += ["-serial", self.serial]
        if self.kernel is not None:
            args += ["-kernel", str(self.kernel)]
        if self.initrd is not None:
            args += ["-initrd", str(self.initrd)]
        if self.append:
            args += ["-append", self.append]
        for disk in self.disks:
            args += disk.argv()
        if self.no_reboot:
            args.append("-no-reboot")
        if self.incoming is not None:
            args += ["-incoming", self.incoming]
        if self.paused:
            args.append("-S")
        args += self.extra_args
        return args


def _tail(path: Path, max_bytes: int = _STDERR_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class _Child:
    """A child process started from the calling (trio) thread.

    ``trio.lowlevel.open_process`` forks from a worker thread, and the kernel delivers the
    parent-death signal when the *thread* that forked exits: an idle worker thread retires after
    about 10 s and took the QEMUs with it (*measured*). So the fork happens here, in the thread
    that runs trio for as long as the process lives, and the exit is awaited through a pidfd.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._pidfd = os.pidfd_open(popen.pid)
        self.pid = popen.pid
        self.stdin = trio.lowlevel.FdStream(os.dup(popen.stdin.fileno())) if popen.stdin else None
        self.stdout = (
            trio.lowlevel.FdStream(os.dup(popen.stdout.fileno())) if popen.stdout else None
        )
        for pipe in (popen.stdin, popen.stdout):
            if pipe is not None:
                pipe.close()

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        while (code := self._popen.poll()) is None:
            await trio.lowlevel.wait_readable(self._pidfd)
        with contextlib.suppress(OSError):
            os.close(self._pidfd)
        self._pidfd = -1
        return code

    def send_signal(self, sig: int) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@attrs.define(eq=False)
class QemuProcess:
    """A running (or exited) QEMU that this object owns: stop it with :meth:`stop`."""

    spec: VmSpec
    stderr_path: Path
    _process: _Child = attrs.field(alias="process")

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once QEMU exited (negative: killed by that signal), else ``None``."""
        return self._process.returncode

    @property
    def serial_send_stream(self) -> trio.abc.SendStream:
        """The serial console's input (QEMU's stdin).

        :raise UsageError: when the spec did not put the serial console on stdio.
        """
        if not self.spec.serial_on_stdio or self._process.stdin is None:
            raise UsageError(f"{self.spec.name}: the serial console is not on stdio")
        return self._process.stdin

    @property
    def serial_receive_stream(self) -> trio.abc.ReceiveStream:
        """The serial console's output (QEMU's stdout).

        :raise UsageError: when the spec did not put the serial console on stdio.
        """
        if not self.spec.serial_on_stdio or self._process.stdout is None:
            raise UsageError(f"{self.spec.name}: the serial console is not on stdio")
        return self._process.stdout

    def stderr_tail(self) -> str:
        """The last few KiB QEMU wrote to stderr (for error messages)."""
        return _tail(self.stderr_path)

    async def wait(self) -> int:
        """Wait until QEMU exits and return its exit status."""
        return await self._process.wait()

    def kill(self) -> None:
        """Send SIGKILL (does not wait: follow with :meth:`wait` or :meth:`stop`)."""
        self._process.kill()

    async def stop(self, grace: float = 5.0) -> int:
        """Stop QEMU and reap it: SIGTERM (QEMU shuts down cleanly, removing its sockets), then
        SIGKILL if it has not exited after ``grace`` seconds. Safe to call more than once, and
        on a process that already exited. Returns the exit status."""
        if self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await self._process.wait()
            if self._process.returncode is None:
                self._process.kill()
        returncode = await self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                await stream.aclose()
        return returncode

    async def aclose(self) -> None:
        """Same as :meth:`stop` with the default grace."""
        await self.stop()


async def _socket_accepts(path: Path) -> bool:
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError:
        return False
    await stream.aclose()
    return True


async def _receive_line(stream: trio.SocketStream) -> bytes:
    received = b""
    while b"\n" not in received and len(received) < _GREETING_MAX:
        chunk = await stream.receive_some()
        if not chunk:
            break
        received += chunk
    return received


async def qmp_answers(path: Path) -> bool:
    """Whether QEMU's monitor on ``path`` greets and answers ``qmp_capabilities``.

    A listening socket, or even the greeting, is not enough: QEMU 10 serves QMP from an I/O
    thread and sends the greeting before its main thread has installed its signal handlers
    (*measured*: a SIGTERM then kills it without cleanup, exit status -15, socket left behind).
    Commands are dispatched by the main loop, so an answer means start-up is over.
    """
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError:
        return False
    async with stream:
        try:
            if b'"QMP"' not in await _receive_line(stream):
                return False
            await stream.send_all(b'{"execute": "qmp_capabilities"}\n')
            return b'"return"' in await _receive_line(stream)
        except trio.BrokenResourceError:
            return False


async def _claim_socket_path(path: Path) -> None:
    """Refuse a QMP socket path that a live process listens on; remove a stale one."""
    tpath = trio.Path(path)
    if not await tpath.exists():
        return
    if await _socket_accepts(path):
        raise UsageError(f"QMP socket {path} is in use by another process")
    await tpath.unlink(missing_ok=True)


async def launch(
    spec: VmSpec,
    *,
    work_dir: Path,
    qemu_binary: str = DEFAULT_QEMU,
    die_with_parent: bool = True,
    wrapper: Sequence[str] = (),
) -> QemuProcess:
    """Start QEMU and return once its QMP monitor is up.

    QEMU's stderr goes to ``work_dir/<name>.stderr``. QEMU runs in its own session, so a Ctrl-C
    meant for the caller does not kill the guest behind its back. The readiness check connects to
    the QMP socket once, negotiates capabilities and disconnects; QEMU then accepts the next
    client.

    :param die_with_parent: have the kernel kill QEMU if this process dies (tests, demo).
    :param wrapper: a command put in front of QEMU's command line: a program that sets
        something up and then *execs* its arguments, so that the process started is QEMU itself
        (its pid, its exit status), e.g. ``("ip", "netns", "exec", "<name>")``. Of a wrapper that
        forks instead, the wrapper is what would be stopped and waited for.
    :raise ProcessError: when QEMU cannot be started or exits before its QMP socket is ready
        (the message has its exit status and the tail of its stderr).
    :raise UsageError: when the QMP socket path is in use by a live process.
    """
    await trio.Path(work_dir).mkdir(parents=True, exist_ok=True)
    await _claim_socket_path(spec.qmp_socket)
    stderr_path = work_dir / f"{spec.name}.stderr"
    pipe_or_null = subprocess.PIPE if spec.serial_on_stdio else subprocess.DEVNULL
    options: dict[str, Any] = {"start_new_session": True}
    if die_with_parent:
        options["preexec_fn"] = die_with_parent_hook()
    argv = [*wrapper, *spec.argv(qemu_binary)]
    try:
        # Forked from this thread on purpose: see _Child. fork+exec takes a few milliseconds.
        with stderr_path.open("wb") as stderr:
            popen = subprocess.Popen(  # noqa: ASYNC220
                argv, stdin=pipe_or_null, stdout=pipe_or_null, stderr=stderr, **options
            )
    except OSError as err:
        raise ProcessError(f"cannot start {argv[0]} for {spec.name}: {err}") from err
    qemu = QemuProcess(spec, stderr_path, process=_Child(popen))
    try:
        await _wait_qmp_ready(qemu)
    except BaseException:
        with trio.CancelScope(shield=True):
            await qemu.stop(grace=0)
        raise
    return qemu


async def _wait_qmp_ready(qemu: QemuProcess) -> None:
    while True:
        if qemu.returncode is not None:
            raise ProcessError(
                f"QEMU {qemu.spec.name} exited before its QMP socket was ready",
                returncode=qemu.returncode,
                stderr_tail=qemu.stderr_tail(),
            )
        if await qmp_answers(qemu.spec.qmp_socket):
            return
        await trio.sleep(_QMP_POLL_INTERVAL)


@contextlib.asynccontextmanager
async def launched(
    spec: VmSpec,
    *,
    work_dir: Path,
    qemu_binary: str = DEFAULT_QEMU,
    die_with_parent: bool = True,
    grace: float = 5.0,
    wrapper: Sequence[str] = (),
) -> AsyncIterator[QemuProcess]:
    """``async with launched(spec, work_dir=…) as qemu:`` — :func:`launch`, and on the way out
    (normal, error or cancellation) :meth:`QemuProcess.stop`, shielded from cancellation."""
    qemu = await launch(
        spec,
        work_dir=work_dir,
        qemu_binary=qemu_binary,
        die_with_parent=die_with_parent,
        wrapper=wrapper,
    )
    try:
        yield qemu
    finally:
        with trio.CancelScope(shield=True):
            await qemu.stop(grace)


def find_qemu_processes(directory: Path | str) -> list[int]:
    """PIDs of live ``qemu-system-*`` processes whose command line mentions ``directory``.

    For tests: after cleanup, no QEMU that used a test's temporary directory may remain.
    Reaped processes are gone from ``/proc``; zombies have an empty command line, so neither is
    listed.
    """
    needle = os.fsencode(str(directory))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # exited while we looked
            continue
        if Path(os.fsdecode(argv[0])).name.startswith("qemu-system") and any(
            needle in arg for arg in argv
        ):
            found.append(int(entry.name))
    return sorted(found)
