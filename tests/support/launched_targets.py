"""For tests of targets livemig launches (``--to local``): such a target is no child of the test,
its serial console writes to a log file, and it may outlive everything the test started."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from livemig.guest._console import SerialConsole

LIVEMIG = [sys.executable, "-m", "livemig"]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which this machine's init may leave, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@contextmanager
def killed_at_end(pids: list[int]) -> Iterator[None]:
    """A launched target is no child of ours: stop it whatever the test did."""
    try:
        yield
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def wait_heartbeats(log: Path, above: int) -> SerialConsole:
    """The target's serial log, once the guest there acknowledged more than ``above``."""
    while True:
        console = SerialConsole.parse("target", log.read_text(errors="replace"))
        if console.last_acked > above:
            return console
        await trio.sleep(0.1)


async def wait_exit(pid: int) -> None:
    """Until ``pid`` has exited."""
    while alive(pid):  # noqa: ASYNC110 - another process: no event to wait on
        await trio.sleep(0.05)
