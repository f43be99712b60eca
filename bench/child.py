"""A child process whose own CPU time comes from the kernel when it is reaped (``wait4``).

trio reaps its own subprocesses and drops their rusage, so the measured child is started with
:class:`subprocess.Popen`, waited for through a pidfd (no blocking call, no thread) and reaped
with :func:`os.wait4`. Nothing else in the benchmark can reap it, so the figures are its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

__all__ = ["ChildResult", "run_measured"]


@attrs.frozen
class ChildResult:
    """:param returncode: as :mod:`subprocess` spells it (negative: killed by that signal).
    :param timed_out: the deadline passed and the child was interrupted (SIGINT)."""

    returncode: int
    stdout: bytes
    user_s: float
    sys_s: float
    wall_s: float
    timed_out: bool
    #: When each chunk of stdout arrived: ``(bytes received so far, CLOCK_BOOTTIME seconds)``.
    arrivals: tuple[tuple[int, float], ...] = ()

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def arrival_of(self, end: int) -> float | None:
        """When the first ``end`` bytes of stdout had all arrived (CLOCK_BOOTTIME seconds)."""
        return next((at for size, at in self.arrivals if size >= end), None)


def _spawn(argv: Sequence[str], stderr_path: Path) -> subprocess.Popen[bytes]:
    with stderr_path.open("wb") as stderr:
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
        )


def _reap(popen: subprocess.Popen[bytes]) -> tuple[int, float, float]:
    """Reap an exited child (never blocks: call once its pidfd is readable)."""
    _, status, usage = os.wait4(popen.pid, 0)
    popen.returncode = os.waitstatus_to_exitcode(status)
    return popen.returncode, usage.ru_utime, usage.ru_stime


async def _read_all(
    stream: trio.lowlevel.FdStream, into: list[bytes], arrivals: list[tuple[int, float]]
) -> None:
    size = 0
    while chunk := await stream.receive_some():
        into.append(chunk)
        size += len(chunk)
        arrivals.append((size, time.clock_gettime(time.CLOCK_BOOTTIME)))


async def run_measured(
    argv: Sequence[str], *, stderr_path: Path, deadline: float, grace: float = 60.0
) -> ChildResult:
    """Run ``argv`` to its end, collecting its stdout, and measure it.

    Past ``deadline`` seconds the child gets SIGINT (livemig then reverts cleanly), and SIGKILL
    if it has not exited ``grace`` seconds later. When the caller is cancelled the child is
    stopped the same way before this returns (shielded).
    """
    started = trio.current_time()
    popen = _spawn(argv, stderr_path)
    pidfd = os.pidfd_open(popen.pid)
    assert popen.stdout is not None
    stream = trio.lowlevel.FdStream(os.dup(popen.stdout.fileno()))
    popen.stdout.close()
    chunks: list[bytes] = []
    arrivals: list[tuple[int, float]] = []
    timed_out = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_all, stream, chunks, arrivals)
            with trio.move_on_after(deadline) as scope:
                await trio.lowlevel.wait_readable(pidfd)
            if scope.cancelled_caught:
                timed_out = True
                await _stop(popen, pidfd, grace)
        returncode, user, system = _reap(popen)
    finally:
        if popen.returncode is None:
            with trio.CancelScope(shield=True):
                await _stop(popen, pidfd, grace)
                _reap(popen)
        os.close(pidfd)
        await stream.aclose()
    return ChildResult(
        returncode=returncode,
        stdout=b"".join(chunks),
        user_s=user,
        sys_s=system,
        wall_s=trio.current_time() - started,
        timed_out=timed_out,
        arrivals=tuple(arrivals),
    )


async def _stop(popen: subprocess.Popen[bytes], pidfd: int, grace: float) -> None:
    """SIGINT, then SIGKILL after ``grace``; returns once the child has exited (not reaped)."""
    popen.send_signal(signal.SIGINT)
    with trio.move_on_after(grace):
        await trio.lowlevel.wait_readable(pidfd)
        return
    popen.kill()
    await trio.lowlevel.wait_readable(pidfd)
