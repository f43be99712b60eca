"""Child processes that must not outlive livemig (a QEMU of a test run, an ssh master)."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

__all__ = ["die_with_parent_hook"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent_hook() -> Callable[[], None]:
    """A ``preexec_fn`` making the kernel SIGKILL the child when this process dies, so that a
    crashed run leaves nothing of it behind. Looked up before the fork: the child only makes
    one system call."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
