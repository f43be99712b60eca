"""Start a migration target QEMU on this host, for a running source (``livemig migrate --to
local``).

`launch_local_target` asks the source what it runs (`livemig.drivers.peer.describe_qemu`), derives
the target from it (`derive_local_target`, pure) and starts it (`start_local_target`):

- **The command line** is the source's, rewritten by `livemig.drivers.cmdline.derive_target`: the
  target's QMP socket is the source's name in the target dir, its other sockets and files go there
  too, the machine type is the versioned one the source runs, ``-S -incoming defer``. The disks
  the caller copies (``copy_disks``: the non-shared ones) become files of the same name in the
  target dir; every other image keeps its path (shared disks, read-only media, firmware). QEMU is
  started in the source's working directory, so relative paths mean what they meant to it.
- **The images** are created empty and sparse, 0600, with the source's format and virtual size: a
  raw file is truncated to size, a qcow2 is the project's own empty image
  (`livemig.drivers.qcow2`) with no backing file: the copy of the base flattens the source's chain.
- **Detached**: QEMU is started by a small starter (livemig's Python, ``-I -S``: some 20 ms) in
  a session of its own, stdin ``/dev/null``, stdout and stderr to a log in the target dir (0600),
  and the starter exits once QEMU's monitor answers: QEMU is then no child of livemig (init
  adopts it), gets no signal from livemig's terminal, and outlives livemig. Until then it is the
  starter's child: its pid cannot be reused, the starter reports its exit status if it fails, and
  killing the starter's process group takes QEMU with it. A serial console on stdio therefore
  writes to the log (`LocalTarget.serial` says so). Not a ``sh -c '… &'``: a shell starts a
  background job with SIGINT and SIGQUIT ignored, and QEMU would keep SIGQUIT so.
- **Ready** when its monitor greets and answers ``qmp_capabilities`` (a greeting alone comes before
  QEMU has set up its signal handlers: a SIGTERM then would kill it without cleanup).

Refused with `UsageError` before anything is created: a copied disk the source does not run as a
writable image, a target dir that is a copied disk's own directory, a target dir that is no
directory (or whose parent is none), a QMP socket path too long for a unix socket, and any path the
launch would create (an image, the log, a socket or file of QEMU's) that exists already; and all
that the derivation refuses. A QEMU that exits before its monitor answers, or does not answer in
time, is a `ProcessError` with the end of its log; whatever the launch created is removed first,
also when it is cancelled.

`LocalTarget.remove` undoes a launch: it stops the QEMU (SIGTERM, SIGKILL after a grace; through a
pidfd, after checking by its start time that the pid is still that QEMU's), deletes the images and
files the launch created and no other, and the target dir if the launch created it and it is empty.

Not handled: a host whose init does not reap orphans keeps an exited target as a zombie (its files
are removed all the same; `LocalTarget.running` counts a zombie as exited). The target gets
livemig's environment, not the source's.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import attrs
import trio

from livemig.drivers import qcow2
from livemig.drivers.cmdline import (
    Suboption,
    default_disk_map,
    derive_target,
    parse_argv,
    split_suboptions,
)
from livemig.drivers.image import COPIED_FORMATS, ImageFormat
from livemig.drivers.peer import MONITOR_TIMEOUT, PeerQemu, describe_qemu
from livemig.drivers.process import qmp_answers
from livemig.transports.errors import ProcessError, UsageError

__all__ = [
    "START_TIMEOUT",
    "STOP_GRACE",
    "DiskImage",
    "LaunchPlan",
    "LocalTarget",
    "derive_local_target",
    "launch_local_target",
    "start_local_target",
]

#: Seconds a target may take from its start until its monitor answers (*measured* well under one
#: for the test guest under TCG; a busy host takes longer).
START_TIMEOUT = 30.0
#: Seconds `LocalTarget.remove` gives QEMU to exit on SIGTERM before it sends SIGKILL.
STOP_GRACE = 5.0
_KILL_TIMEOUT = 5.0  # seconds for a process to be gone after SIGKILL (or the starter to exit)
_POLL_INTERVAL = 0.02  # seconds between looks at the target's QMP socket
_SUN_PATH_MAX = 107  # bytes of a unix socket's path (sun_path[108], with its NUL)
_TAIL_BYTES = 4096
_LOG_NAME = "qemu.log"
#: Run as ``python -I -S -c STARTER ARGV…`` with stdin and stdout pipes to livemig and stderr on
#: the log: forks and execs ARGV as ``subprocess`` would (stdin ``/dev/null``, stdout on the log,
#: the signals Python ignores back to their defaults; not ``posix_spawn``, which leaves glibc's
#: internal signals ignored) and prints its pid; then a line on stdin lets the starter exit and
#: QEMU go, and the end of stdin makes it wait for QEMU and print its exit status (negative: the
#: signal that killed it). A program that cannot be run exits with status 127.
_STARTER = """\
import os, signal, sys
argv = sys.argv[1:]
pid = os.fork()
if pid == 0:
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(2, 1)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.execvp(argv[0], argv)
    except OSError as err:
        print(f"{argv[0]}: {err.strerror}", file=sys.stderr, flush=True)
    os._exit(127)
print(pid, flush=True)
if not sys.stdin.readline():
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def _image_format(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in COPIED_FORMATS:
        choices = ", ".join(COPIED_FORMATS)
        raise UsageError(f"{attribute.name} must be one of {choices}, not {value!r}")


def _image_size(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not 0 < value <= qcow2.MAX_SIZE:
        raise UsageError(
            f"{attribute.name} must be between 1 and {qcow2.MAX_SIZE} bytes, not {value!r}"
        )


@attrs.frozen
class DiskImage:
    """The target's image of one copied disk: empty, of the source's format and virtual size.

    :param format: ``raw`` or ``qcow2`` (a qcow2 target has no backing file: the copy of the
        source's base flattens its chain into it).
    :param virtual_size: the size the guest sees, in bytes.
    """

    format: ImageFormat = attrs.field(validator=_image_format)
    virtual_size: int = attrs.field(validator=_image_size)


@attrs.frozen
class LaunchPlan:
    """Everything `start_local_target` will do, decided (by `derive_local_target`).

    :param argv: the target's command line.
    :param cwd: the directory to start it in (the source's); ``None``: livemig's.
    :param directory: the target dir.
    :param qmp: the target's QMP socket.
    :param log: the file QEMU's stdout and stderr go to.
    :param serial: what the target's first serial console writes to, when it is a file: the log
        for a console on stdio, the file of a ``file:`` console; ``None`` for any other (a
        socket, none).
    :param disks: each copied disk's source image (as on the source's command line) → its
        target image.
    :param images: each target image → what to create there.
    :param files: the sockets and files QEMU creates in the target dir (its QMP socket first).
    """

    argv: tuple[str, ...]
    cwd: Path | None
    directory: Path
    qmp: Path
    log: Path
    serial: Path | None
    disks: Mapping[str, Path]
    images: Mapping[Path, DiskImage]
    files: tuple[Path, ...]

    def to_json(self) -> dict[str, Any]:
        """As JSON, for a launch on another host (``livemig remote-target launch``)."""
        return {
            "argv": list(self.argv),
            "cwd": _opt(self.cwd),
            "directory": os.fspath(self.directory),
            "qmp": os.fspath(self.qmp),
            "log": os.fspath(self.log),
            "serial": _opt(self.serial),
            "disks": {k: os.fspath(v) for k, v in self.disks.items()},
            "images": {
                os.fspath(k): {"format": v.format, "virtual_size": v.virtual_size}
                for k, v in self.images.items()
            },
            "files": [os.fspath(f) for f in self.files],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LaunchPlan:
        """Read :meth:`to_json`'s form.

        :raise UsageError: when it is not that form.
        """
        try:
            return cls(
                argv=tuple(str(a) for a in data["argv"]),
                cwd=_path(data["cwd"]),
                directory=Path(data["directory"]),
                qmp=Path(data["qmp"]),
                log=Path(data["log"]),
                serial=_path(data["serial"]),
                disks={str(k): Path(v) for k, v in data["disks"].items()},
                images={
                    Path(k): DiskImage(format=v["format"], virtual_size=int(v["virtual_size"]))
                    for k, v in data["images"].items()
                },
                files=tuple(Path(f) for f in data["files"]),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise UsageError(f"not a launch plan: {err!r}") from err


def _opt(path: Path | None) -> str | None:
    return os.fspath(path) if path is not None else None


def _path(value: object) -> Path | None:
    return Path(str(value)) if value is not None else None


def _absolute(path: str | os.PathLike[str], base: Path | None = None) -> Path:
    """``path`` made absolute against ``base`` (else livemig's working directory), normalized."""
    joined = posixpath.join(os.fspath(base), os.fspath(path)) if base is not None else path
    return Path(os.path.abspath(joined))


def derive_local_target(
    source: PeerQemu,
    *,
    source_qmp: Path,
    target_dir: Path,
    copy_disks: Mapping[str, DiskImage],
) -> LaunchPlan:
    """The plan of a target for ``source`` in ``target_dir``. Pure: reads nothing.

    :param source_qmp: the source's QMP socket (its name is the target's socket's name).
    :param copy_disks: the source's image files (as on its command line) the target gets its own
        copy of, and what that copy is; every other image is opened where it is.
    :raise UsageError: for a copied disk that is no writable image of the source, a target dir
        that holds a copied disk, a target QMP socket path too long, and what
        `livemig.drivers.cmdline.derive_target` refuses.
    """
    directory = _absolute(target_dir)
    source_qmp = _absolute(source_qmp)
    writable = source.disk_files
    for path in copy_disks:
        if path not in writable:
            raise UsageError(
                f"the source runs no writable disk image {path} "
                f"(its writable images: {', '.join(writable) or 'none'})"
            )
        if _absolute(path, source.cwd).parent == directory:
            raise UsageError(
                f"the target dir {directory} holds the source's disk {path}: choose another"
            )
    qmp = directory / source_qmp.name
    if len(os.fsencode(qmp)) > _SUN_PATH_MAX:
        raise UsageError(
            f"the target's QMP socket {qmp} is longer than a unix socket path may be "
            f"({_SUN_PATH_MAX} bytes): choose a shorter target dir"
        )
    disk_map = default_disk_map(list(copy_disks), os.fspath(directory))
    derived = derive_target(
        source.argv,
        target_qmp=os.fspath(qmp),
        target_dir=os.fspath(directory),
        machine_type=source.machine,
        disk_map=disk_map,
        source_qmp=os.fspath(source_qmp),
    )
    log = _free_name(directory, _LOG_NAME, {*derived.files, *disk_map.values()})
    return LaunchPlan(
        argv=derived.argv,
        cwd=source.cwd,
        directory=directory,
        qmp=qmp,
        log=log,
        serial=_serial_output(derived.argv, log),
        disks={path: Path(disk_map[path]) for path in copy_disks},
        images={Path(disk_map[path]): disk for path, disk in copy_disks.items()},
        files=tuple(Path(f) for f in derived.files),
    )


def _free_name(directory: Path, name: str, taken: set[str]) -> Path:
    """``directory/name``, or ``name-1`` and so on when the derivation handed that out."""
    stem, ext = posixpath.splitext(name)
    candidate, n = directory / name, 1
    while os.fspath(candidate) in taken:
        candidate, n = directory / f"{stem}-{n}{ext}", n + 1
    return candidate


def _last(subs: Sequence[Suboption], key: str) -> str | None:
    return next((s.value for s in reversed(subs) if s.key == key), None)


def _serial_output(argv: Sequence[str], log: Path) -> Path | None:
    """The file the first serial console of ``argv`` writes to, when QEMU runs with stdout on
    ``log``: see `LaunchPlan.serial`."""
    _binary, options = parse_argv(argv)
    chardevs: dict[str, list[Suboption]] = {}
    for option in options:
        if option.name == "chardev" and option.arg is not None:
            subs = split_suboptions(option.arg)
            if (ident := _last(subs, "id")) is not None:
                chardevs[ident] = subs
    serials = [option.arg or "" for option in options if option.name == "serial"]
    if not serials:  # QEMU's default: -nographic puts a serial console on stdio
        names = {option.name for option in options}
        return log if "nographic" in names and "nodefaults" not in names else None
    spec = serials[0].removeprefix("mon:")
    if spec == "stdio":
        return log
    if spec.startswith("file:"):
        return Path(spec.removeprefix("file:"))
    if spec.startswith("chardev:"):
        subs = chardevs.get(spec.removeprefix("chardev:"), [])
        backend = subs[0].value if subs and subs[0].key is None else _last(subs, "backend")
        if backend == "stdio":
            return log
        if backend == "file" and (path := _last(subs, "path")) is not None:
            return Path(path)
    return None


# ---- the process ---------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """The state letter and start time (clock ticks after boot) of process ``pid``, from
    ``/proc/PID/stat``; ``None`` when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name in (…) may hold spaces
    return fields[0], int(fields[19])


def _runs(pid: int, start_time: int) -> bool:
    """Whether process ``pid`` is the one started at ``start_time`` and has not exited."""
    stat = _proc_stat(pid)
    return stat is not None and stat[1] == start_time and stat[0] not in {"Z", "X"}


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


@attrs.frozen
class LocalTarget:
    """A target QEMU that `start_local_target` started, and what it created for it.

    :param qmp: its QMP socket.
    :param pid: its process id (not livemig's child).
    :param serial: what its first serial console writes to (`LaunchPlan.serial`).
    :param log: its stdout and stderr.
    :param disks: each copied disk's source image → its target image.
    :param argv: its command line.
    :param directory: the target dir.
    :param created_dir: whether the launch created the target dir.
    :param files: the other paths the launch created or had QEMU create: the log, the QMP socket
        and QEMU's other sockets and files in the target dir.
    :param start_time: its start time (``/proc/PID/stat``), which tells it from a later process
        that got the same pid.
    """

    qmp: Path
    pid: int
    serial: Path | None
    log: Path
    disks: Mapping[str, Path]
    argv: tuple[str, ...]
    directory: Path
    created_dir: bool
    files: tuple[Path, ...]
    start_time: int

    def to_json(self) -> dict[str, Any]:
        """All of it as JSON (a remote target's, journalled for ``livemig recover``)."""
        return {
            **self.as_json(),
            "argv": list(self.argv),
            "directory": os.fspath(self.directory),
            "created_dir": self.created_dir,
            "files": [os.fspath(f) for f in self.files],
            "start_time": self.start_time,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LocalTarget:
        """Read :meth:`to_json`'s form.

        :raise UsageError: when it is not that form.
        """
        try:
            return cls(
                qmp=Path(data["qmp"]),
                pid=int(data["pid"]),
                serial=_path(data["serial"]),
                log=Path(data["log"]),
                disks={str(k): Path(v) for k, v in data["disks"].items()},
                argv=tuple(str(a) for a in data["argv"]),
                directory=Path(data["directory"]),
                created_dir=bool(data["created_dir"]),
                files=tuple(Path(f) for f in data["files"]),
                start_time=int(data["start_time"]),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise UsageError(f"not a launched target: {err!r}") from err

    def as_json(self) -> dict[str, Any]:
        """The target for a JSON result line: ``qmp``, ``pid``, ``serial``, ``log``, ``disks``."""
        return {
            "qmp": os.fspath(self.qmp),
            "pid": self.pid,
            "serial": os.fspath(self.serial) if self.serial is not None else None,
            "log": os.fspath(self.log),
            "disks": {source: os.fspath(target) for source, target in self.disks.items()},
        }

    def running(self) -> bool:
        """Whether its QEMU still runs (a zombie has exited)."""
        return _runs(self.pid, self.start_time)

    async def remove(self, *, grace: float = STOP_GRACE) -> None:
        """Stop the QEMU if it still runs (SIGTERM; SIGKILL after ``grace`` seconds), then delete
        the images and files the launch created, and the target dir if the launch created it and
        nothing else is in it. Safe to call again. The images go too: call it on a target that did
        not take over the guest.

        :raise ProcessError: when the QEMU is still there after SIGKILL (nothing is deleted).
        """
        await _stop(self.pid, self.start_time, grace)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(
                _delete,
                [*self.disks.values(), *self.files],
                self.directory if self.created_dir else None,
            )


async def _stop(pid: int, start_time: int, grace: float) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not _runs(pid, start_time):  # checked after opening: a match is the process held
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, _KILL_TIMEOUT)):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return
            with trio.move_on_after(wait):
                await trio.lowlevel.wait_readable(pidfd)
                return
        raise ProcessError(f"QEMU {pid} still runs {_KILL_TIMEOUT:g} s after SIGKILL")
    finally:
        os.close(pidfd)


def _delete(paths: Sequence[Path], directory: Path | None) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
    if directory is not None:
        with contextlib.suppress(OSError):  # not empty: something not ours is in it
            directory.rmdir()


@attrs.define
class _Made:
    """What a launch has created so far (what a failed one removes)."""

    paths: list[Path] = attrs.Factory(list)
    directory: Path | None = None


def _create(path: Path, made: _Made) -> int:
    """Create ``path`` (0600), which must not exist; an open descriptor for writing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as err:
        raise UsageError(f"{path} appeared while the target was being created") from err
    except OSError as err:
        raise UsageError(f"cannot create {path}: {err.strerror}") from err
    made.paths.append(path)
    return fd


def _prepare(plan: LaunchPlan, made: _Made) -> None:
    """Check that nothing the plan creates exists, then create the target dir (if needed), the
    log and the raw images, and the qcow2 images' files (still empty)."""
    directory = plan.directory
    if os.path.lexists(directory):
        if not directory.is_dir():
            raise UsageError(f"the target dir {directory} is not a directory")
    elif not directory.parent.is_dir():
        raise UsageError(f"cannot create the target dir {directory}: {directory.parent} is none")
    for path in (*plan.images, plan.log, *plan.files):
        if os.path.lexists(path):
            raise UsageError(
                f"{path} exists: the target's would replace it (remove it, or choose another "
                "target dir)"
            )
    if not os.path.lexists(directory):
        try:
            directory.mkdir(mode=0o700)
        except OSError as err:
            raise UsageError(f"cannot create the target dir {directory}: {err.strerror}") from err
        made.directory = directory
    made.paths.extend(plan.files)  # none exists: whatever is there later is QEMU's
    os.close(_create(plan.log, made))
    for path, disk in plan.images.items():
        fd = _create(path, made)
        try:
            if disk.format == "raw":
                os.ftruncate(fd, disk.virtual_size)  # all of it a hole
        except OSError as err:
            raise UsageError(f"cannot create {path}: {err.strerror}") from err
        finally:
            os.close(fd)


async def start_local_target(
    plan: LaunchPlan, *, start_timeout: float = START_TIMEOUT
) -> LocalTarget:
    """Carry out ``plan``: create the target dir, log and images, start QEMU detached, and return
    once its monitor answers (see the module's documentation). On any failure or cancellation,
    what was created is removed and a started QEMU killed before the error goes on.

    :param start_timeout: seconds from the start until QEMU's monitor answers.
    :raise UsageError: when a path the plan creates exists, or cannot be created.
    :raise ProcessError: when QEMU cannot be started, exits before its monitor answers (with
        its exit status and the end of its log) or does not answer within ``start_timeout``.
    """
    made = _Made()
    try:
        await trio.to_thread.run_sync(_prepare, plan, made)
        for path, disk in plan.images.items():
            if disk.format == "qcow2":
                try:
                    await qcow2.write_empty_qcow2(path, disk.virtual_size)
                except OSError as err:
                    raise UsageError(f"cannot create {path}: {err.strerror}") from err
        pid, start_time = await _start(plan, start_timeout)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_delete, made.paths, made.directory)
        raise
    return LocalTarget(
        qmp=plan.qmp,
        pid=pid,
        serial=plan.serial,
        log=plan.log,
        disks=plan.disks,
        argv=plan.argv,
        directory=plan.directory,
        created_dir=made.directory is not None,
        files=(plan.log, *plan.files),
        start_time=start_time,
    )


async def launch_local_target(
    source_qmp: Path,
    target_dir: Path,
    *,
    copy_disks: Mapping[str, DiskImage],
    source_timeout: float = MONITOR_TIMEOUT,
    start_timeout: float = START_TIMEOUT,
) -> LocalTarget:
    """Start a migration target on this host for the QEMU serving QMP on ``source_qmp``, its
    files in ``target_dir`` (created, 0700, if it does not exist).

    :param copy_disks: the source's image files (as on its command line) that the target gets
        an empty image of, in ``target_dir``, and their format and virtual size: the non-shared
        disks. Every other image is opened at the source's path.
    :param source_timeout: seconds for the source's monitor to answer (one client at a time).
    :param start_timeout: seconds for the target's monitor to answer once started.
    :raise UsageError: as `livemig.drivers.peer.describe_qemu`, `derive_local_target` and
        `start_local_target`; nothing was created.
    :raise ProcessError: as `start_local_target`; nothing is left.
    """
    source = await describe_qemu(_absolute(source_qmp), monitor_timeout=source_timeout)
    plan = derive_local_target(
        source, source_qmp=source_qmp, target_dir=target_dir, copy_disks=copy_disks
    )
    return await start_local_target(plan, start_timeout=start_timeout)


class _Lines:
    """Lines read from the starter's stdout."""

    def __init__(self, stream: trio.lowlevel.FdStream) -> None:
        self.stream = stream
        self._buffer = b""

    async def next(self) -> str | None:
        """The next line; ``None`` at the end of the stream."""
        while b"\n" not in self._buffer:
            chunk = await self.stream.receive_some()
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")


def _spawn(plan: LaunchPlan) -> subprocess.Popen[bytes]:
    cwd = plan.cwd if plan.cwd is not None and plan.cwd.is_dir() else None
    try:
        log = os.open(plan.log, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            # Forked from the calling thread: a fork and an exec of the starter.
            return subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _STARTER, *plan.argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            os.close(log)
    except OSError as err:
        raise ProcessError(f"cannot start {plan.argv[0]}: {err}") from err


def _number(line: str | None) -> int | None:
    try:
        return int(line or "")
    except ValueError:
        return None


async def _start(plan: LaunchPlan, seconds: float) -> tuple[int, int]:
    """Start ``plan.argv`` detached; its pid and start time once its monitor answers."""
    starter = _spawn(plan)
    gate: IO[bytes] | None = starter.stdin
    if gate is None or starter.stdout is None:  # pragma: no cover - both are pipes
        raise ProcessError("the starter has no pipes")
    lines = _Lines(trio.lowlevel.FdStream(os.dup(starter.stdout.fileno())))
    starter.stdout.close()
    try:
        return await _until_ready(plan, seconds, lines, gate, starter)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(starter.pid, signal.SIGKILL)  # the starter leads its group; QEMU is in it
        raise
    finally:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(BrokenPipeError):
                gate.close()
            await _reap(starter)
            await lines.stream.aclose()


async def _until_ready(
    plan: LaunchPlan,
    seconds: float,
    lines: _Lines,
    gate: IO[bytes],
    starter: subprocess.Popen[bytes],
) -> tuple[int, int]:
    """Read QEMU's pid from the starter, wait until its monitor answers and let the starter go;
    or fail, with QEMU's exit status when it exited."""
    deadline = trio.current_time() + seconds
    pid = 0
    with trio.move_on_at(deadline):
        pid = _number(await lines.next()) or 0
    if pid <= 0:
        with trio.move_on_after(_KILL_TIMEOUT):
            await _reap(starter)
        raise ProcessError(
            f"cannot start {plan.argv[0]}",
            returncode=starter.returncode,
            stderr_tail=_tail(plan.log),
        )
    pidfd = os.pidfd_open(pid)  # the starter's child, not reaped: the pid is still QEMU's
    try:
        stat = _proc_stat(pid)
        if stat is None:
            raise ProcessError(f"cannot read /proc/{pid}/stat of the QEMU just started")
        start_time = stat[1]
        try:
            with trio.fail_at(deadline):
                ready = await _wait_ready(pidfd, plan.qmp)
        except trio.TooSlowError as err:
            raise ProcessError(
                f"QEMU did not answer on its QMP socket {plan.qmp} within {seconds:g} s",
                stderr_tail=_tail(plan.log),
            ) from err
    finally:
        os.close(pidfd)
    if not ready:
        gate.close()  # the starter waits for QEMU and prints its exit status
        status = None
        with trio.move_on_after(_KILL_TIMEOUT):
            status = _number(await lines.next())
        raise ProcessError(
            f"QEMU exited before its QMP socket {plan.qmp} answered",
            returncode=status,
            stderr_tail=_tail(plan.log),
        )
    with contextlib.suppress(BrokenPipeError):
        gate.write(b"go\n")
        gate.close()  # the starter exits; QEMU is init's
    return pid, start_time


async def _reap(starter: subprocess.Popen[bytes]) -> None:
    """Wait until the starter exits (bounded: then kill it, not its group) and reap it."""
    if starter.returncode is not None:
        return
    pidfd = os.pidfd_open(starter.pid)  # our child, not reaped yet: the pid is still its own
    try:
        with trio.move_on_after(_KILL_TIMEOUT):
            await trio.lowlevel.wait_readable(pidfd)
        if starter.poll() is None:
            starter.kill()
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    starter.wait()  # exited: returns at once


async def _wait_ready(pidfd: int, qmp: Path) -> bool:
    """Whether QEMU's monitor answered before QEMU (``pidfd``) exited."""
    while True:
        if await qmp_answers(qmp):
            return True
        with trio.move_on_after(_POLL_INTERVAL):
            await trio.lowlevel.wait_readable(pidfd)
            return False
