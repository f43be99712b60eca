"""QMP commands about the virtual machine's run state, size and identity.

Thin typed wrappers: one QMP command each, no policy, no timeouts, no retries.
"""

from __future__ import annotations

from typing import Any

import attrs

from livemig.drivers.qapi import Monitor, member, query
from livemig.drivers.status import RunState

__all__ = [
    "GuestDevice",
    "QemuVersion",
    "RunState",
    "RunStatus",
    "cont",
    "query_devices",
    "query_machine",
    "query_memory_size_summary",
    "query_status",
    "query_version",
    "quit",
    "stop",
]


@attrs.frozen
class RunStatus:
    """The answer to ``query-status``.

    :param status: QEMU's run state.
    :param running: whether the guest's CPUs run.
    """

    status: RunState
    running: bool

    @classmethod
    def from_qmp(cls, reply: Any) -> RunStatus:
        return cls(
            status=RunState.parse(member(reply, "status", str)),
            running=member(reply, "running", bool),
        )


@attrs.frozen(order=True)
class QemuVersion:
    """QEMU's version (``query-version``); orders like a version number."""

    major: int
    minor: int
    micro: int

    @classmethod
    def from_qmp(cls, reply: Any) -> QemuVersion:
        qemu = member(reply, "qemu", dict)
        return cls(
            major=member(qemu, "major", int),
            minor=member(qemu, "minor", int),
            micro=member(qemu, "micro", int),
        )

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"


async def query_status(monitor: Monitor) -> RunStatus:
    """``query-status``."""
    return await query(monitor, "query-status", RunStatus.from_qmp)


async def cont(monitor: Monitor) -> None:
    """``cont``: run the guest's CPUs (QEMU emits ``RESUME``)."""
    await monitor.execute("cont")


async def stop(monitor: Monitor) -> None:
    """``stop``: pause the guest's CPUs (QEMU emits ``STOP``)."""
    await monitor.execute("stop")


async def quit(monitor: Monitor) -> None:
    """``quit``: QEMU replies, emits ``SHUTDOWN`` and exits; the connection then drops."""
    await monitor.execute("quit")


async def query_memory_size_summary(monitor: Monitor) -> int:
    """The guest's base RAM in bytes (``query-memory-size-summary`` ``base-memory``; memory
    hot-plugged later is not counted)."""
    return await query(
        monitor, "query-memory-size-summary", lambda reply: member(reply, "base-memory", int)
    )


async def query_version(monitor: Monitor) -> QemuVersion:
    """``query-version``."""
    return await query(monitor, "query-version", QemuVersion.from_qmp)


_MACHINE_SUFFIX = "-machine"


def _machine_type(reply: Any) -> str:
    if not isinstance(reply, str) or not reply.endswith(_MACHINE_SUFFIX):
        raise ValueError(f"not a machine's QOM type: {reply!r}")
    return reply.removesuffix(_MACHINE_SUFFIX)


async def query_machine(monitor: Monitor) -> str:
    """The versioned machine type the guest runs on, as ``-machine`` takes it (``pc-q35-10.0``;
    an alias such as ``q35`` is already resolved).

    QMP has no command for it: ``query-current-machine`` only tells wake-up support and
    ``query-machines`` does not mark the current one. It is the QOM type of ``/machine``
    (``pc-q35-10.0-machine``) without its ``-machine`` suffix.
    """
    return await query(monitor, "qom-get", _machine_type, {"path": "/machine", "property": "type"})


@attrs.frozen
class GuestDevice:
    """A device plugged into the machine (a child of ``/machine/peripheral``: given an id on the
    command line; of ``/machine/peripheral-anon``: none, named ``device[N]`` by QEMU)."""

    name: str
    type: str
    anonymous: bool = False

    def __str__(self) -> str:
        return f"{self.type} (no id)" if self.anonymous else f"{self.name} ({self.type})"


def _children(reply: Any, *, anonymous: bool) -> tuple[GuestDevice, ...]:
    out = []
    for entry in reply:
        kind = member(entry, "type", str)
        if kind.startswith("child<") and kind.endswith(">"):
            out.append(GuestDevice(member(entry, "name", str), kind[6:-1], anonymous))
    return tuple(out)


async def query_devices(monitor: Monitor) -> tuple[GuestDevice, ...]:
    """The devices plugged into the machine, with an id and without (``qom-list``): what a
    migration target must have too, or the stream cannot load."""
    named = await query(
        monitor,
        "qom-list",
        lambda r: _children(r, anonymous=False),
        {"path": "/machine/peripheral"},
    )
    anonymous = await query(
        monitor,
        "qom-list",
        lambda r: _children(r, anonymous=True),
        {"path": "/machine/peripheral-anon"},
    )
    return named + anonymous
