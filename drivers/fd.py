"""QMP commands for file descriptors passed to QEMU.

Passing one is `livemig.drivers.qmp.Monitor.send_fd` (SCM_RIGHTS, then ``getfd`` under a name): the
descriptor has to travel on the monitor socket itself. Commands such as ``migrate`` then take it
as ``fd:<name>``.
"""

from __future__ import annotations

from livemig.drivers.qmp import Monitor

__all__ = ["closefd", "send_fd"]


async def send_fd(monitor: Monitor, fd: int, name: str) -> None:
    """Give QEMU a copy of ``fd`` under ``name`` (``getfd``); ``fd`` stays open here."""
    await monitor.send_fd(fd, name)


async def closefd(monitor: Monitor, name: str) -> None:
    """``closefd``: QEMU closes the descriptor it holds under ``name``."""
    await monitor.execute("closefd", {"fdname": name})
