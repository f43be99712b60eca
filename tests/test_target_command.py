"""``livemig target-command`` and finding the QEMU behind a QMP socket (the peer tests that need
no QEMU run everywhere; the ones marked ``qemu`` start real ones)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from livemig.cli import EXIT_USAGE, main
from livemig.drivers.peer import qemu_argv, qmp_peer_pid, read_cmdline
from livemig.transports.errors import UsageError

LIVEMIG = [sys.executable, "-m", "livemig"]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LIVEMIG, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_peer_of_a_listening_socket_is_the_process_that_listens(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        assert qmp_peer_pid(path) == os.getpid()
        # It is not QEMU: the socket was not bound by one (as with -chardev socket,fd=N).
        with pytest.raises(UsageError, match=rf"held by process {os.getpid()} .*not a QEMU"):
            qemu_argv(path)


def test_a_path_that_is_no_listening_socket_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist or is not a socket"):
        qmp_peer_pid(tmp_path / "missing.qmp")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="does not exist or is not a socket"):
        qmp_peer_pid(tmp_path / "file")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # bound, never listening: what a dead QEMU leaves behind
    with pytest.raises(UsageError, match="nothing listens on"):
        qmp_peer_pid(stale)


def test_the_command_line_of_a_process(tmp_path: Path) -> None:
    assert read_cmdline(os.getpid()) == [
        os.fsdecode(w) for w in Path("/proc/self/cmdline").read_bytes().split(b"\0")[:-1]
    ]
    with pytest.raises(UsageError, match="no process 123"):
        read_cmdline(123, proc=tmp_path)
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cmdline").write_bytes(b"")
    with pytest.raises(UsageError, match="process 7 has no command line"):
        read_cmdline(7, proc=tmp_path)


def test_the_command_refuses_a_missing_socket_in_one_line(tmp_path: Path) -> None:
    result = run_cli("target-command", "--source-qmp", tmp_path / "nope.qmp")
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert result.stderr == (
        f"livemig: error: {tmp_path / 'nope.qmp'} does not exist or is not a socket\n"
    )
    assert main(["target-command"]) == EXIT_USAGE
