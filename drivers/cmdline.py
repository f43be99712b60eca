"""A migration target's QEMU command line, derived from the source's. Pure: reads nothing.

The target of a live migration must be the same machine with the same devices as the source, so
the best description of it is the command line the source runs (``/proc/PID/cmdline``, see
`livemig.drivers.peer`). `derive_target_argv` rewrites that command line for a second QEMU on the
same host that waits for the migration stream:

======================================  ============================================================
in the source's command line            in the target's
======================================  ============================================================
the QMP monitor (``-qmp unix:P,…``,     the target's socket (``target_qmp``); a ``-chardev`` with
``-qmp-pretty``, ``-mon chardev=ID,     ``fd=N`` (a socket handed over by its launcher) gets
mode=control`` with ``-chardev          ``path=target_qmp`` instead. When the source has several,
socket,id=ID,path=P,server=on``,        the one on ``source_qmp`` is chosen.
``-qmp chardev:ID``)
other listening unix sockets            a socket of the same name in ``target_dir``: two QEMUs
(``-chardev socket,path=P,server=on``,  cannot bind one path (a second monitor, a serial console,
``-serial``/``-monitor``/``-gdb``/      …)
``-parallel``/``-debugcon unix:P,
server=on``)
files QEMU writes (``-chardev           a file of the same name in ``target_dir``: the target
file,path=P``, ``logfile=P``,           would truncate the source's
``-serial file:P``, ``-D P``,
``-pidfile P``)
``-machine``/``-M`` type (``q35``,      ``machine_type``, the versioned type the source runs
``type=q35``, or none: the default)     (``pc-q35-10.0``), other machine properties kept; with no
                                        type on the command line a ``-machine TYPE`` is added
                                        after the binary
disk images: ``-blockdev … filename=``  ``disk_map[path]`` for each path in the map (source file
(keyval, also ``file.filename=``, or    → target file); a path not in the map is kept (shared
JSON), ``-drive file=``/               storage, read-only media, firmware)
``*.filename=``, ``-hda``…``-hdd``,
``-cdrom``, ``-fda``/``-fdb``,
``-sd``, ``-mtdblock``, ``-pflash``,
a bare image argument
``-daemonize``                          removed: the target is started by whoever runs this
                                        command line and stays in the foreground
``-incoming X``, ``-loadvm X``          removed; ``-incoming defer`` is appended
``-S``                                  kept once; added (once) when missing
``-name``, ``-uuid``, everything else   kept verbatim and in order
======================================  ============================================================

Suboptions are parsed as QEMU does: comma-separated, ``key=value`` or a bare first value (the
implied key: the machine type, the chardev backend, the socket path after ``unix:``), and ``,,`` is
a literal comma. Only the options rewritten are re-serialized (with ``,,`` escaping); every other
argument is passed through byte for byte.

Refused (`UsageError`), because the target could not work: a QMP monitor on ``stdio``; no QMP
monitor on a unix socket, or several without ``source_qmp`` naming one; a file descriptor the
source inherited (``-add-fd``, a ``-chardev``/``-netdev``/``-nic``/``-net`` with ``fd``,
``fds``, ``vhostfd`` or ``vhostfds`` other than the QMP socket's, ``-incoming fd:N``);
``-readconfig`` (options this function cannot see); a disk in ``disk_map`` that the command line
does not open (hot-plugged with ``blockdev-add``: the target would lack it); a rewrite that lands on
the source's own path (``target_dir`` is the source's directory); an option missing its argument.

Not handled, kept verbatim: TCP/UDP listeners (``tcp:…,server=on``, ``-vnc``, ``-spice port=``,
``-gdb tcp::1234``, ``-s``) clash on the same host; network backends (a tap ``ifname=`` is held by
the source); ``-object memory-backend-file,mem-path=``; ``-set`` and ``-global`` (a ``-set`` that
names a disk file is not rewritten); disk paths inside a ``json:{…}`` filename; relative paths
stay relative to the directory QEMU is started in; devices hot-plugged after start
(``device_add``) are not on the command line at all.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from livemig.transports.errors import UsageError

__all__ = [
    "FLAGS",
    "Option",
    "Suboption",
    "TargetCommand",
    "default_disk_map",
    "derive_target",
    "derive_target_argv",
    "join_suboptions",
    "parse_argv",
    "split_suboptions",
]

#: QEMU options that take no argument (``qemu-system-x86_64 -help``, QEMU 10.0, plus the
#: spellings older QEMUs accepted); every other option takes one.
FLAGS = frozenset(
    {
        "h", "help", "version", "mem-prealloc", "snapshot", "usb", "nographic", "full-screen",
        "win2k-hack", "no-fd-bootchk", "preconfig", "S", "s", "enable-kvm", "xen-attach",
        "xen-domid-restrict", "no-reboot", "no-shutdown", "daemonize", "only-migratable",
        "nodefaults", "no-user-config", "enable-sync-profile", "perfmap", "jitdump",
        "no-hpet", "no-acpi", "semihosting", "old-param", "alt-grab", "ctrl-grab", "no-quit",
        "no-frame", "singlestep", "curses", "sdl", "nodefconfig", "enable-fips",
        "rtc-td-hack", "no-kvm", "no-kvm-irqchip", "no-kvm-pit", "no-kvm-pit-reinjection",
        "show-cursor",
    }
)  # fmt: skip

#: The name of a bare argument (QEMU takes it as ``-hda``).
POSITIONAL = ""

_IMAGE_OPTIONS = frozenset(
    {"hda", "hdb", "hdc", "hdd", "cdrom", "fda", "fdb", "sd", "mtdblock", "pflash", POSITIONAL}
)
_COMPAT_CHARDEV_OPTIONS = frozenset(
    {"serial", "parallel", "monitor", "qmp", "qmp-pretty", "debugcon", "gdb"}
)
_CONTROL_COMPAT = frozenset({"qmp", "qmp-pretty"})
_FD_KEYS = frozenset({"fd", "fds", "vhostfd", "vhostfds"})
_ON = frozenset({"on", "yes", "true", "y"})
_MACHINE_SUFFIX = "-machine"


@attrs.frozen
class Option:
    """One option of a QEMU command line.

    :param name: without its dashes (``machine``); `POSITIONAL` for a bare argument.
    :param arg: its argument; ``None`` for a flag.
    :param spelling: as written (``-machine``, ``--machine``; empty for a bare argument).
    """

    name: str
    arg: str | None
    spelling: str

    def argv(self) -> list[str]:
        words = [self.spelling] if self.spelling else []
        return [*words, self.arg] if self.arg is not None else words

    def with_arg(self, arg: str) -> Option:
        return attrs.evolve(self, arg=arg)


def parse_argv(argv: Sequence[str]) -> tuple[str, list[Option]]:
    """The binary and the options of a QEMU command line, as QEMU reads them: an argument
    starting with ``-`` (``--`` alike) is an option, which takes the next argument unless it is
    one of `FLAGS`; any other argument is a bare disk image.

    :raise UsageError: on an empty command line or an option missing its argument.
    """
    if not argv:
        raise UsageError("the source's command line is empty")
    options: list[Option] = []
    rest = iter(argv[1:])
    for word in rest:
        if not word.startswith("-") or word == "-":
            options.append(Option(POSITIONAL, word, ""))
            continue
        name = word[2:] if word.startswith("--") else word[1:]
        if name in FLAGS:
            options.append(Option(name, None, word))
            continue
        arg = next(rest, None)
        if arg is None:
            raise UsageError(f"the source's command line ends in {word} without its argument")
        options.append(Option(name, arg, word))
    return argv[0], options


@attrs.frozen
class Suboption:
    """One ``key=value`` of an option's argument; ``key`` is ``None`` for a bare value."""

    key: str | None
    value: str


def split_suboptions(text: str) -> list[Suboption]:
    """``a,b=c,,d`` → ``[(None, "a"), ("b", "c,d")]``: split at single commas (``,,`` is a
    literal comma), each part at its first ``=``."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",,")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    result = []
    for part in parts:
        key, eq, value = part.partition("=")
        if eq and ",," not in key:
            result.append(Suboption(key, value.replace(",,", ",")))
        else:
            result.append(Suboption(None, part.replace(",,", ",")))
    return result


def join_suboptions(subs: Sequence[Suboption]) -> str:
    """The inverse of `split_suboptions`, escaping commas in values."""
    return ",".join(
        s.value.replace(",", ",,") if s.key is None else f"{s.key}={s.value.replace(',', ',,')}"
        for s in subs
    )


def _value(subs: Sequence[Suboption], key: str, *, implied: bool = False) -> str | None:
    """The last value of ``key`` (QEMU: the last one wins), or the bare first value."""
    found = None
    for index, sub in enumerate(subs):
        if sub.key == key or (implied and index == 0 and sub.key is None):
            found = sub.value
    return found


def _is_server(subs: Sequence[Suboption]) -> bool:
    server = False
    for index, sub in enumerate(subs):
        if sub.key == "server":
            server = sub.value in _ON
        elif sub.key is None and index > 0 and sub.value in {"server", "noserver"}:
            server = sub.value == "server"  # the short form older command lines use
    return server


def _replace(subs: Sequence[Suboption], key: str, value: str) -> list[Suboption]:
    return [Suboption(s.key, value) if s.key == key else s for s in subs]


@attrs.frozen
class _Monitor:
    """A QMP monitor candidate: which option holds its socket, and the socket's path."""

    index: int
    path: str | None  # None: not a unix path (an fd, or not a socket)
    server: bool
    stdio: bool


class _Derivation:
    """The state of one `derive_target_argv` call."""

    def __init__(
        self,
        options: list[Option],
        *,
        target_qmp: str,
        target_dir: str,
        disk_map: Mapping[str, str],
        machine_type: str,
    ) -> None:
        self.options = options
        self.target_qmp = target_qmp
        self.target_dir = target_dir
        self.disk_map = dict(disk_map)
        self.disks_seen: set[str] = set()
        self.claimed: set[str] = {target_qmp}
        self.handed_out: list[str] = [target_qmp]  # claimed, in command-line order
        self.machine_type = machine_type
        self.typed = False  # a -machine named the type
        self.paused = False  # -S was kept

    def rewrite(self, option: Option, *, is_qmp: bool) -> Option | None:
        """The target's version of one option; ``None`` drops it."""
        name = option.name
        self.refuse_inherited_fds(option)
        if name == "readconfig":
            raise UsageError(
                f"{option.spelling} {option.arg}: options read from a file cannot be rewritten; "
                "put them on the command line"
            )
        if name in {"daemonize", "loadvm"}:
            return None
        if name == "incoming":
            if (option.arg or "").startswith("fd:"):
                raise _inherited_fd(option)
            return None
        if name == "S":
            first, self.paused = not self.paused, True
            return option if first else None
        if name == "chardev":
            return self.chardev(option, is_qmp=is_qmp)
        if name in _COMPAT_CHARDEV_OPTIONS:
            return self.compat_chardev(option, is_qmp=is_qmp)
        if name in {"machine", "M"}:
            rewritten, named = self.machine(option, self.machine_type)
            self.typed = self.typed or named
            return rewritten
        if name in {"pidfile", "D"}:
            return option.with_arg(self.moved(option.arg or ""))
        if name == "drive":
            return self.drive(option)
        if name == "blockdev":
            return self.blockdev(option)
        if name in _IMAGE_OPTIONS:
            return option.with_arg(self.disk(option.arg or ""))
        return option

    # ---- paths -------------------------------------------------------------------------------

    def moved(self, path: str) -> str:
        """A path of the same name in the target dir, unique among those handed out."""
        stem, ext = posixpath.splitext(posixpath.basename(path))
        candidate = posixpath.join(self.target_dir, stem + ext)
        n = 1
        while candidate in self.claimed:
            candidate = posixpath.join(self.target_dir, f"{stem}-{n}{ext}")
            n += 1
        if posixpath.normpath(candidate) == posixpath.normpath(path):
            raise UsageError(
                f"{path} would be the target's too: choose another target dir than "
                f"{self.target_dir}"
            )
        self.claimed.add(candidate)
        self.handed_out.append(candidate)
        return candidate

    def disk(self, path: str) -> str:
        if path not in self.disk_map:
            return path
        self.disks_seen.add(path)
        target = self.disk_map[path]
        if posixpath.normpath(target) == posixpath.normpath(path):
            raise UsageError(f"disk {path} would be the target's too: map it to another file")
        return target

    # ---- the QMP monitor ---------------------------------------------------------------------

    def chardevs(self) -> dict[str, int]:
        found = {}
        for index, option in enumerate(self.options):
            if option.name == "chardev" and option.arg is not None:
                ident = _value(split_suboptions(option.arg), "id")
                if ident is not None:
                    found[ident] = index
        return found

    def control_monitors(self) -> list[_Monitor]:
        chardevs = self.chardevs()
        monitors = []
        for index, option in enumerate(self.options):
            arg = option.arg
            if arg is None:
                continue
            ident: str | None = None
            if option.name in _CONTROL_COMPAT:
                spec = arg.removeprefix("mon:")
                if spec.startswith("chardev:"):
                    ident = spec.removeprefix("chardev:")
                elif spec.startswith("unix:"):
                    subs = split_suboptions(spec.removeprefix("unix:"))
                    path = _value(subs, "path", implied=True)
                    monitors.append(_Monitor(index, path, _is_server(subs), stdio=False))
                    continue
                else:
                    monitors.append(_Monitor(index, None, False, stdio=spec == "stdio"))
                    continue
            elif option.name == "mon":
                subs = split_suboptions(arg)
                if _value(subs, "mode") != "control":
                    continue
                ident = _value(subs, "chardev", implied=True)
            if ident is None:
                continue
            if ident not in chardevs:
                raise UsageError(f"{option.spelling} {arg}: no -chardev with id={ident}")
            chardev = chardevs[ident]
            subs = split_suboptions(self.options[chardev].arg or "")
            backend = _value(subs, "backend", implied=True)
            path = _value(subs, "path") if backend == "socket" else None
            fd = _value(subs, "fd") if backend == "socket" else None
            monitors.append(
                _Monitor(
                    chardev,
                    path if path is not None or fd is None else f"fd:{fd}",
                    _is_server(subs),
                    stdio=backend == "stdio",
                )
            )
        return monitors

    def qmp_monitor(self, source_qmp: str | None) -> int:
        """The index of the option that holds the source's QMP socket."""
        monitors = self.control_monitors()
        for monitor in monitors:
            if monitor.stdio:
                option = self.options[monitor.index]
                raise UsageError(
                    f"{option.spelling} {option.arg}: a QMP monitor on stdio cannot be "
                    "reproduced; give the source a QMP socket instead"
                )
        sockets = [m for m in monitors if m.path is not None and m.server]
        if source_qmp is not None:
            wanted = posixpath.normpath(source_qmp)
            named = [
                m for m in sockets if m.path is not None and posixpath.normpath(m.path) == wanted
            ]
            if len(named) == 1:
                return named[0].index
        if len(sockets) == 1:
            return sockets[0].index
        if not sockets:
            raise UsageError("the source's command line has no QMP monitor on a unix socket")
        raise UsageError(
            f"the source has {len(sockets)} QMP sockets and none is {source_qmp}: "
            "name the one to replace"
        )

    # ---- the rewrites ------------------------------------------------------------------------

    def chardev(self, option: Option, *, is_qmp: bool) -> Option:
        arg = option.arg or ""
        subs = split_suboptions(arg)
        backend = _value(subs, "backend", implied=True)
        changed = list(subs)
        if is_qmp:
            changed = [
                Suboption("path", self.target_qmp) if s.key in {"path", "fd"} else s
                for s in changed
            ]
        else:
            for key in _FD_KEYS:
                if _value(subs, key) is not None:
                    raise _inherited_fd(option)
            path = _value(subs, "path")
            if path is not None and (
                (backend == "socket" and _is_server(subs)) or backend == "file"
            ):
                changed = _replace(changed, "path", self.moved(path))
        logfile = _value(subs, "logfile")
        if logfile is not None:
            changed = _replace(changed, "logfile", self.moved(logfile))
        return option if changed == subs else option.with_arg(join_suboptions(changed))

    def compat_chardev(self, option: Option, *, is_qmp: bool) -> Option:
        arg = option.arg or ""
        mux = "mon:" if arg.startswith("mon:") else ""
        spec = arg.removeprefix(mux)
        if spec.startswith("file:"):
            return option.with_arg(f"{mux}file:{self.moved(spec.removeprefix('file:'))}")
        if not spec.startswith("unix:"):
            return option
        subs = split_suboptions(spec.removeprefix("unix:"))
        path = _value(subs, "path", implied=True)
        if path is None or not _is_server(subs):
            return option
        new_path = self.target_qmp if is_qmp else self.moved(path)
        changed = [
            Suboption(s.key, new_path) if (i == 0 and s.key is None) or s.key == "path" else s
            for i, s in enumerate(subs)
        ]
        return option.with_arg(f"{mux}unix:{join_suboptions(changed)}")

    def machine(self, option: Option, machine_type: str) -> tuple[Option, bool]:
        """The option with its type replaced, and whether it named a type."""
        subs = split_suboptions(option.arg or "")
        typed = False
        changed = []
        for index, sub in enumerate(subs):
            if sub.key == "type" or (index == 0 and sub.key is None):
                changed.append(Suboption(sub.key, machine_type))
                typed = True
            else:
                changed.append(sub)
        if not typed:
            return option, False
        return option.with_arg(join_suboptions(changed)), True

    def drive(self, option: Option) -> Option:
        subs = split_suboptions(option.arg or "")
        changed = [
            Suboption(s.key, self.disk(s.value))
            if s.key is not None and (s.key == "file" or s.key.endswith(".filename"))
            else s
            for s in subs
        ]
        return option if changed == subs else option.with_arg(join_suboptions(changed))

    def blockdev(self, option: Option) -> Option:
        arg = option.arg or ""
        if arg.lstrip().startswith("{"):
            try:
                tree = json.loads(arg)
            except ValueError as err:
                raise UsageError(f"{option.spelling} {arg}: not JSON: {err}") from err
            changed_tree = self._json_files(tree)
            if changed_tree == tree:
                return option
            return option.with_arg(json.dumps(changed_tree, separators=(",", ":")))
        subs = split_suboptions(arg)
        changed = [
            Suboption(s.key, self.disk(s.value))
            if s.key is not None and (s.key == "filename" or s.key.endswith(".filename"))
            else s
            for s in subs
        ]
        return option if changed == subs else option.with_arg(join_suboptions(changed))

    def _json_files(self, node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: self.disk(value)
                if key == "filename" and isinstance(value, str)
                else self._json_files(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [self._json_files(item) for item in node]
        return node

    def refuse_inherited_fds(self, option: Option) -> None:
        if option.name == "add-fd":
            raise _inherited_fd(option)
        if (
            option.name in {"netdev", "nic", "net"}
            and option.arg is not None
            and any(s.key in _FD_KEYS for s in split_suboptions(option.arg))
        ):
            raise _inherited_fd(option)


def _inherited_fd(option: Option) -> UsageError:
    return UsageError(
        f"{option.spelling} {option.arg}: the source inherited a file descriptor from its "
        "launcher; a derived command line cannot have it (start the target with your own)"
    )


@attrs.frozen
class TargetCommand:
    """A derived target: its command line and the paths it gives QEMU to create.

    :param argv: the target's command line.
    :param files: the paths in ``target_dir`` (and ``target_qmp``, first) that the rewrite handed
        out for the sockets and files QEMU creates there (its QMP socket, other listening
        sockets, pidfile, logs, file chardevs), in command-line order. The disk images are not
        among them: they are ``disk_map``'s values.
    """

    argv: tuple[str, ...]
    files: tuple[str, ...]


def derive_target_argv(
    source_argv: Sequence[str],
    *,
    target_qmp: str,
    target_dir: str,
    machine_type: str,
    disk_map: Mapping[str, str],
    source_qmp: str | None = None,
) -> list[str]:
    """The command line of a migration target for the QEMU that runs ``source_argv``: the
    `TargetCommand.argv` of `derive_target`, which says more."""
    return list(
        derive_target(
            source_argv,
            target_qmp=target_qmp,
            target_dir=target_dir,
            machine_type=machine_type,
            disk_map=disk_map,
            source_qmp=source_qmp,
        ).argv
    )


def derive_target(
    source_argv: Sequence[str],
    *,
    target_qmp: str,
    target_dir: str,
    machine_type: str,
    disk_map: Mapping[str, str],
    source_qmp: str | None = None,
) -> TargetCommand:
    """The migration target for the QEMU that runs ``source_argv``; see the module's
    documentation for every rewrite and every refusal.

    :param target_qmp: the target's QMP socket path.
    :param target_dir: where the target's other sockets and files go.
    :param machine_type: the versioned machine type the source runs (``pc-q35-10.0``; a QOM type
        name ``pc-q35-10.0-machine`` is accepted too).
    :param disk_map: source image path → target image path, as the paths appear on the command
        line; images not in it are kept.
    :param source_qmp: the source's QMP socket, to choose among several QMP monitors.
    :raise UsageError: for a command line whose target could not work.
    """
    machine_type = machine_type.removesuffix(_MACHINE_SUFFIX)
    if not machine_type or "," in machine_type:
        raise UsageError(f"not a machine type: {machine_type!r}")
    if source_qmp is not None and posixpath.normpath(source_qmp) == posixpath.normpath(target_qmp):
        raise UsageError(f"the target's QMP socket {target_qmp} is the source's")
    binary, options = parse_argv(source_argv)
    state = _Derivation(
        options,
        target_qmp=target_qmp,
        target_dir=target_dir,
        disk_map=disk_map,
        machine_type=machine_type,
    )
    qmp_index = state.qmp_monitor(source_qmp)
    result = [
        rewritten
        for index, option in enumerate(options)
        if (rewritten := state.rewrite(option, is_qmp=index == qmp_index)) is not None
    ]
    missing = sorted(set(disk_map) - state.disks_seen)
    if missing:
        raise UsageError(
            f"the source runs {', '.join(missing)} but its command line does not open it "
            "(added with blockdev-add?): the derived target would lack it"
        )
    argv = [binary]
    if not state.typed:
        argv += ["-machine", machine_type]
    for option in result:
        argv += option.argv()
    if not state.paused:
        argv.append("-S")
    argv += ["-incoming", "defer"]
    return TargetCommand(tuple(argv), tuple(state.handed_out))


def default_disk_map(files: Sequence[str], target_dir: str) -> dict[str, str]:
    """Each of ``files`` → a file of the same name in ``target_dir`` (``disk-1.raw`` and so on when
    two share a name): the images of a target that does not share the source's storage."""
    mapping: dict[str, str] = {}
    taken: set[str] = set()
    for path in files:
        if path in mapping:
            continue
        stem, ext = posixpath.splitext(posixpath.basename(path))
        candidate, n = posixpath.join(target_dir, stem + ext), 1
        while candidate in taken:
            candidate, n = posixpath.join(target_dir, f"{stem}-{n}{ext}"), n + 1
        taken.add(candidate)
        mapping[path] = candidate
    return mapping
