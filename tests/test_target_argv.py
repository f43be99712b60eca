"""The derivation of a migration target's command line from the source's (pure: no QEMU)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.drivers.cmdline import (
    FLAGS,
    Option,
    Suboption,
    default_disk_map,
    derive_target,
    derive_target_argv,
    join_suboptions,
    parse_argv,
    split_suboptions,
)
from livemig.transports.errors import UsageError

QEMU = "qemu-system-x86_64"
QMP = ["-chardev", "socket,id=qmp,path=/run/src/vm.qmp,server=on,wait=off"]
MON = ["-mon", "chardev=qmp,mode=control"]
TAIL = ["-S", "-incoming", "defer"]


def derive(
    *args: str,
    disk_map: Mapping[str, str] | None = None,
    machine_type: str = "pc-q35-10.0",
    source_qmp: str | None = "/run/src/vm.qmp",
    target_qmp: str = "/run/dst/vm.qmp",
) -> list[str]:
    return derive_target_argv(
        [QEMU, *args],
        target_qmp=target_qmp,
        target_dir="/run/dst",
        machine_type=machine_type,
        disk_map=disk_map or {},
        source_qmp=source_qmp,
    )


def base(*args: str) -> list[str]:
    """A source command line with a QMP chardev, and ``args``."""
    return ["-machine", "q35", *QMP, *MON, *args]


TARGET_BASE = [
    "-machine",
    "pc-q35-10.0",
    "-chardev",
    "socket,id=qmp,path=/run/dst/vm.qmp,server=on,wait=off",
    *MON,
]


# ---- parsing ------------------------------------------------------------------------------------


def test_options_take_an_argument_unless_they_are_flags() -> None:
    binary, options = parse_argv(
        [QEMU, "-S", "-name", "vm", "--nodefaults", "disk.img", "-m", "128", "-"]
    )
    assert binary == QEMU
    assert options == [
        Option("S", None, "-S"),
        Option("name", "vm", "-name"),
        Option("nodefaults", None, "--nodefaults"),
        Option("", "disk.img", ""),
        Option("m", "128", "-m"),
        Option("", "-", ""),
    ]
    assert [w for o in options for w in o.argv()] == [
        "-S", "-name", "vm", "--nodefaults", "disk.img", "-m", "128", "-",
    ]  # fmt: skip


def test_an_option_missing_its_argument_is_refused() -> None:
    with pytest.raises(UsageError, match="ends in -m without its argument"):
        parse_argv([QEMU, "-S", "-m"])
    with pytest.raises(UsageError, match="empty"):
        parse_argv([])


def test_the_flags_include_the_common_ones() -> None:
    assert {"S", "daemonize", "nodefaults", "no-user-config", "snapshot", "enable-kvm"} <= FLAGS
    assert not {"machine", "name", "incoming", "pidfile", "loadvm"} & FLAGS


def test_suboptions_split_at_single_commas_and_unescape_double_ones() -> None:
    assert split_suboptions("socket,id=a,path=/x,,y.sock,server=on") == [
        Suboption(None, "socket"),
        Suboption("id", "a"),
        Suboption("path", "/x,y.sock"),
        Suboption("server", "on"),
    ]
    assert split_suboptions("a=b=c") == [Suboption("a", "b=c")]
    assert split_suboptions("") == [Suboption(None, "")]
    assert join_suboptions([Suboption("path", "/a,b"), Suboption(None, "nowait")]) == (
        "path=/a,,b,nowait"
    )


@given(
    st.lists(
        st.tuples(
            st.none() | st.text("abcdefgh.-", min_size=1),
            st.text("ab,=/ .x", min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_joining_then_splitting_gives_the_suboptions_back(
    parts: list[tuple[str | None, str]],
) -> None:
    subs = [Suboption(key, value) for key, value in parts]
    # As in QEMU, a bare value with "=" reads as key=value, and an empty value or one starting
    # with a comma is ambiguous after another (",,," splits either way): not things to write.
    subs = [
        s for s in subs if (s.key is not None or "=" not in s.value) and not s.value.startswith(",")
    ] or [Suboption("k", "v")]
    assert split_suboptions(join_suboptions(subs)) == subs


# ---- the QMP monitor ----------------------------------------------------------------------------


def test_the_qmp_chardev_moves_to_the_target_socket() -> None:
    assert derive(*base()) == [QEMU, *TARGET_BASE, *TAIL]


def test_a_qmp_chardev_on_a_file_descriptor_gets_the_target_path() -> None:
    argv = derive(
        "-chardev", "socket,id=qmp,fd=3,server=on,wait=off", *MON, source_qmp=None
    )  # fmt: skip
    assert argv[1:5] == [
        "-machine",
        "pc-q35-10.0",
        "-chardev",
        "socket,id=qmp,path=/run/dst/vm.qmp,server=on,wait=off",
    ]


def test_the_qmp_option_spelling_moves_too() -> None:
    for option in ("-qmp", "-qmp-pretty", "--qmp"):
        argv = derive(option, "unix:/run/src/vm.qmp,server=on,wait=off")
        assert argv == [
            QEMU, "-machine", "pc-q35-10.0",
            option, "unix:/run/dst/vm.qmp,server=on,wait=off", *TAIL,
        ]  # fmt: skip
    legacy = derive("-qmp", "unix:/run/src/vm.qmp,server,nowait")
    assert legacy[3:5] == ["-qmp", "unix:/run/dst/vm.qmp,server,nowait"]


def test_qmp_chardev_by_reference_and_mon_with_implied_chardev() -> None:
    chardev = ["-chardev", "socket,id=c0,path=/run/src/vm.qmp,server=on,wait=off"]
    moved = ["-chardev", "socket,id=c0,path=/run/dst/vm.qmp,server=on,wait=off"]
    assert derive(*chardev, "-qmp", "chardev:c0")[3:] == [*moved, "-qmp", "chardev:c0", *TAIL]
    assert derive(*chardev, "-mon", "c0,mode=control")[3:] == [
        *moved, "-mon", "c0,mode=control", *TAIL,
    ]  # fmt: skip


def test_a_second_monitor_and_other_server_sockets_move_into_the_target_dir() -> None:
    argv = derive(
        *base(
            "-qmp", "unix:/run/src/other.qmp,server=on,wait=off",
            "-monitor", "unix:/run/src/hmp.sock,server,nowait",
            "-chardev", "socket,id=ser,path=/run/src/serial.sock,server=on,wait=off",
            "-serial", "mon:unix:/var/x/serial.sock,server=on,wait=off",
            "-chardev", "socket,id=client,path=/run/agent.sock",
            "-serial", "tcp:127.0.0.1:4444",
        )
    )  # fmt: skip
    assert argv == [
        QEMU, *TARGET_BASE,
        "-qmp", "unix:/run/dst/other.qmp,server=on,wait=off",
        "-monitor", "unix:/run/dst/hmp.sock,server,nowait",
        "-chardev", "socket,id=ser,path=/run/dst/serial.sock,server=on,wait=off",
        # Same name as the one before: made unique.
        "-serial", "mon:unix:/run/dst/serial-1.sock,server=on,wait=off",
        # A client socket and a TCP endpoint are kept.
        "-chardev", "socket,id=client,path=/run/agent.sock",
        "-serial", "tcp:127.0.0.1:4444",
        *TAIL,
    ]  # fmt: skip


def test_of_several_qmp_sockets_the_sources_is_replaced() -> None:
    argv = derive(
        "-qmp", "unix:/run/src/a.qmp,server=on,wait=off",
        "-qmp", "unix:/run/src/vm.qmp,server=on,wait=off",
    )  # fmt: skip
    assert argv[3:7] == [
        "-qmp", "unix:/run/dst/a.qmp,server=on,wait=off",
        "-qmp", "unix:/run/dst/vm.qmp,server=on,wait=off",
    ]  # fmt: skip
    with pytest.raises(UsageError, match="2 QMP sockets and none is /elsewhere"):
        derive(
            "-qmp", "unix:/run/src/a.qmp,server=on",
            "-qmp", "unix:/run/src/vm.qmp,server=on",
            source_qmp="/elsewhere",
        )  # fmt: skip


def test_a_path_with_commas_is_escaped_in_the_rewrite() -> None:
    argv = derive(
        "-chardev", "socket,id=qmp,path=/run/src/vm.qmp,server=on,wait=off", *MON,
        "-chardev", "socket,id=s,path=/run/src/a,,b.sock,server=on",
        target_qmp="/run/dst/my,vm.qmp",
    )  # fmt: skip
    assert argv[3:] == [
        "-chardev", "socket,id=qmp,path=/run/dst/my,,vm.qmp,server=on,wait=off", *MON,
        "-chardev", "socket,id=s,path=/run/dst/a,,b.sock,server=on",
        *TAIL,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-qmp", "stdio"], "QMP monitor on stdio"),
        (["-chardev", "stdio,id=c", "-mon", "chardev=c,mode=control"], "QMP monitor on stdio"),
        (["-monitor", "unix:/run/src/hmp.sock,server=on"], "no QMP monitor on a unix socket"),
        (["-qmp", "unix:/run/src/vm.qmp"], "no QMP monitor on a unix socket"),  # a client
        (["-mon", "chardev=nope,mode=control"], "no -chardev with id=nope"),
    ],
)
def test_a_qmp_monitor_that_cannot_be_reproduced_is_refused(args: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        derive(*args)


def test_the_target_socket_may_not_be_the_sources() -> None:
    with pytest.raises(UsageError, match="is the source's"):
        derive(*base(), target_qmp="/run/src/vm.qmp")


# ---- the machine --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["-machine", "q35"], ["-machine", "pc-q35-10.0"]),
        (["-M", "q35,accel=kvm,usb=off"], ["-M", "pc-q35-10.0,accel=kvm,usb=off"]),
        (["-machine", "type=q35,smm=off"], ["-machine", "type=pc-q35-10.0,smm=off"]),
        (["--machine", "pc-q35-10.0"], ["--machine", "pc-q35-10.0"]),
        # Props in a second -machine are merged by QEMU: they stay where they are.
        (["-machine", "q35", "-M", "smm=off"], ["-machine", "pc-q35-10.0", "-M", "smm=off"]),
    ],
)  # fmt: skip
def test_the_machine_type_becomes_the_versioned_one(given: list[str], expected: list[str]) -> None:
    argv = derive(*QMP, *MON, *given)
    assert argv[1 : 1 + len(QMP) + len(MON)] == [
        "-chardev", "socket,id=qmp,path=/run/dst/vm.qmp,server=on,wait=off", *MON,
    ]  # fmt: skip
    assert argv[1 + len(QMP) + len(MON) : -3] == expected


def test_without_a_machine_type_the_versioned_one_is_added_first() -> None:
    argv = derive(*QMP, *MON, "-machine", "accel=kvm", machine_type="pc-i440fx-10.0-machine")
    assert argv[:3] == [QEMU, "-machine", "pc-i440fx-10.0"]
    assert argv[-5:-3] == ["-machine", "accel=kvm"]


def test_a_machine_type_must_be_one() -> None:
    for bad in ("", "-machine", "q35,smm=off"):
        with pytest.raises(UsageError, match="not a machine type"):
            derive(*base(), machine_type=bad)


# ---- -daemonize, -pidfile, -incoming, -S --------------------------------------------------------


def test_daemonize_goes_and_the_pidfile_and_log_move_into_the_target_dir() -> None:
    argv = derive(*base("-daemonize", "-pidfile", "/run/src/vm.pid", "-D", "/var/log/q.log"))
    assert argv == [
        QEMU, *TARGET_BASE, "-pidfile", "/run/dst/vm.pid", "-D", "/run/dst/q.log", *TAIL,
    ]  # fmt: skip


def test_the_derivation_lists_the_paths_it_hands_out_for_qemu_to_create() -> None:
    derived = derive_target(
        [QEMU, *base(
            "-pidfile", "/run/src/vm.pid",
            "-monitor", "unix:/run/src/hmp.sock,server=on,wait=off",
            "-serial", "file:/run/src/vm.pid",
            "-drive", "file=/run/src/root.raw,if=none,id=d0",
        )],
        target_qmp="/run/dst/vm.qmp",
        target_dir="/run/dst",
        machine_type="pc-q35-10.0",
        disk_map={"/run/src/root.raw": "/run/dst/root.raw"},
        source_qmp="/run/src/vm.qmp",
    )  # fmt: skip
    assert "file:/run/dst/vm-1.pid" in derived.argv
    assert derived.files == (
        "/run/dst/vm.qmp", "/run/dst/vm.pid", "/run/dst/hmp.sock", "/run/dst/vm-1.pid"
    )  # fmt: skip


def test_s_is_kept_once_and_any_incoming_is_replaced_by_defer() -> None:
    argv = derive(*base("-S", "-incoming", "tcp:0:4444", "-S", "-loadvm", "snap1", "-S"))
    assert argv == [QEMU, *TARGET_BASE, "-S", "-incoming", "defer"]
    assert argv.count("-S") == 1
    assert derive(*base("-incoming", "defer")) == [QEMU, *TARGET_BASE, *TAIL]


def test_deriving_from_a_derived_command_line_changes_nothing_more() -> None:
    once = derive(*base("-S", "-daemonize", "-name", "vm"))
    twice = derive_target_argv(
        once,
        target_qmp="/run/dst/vm.qmp",
        target_dir="/run/dst2",
        machine_type="pc-q35-10.0",
        disk_map={},
        source_qmp="/run/dst/vm.qmp-not-given",
    )
    assert twice == once


def test_name_uuid_and_everything_else_are_kept_verbatim_and_in_order() -> None:
    rest = [
        "-name", "guest=vm1,debug-threads=on", "-uuid", "12345678-1234-1234-1234-123456789abc",
        "-accel", "tcg", "-m", "128", "-smp", "2", "-nodefaults", "-no-user-config",
        "-display", "none", "-device", "virtio-blk-pci,drive=root,id=vda",
        "-device", '{"driver":"virtio-net-pci","id":"n0"}', "-netdev", "user,id=n0",
        "-global", "kvm-pit.lost_tick_policy=delay", "-kernel", "/boot/vmlinuz",
        "-append", "console=ttyS0,115200 root=/dev/vda", "-snapshot", "-vnc", ":0",
    ]  # fmt: skip
    assert derive(*base(*rest)) == [QEMU, *TARGET_BASE, *rest, *TAIL]


# ---- disks --------------------------------------------------------------------------------------

DISKS = {"/src/root.raw": "/run/dst/root.raw", "/src/data,1.qcow2": "/run/dst/data,1.qcow2"}


def test_blockdev_file_nodes_get_the_target_images() -> None:
    argv = derive(
        *base(
            "-blockdev", "driver=file,filename=/src/root.raw,node-name=root-file,cache.direct=off",
            "-blockdev", "driver=raw,node-name=root,file=root-file",
            "-blockdev",
            "driver=qcow2,node-name=data,file.driver=file,file.filename=/src/data,,1.qcow2",
            "-blockdev", "driver=file,filename=/shared/base.raw,node-name=base,read-only=on",
        ),
        disk_map=DISKS,
    )  # fmt: skip
    assert argv == [
        QEMU, *TARGET_BASE,
        "-blockdev", "driver=file,filename=/run/dst/root.raw,node-name=root-file,cache.direct=off",
        "-blockdev", "driver=raw,node-name=root,file=root-file",
        "-blockdev",
        "driver=qcow2,node-name=data,file.driver=file,file.filename=/run/dst/data,,1.qcow2",
        "-blockdev", "driver=file,filename=/shared/base.raw,node-name=base,read-only=on",
        *TAIL,
    ]  # fmt: skip


def test_blockdev_in_json_gets_the_target_images() -> None:
    spec = {
        "driver": "qcow2",
        "node-name": "data",
        "file": {"driver": "file", "filename": "/src/data,1.qcow2"},
    }
    argv = derive(
        *base("-blockdev", json.dumps(spec), "-blockdev", '{"driver":"null-co"}'),
        disk_map={"/src/data,1.qcow2": "/run/dst/data,1.qcow2"},
    )
    assert json.loads(argv[-6]) == {
        **spec,
        "file": {"driver": "file", "filename": "/run/dst/data,1.qcow2"},
    }
    assert argv[-4] == '{"driver":"null-co"}'  # unchanged: verbatim
    with pytest.raises(UsageError, match="not JSON"):
        derive(*base("-blockdev", "{oops"))


def test_drive_files_get_the_target_images() -> None:
    argv = derive(
        *base(
            "-drive", "file=/src/root.raw,format=raw,if=none,id=drive0",
            "-drive", "if=none,id=d1,file.driver=file,file.filename=/src/data,,1.qcow2",
            "-drive", "file=/iso/install.iso,media=cdrom,readonly=on",
        ),
        disk_map=DISKS,
    )  # fmt: skip
    assert argv == [
        QEMU, *TARGET_BASE,
        "-drive", "file=/run/dst/root.raw,format=raw,if=none,id=drive0",
        "-drive", "if=none,id=d1,file.driver=file,file.filename=/run/dst/data,,1.qcow2",
        "-drive", "file=/iso/install.iso,media=cdrom,readonly=on",
        *TAIL,
    ]  # fmt: skip


def test_legacy_image_options_and_a_bare_image_get_the_target_images() -> None:
    argv = derive(
        *base("/src/root.raw", "-hdb", "/src/data,1.qcow2", "-cdrom", "/iso/x.iso"),
        disk_map=DISKS,
    )
    assert argv == [
        QEMU, *TARGET_BASE,
        "/run/dst/root.raw", "-hdb", "/run/dst/data,1.qcow2", "-cdrom", "/iso/x.iso", *TAIL,
    ]  # fmt: skip


def test_a_disk_the_command_line_does_not_open_is_refused() -> None:
    with pytest.raises(UsageError, match=r"runs /src/overlay.qcow2 but its command line"):
        derive(*base(), disk_map={"/src/overlay.qcow2": "/run/dst/overlay.qcow2"})


def test_a_disk_mapped_onto_itself_is_refused() -> None:
    with pytest.raises(UsageError, match="would be the target's too"):
        derive(
            *base("-drive", "file=/src/root.raw,if=none,id=d0"),
            disk_map={"/src/root.raw": "/src/./root.raw"},
        )


def test_a_target_dir_that_is_the_sources_is_refused() -> None:
    with pytest.raises(UsageError, match="choose another target dir"):
        derive(*base("-pidfile", "/run/dst/vm.pid"))


def test_the_default_disk_map_puts_each_image_in_the_target_dir() -> None:
    assert default_disk_map(["/a/disk.raw", "/b/disk.raw", "/a/disk.raw", "rel.qcow2"], "/t") == {
        "/a/disk.raw": "/t/disk.raw",
        "/b/disk.raw": "/t/disk-1.raw",
        "rel.qcow2": "/t/rel.qcow2",
    }


# ---- other files and refusals -------------------------------------------------------------------


def test_files_qemu_writes_move_into_the_target_dir() -> None:
    argv = derive(
        *base(
            "-chardev", "file,id=log,path=/var/log/serial.log",
            "-chardev", "pty,id=p,logfile=/var/log/pty.log",
            "-serial", "file:/var/log/ttyS1.log",
            "-chardev", "pipe,id=pp,path=/run/fifo",
        )
    )  # fmt: skip
    assert argv[len(TARGET_BASE) + 1 :] == [
        "-chardev", "file,id=log,path=/run/dst/serial.log",
        "-chardev", "pty,id=p,logfile=/run/dst/pty.log",
        "-serial", "file:/run/dst/ttyS1.log",
        "-chardev", "pipe,id=pp,path=/run/fifo",
        *TAIL,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-incoming", "fd:5"], "inherited a file descriptor"),
        (["-add-fd", "fd=5,set=1"], "inherited a file descriptor"),
        (["-netdev", "tap,id=n0,fd=7"], "inherited a file descriptor"),
        (["-nic", "tap,vhostfd=8"], "inherited a file descriptor"),
        (["-chardev", "socket,id=s,fd=9,server=on"], "inherited a file descriptor"),
        (["-readconfig", "/etc/vm.cfg"], "options read from a file"),
    ],
)
def test_what_cannot_be_reproduced_is_refused(args: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        derive(*base(*args))


def test_the_result_survives_shell_quoting() -> None:
    argv = derive(*base("-append", "console=ttyS0 quiet", "-name", "my vm"))
    assert shlex.split(shlex.join(argv)) == argv
