"""QMP commands that configure, run and watch a RAM/device-state migration.

Thin typed wrappers: one QMP command each, no policy, no timeouts, no retries. Capability and
parameter names are QMP's own (``pause-before-switchover``, ``downtime-limit``); which exist
depends on the QEMU version, so probe with `query_capabilities` before setting one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from livemig.drivers.qapi import Monitor, json_array, json_object, member, optional_member, query
from livemig.drivers.status import MigrationStatus

__all__ = [
    "MigrationStats",
    "MigrationStatus",
    "RamStats",
    "migrate",
    "migrate_cancel",
    "migrate_continue",
    "migrate_incoming",
    "query_capabilities",
    "query_migrate",
    "query_parameters",
    "set_capabilities",
    "set_parameters",
    "start_postcopy",
]


@attrs.frozen
class RamStats:
    """The ``ram`` member of ``query-migrate``: bytes, pages and rates of the RAM stream.

    The first three are always there; QEMU added the others over the years, so each is ``None``
    when this QEMU does not report it.
    """

    transferred: int
    remaining: int
    total: int
    duplicate: int | None = None
    normal: int | None = None
    normal_bytes: int | None = None
    dirty_pages_rate: int | None = None
    mbps: float | None = None
    dirty_sync_count: int | None = None
    postcopy_requests: int | None = None
    page_size: int | None = None
    multifd_bytes: int | None = None
    pages_per_second: int | None = None
    precopy_bytes: int | None = None
    downtime_bytes: int | None = None
    postcopy_bytes: int | None = None

    @classmethod
    def from_qmp(cls, ram: Any) -> RamStats:
        return cls(
            transferred=member(ram, "transferred", int),
            remaining=member(ram, "remaining", int),
            total=member(ram, "total", int),
            duplicate=optional_member(ram, "duplicate", int),
            normal=optional_member(ram, "normal", int),
            normal_bytes=optional_member(ram, "normal-bytes", int),
            dirty_pages_rate=optional_member(ram, "dirty-pages-rate", int),
            mbps=optional_member(ram, "mbps", float),
            dirty_sync_count=optional_member(ram, "dirty-sync-count", int),
            postcopy_requests=optional_member(ram, "postcopy-requests", int),
            page_size=optional_member(ram, "page-size", int),
            multifd_bytes=optional_member(ram, "multifd-bytes", int),
            pages_per_second=optional_member(ram, "pages-per-second", int),
            precopy_bytes=optional_member(ram, "precopy-bytes", int),
            downtime_bytes=optional_member(ram, "downtime-bytes", int),
            postcopy_bytes=optional_member(ram, "postcopy-bytes", int),
        )


@attrs.frozen
class MigrationStats:
    """The answer to ``query-migrate``. QEMU leaves out what does not apply yet, so every member
    but ``status`` may be ``None``.

    :param status: where the migration stands; `MigrationStatus.NONE` when none has started
        (QEMU then answers ``{}``).
    :param total_time_ms: since the start; the final total once completed.
    :param downtime_ms: the guest's measured pause, once completed.
    :param expected_downtime_ms: QEMU's estimate while active.
    :param setup_time_ms: time spent in ``setup``.
    :param cpu_throttle_percentage: auto-converge's current throttle.
    :param error_desc: why it failed.
    :param ram: the RAM stream's numbers.
    :param blocked_reasons: why QEMU would refuse to migrate now (a device or an image format
        that cannot migrate, …), in QEMU's words; empty when nothing blocks it.
    """

    status: MigrationStatus
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    setup_time_ms: int | None = None
    cpu_throttle_percentage: int | None = None
    error_desc: str | None = None
    ram: RamStats | None = None
    blocked_reasons: tuple[str, ...] = ()

    @classmethod
    def from_qmp(cls, reply: Any) -> MigrationStats:
        ram = optional_member(reply, "ram", dict)
        blocked = optional_member(reply, "blocked-reasons", list) or []
        return cls(
            status=MigrationStatus.parse(optional_member(reply, "status", str) or "none"),
            total_time_ms=optional_member(reply, "total-time", int),
            downtime_ms=optional_member(reply, "downtime", int),
            expected_downtime_ms=optional_member(reply, "expected-downtime", int),
            setup_time_ms=optional_member(reply, "setup-time", int),
            cpu_throttle_percentage=optional_member(reply, "cpu-throttle-percentage", int),
            error_desc=optional_member(reply, "error-desc", str),
            ram=RamStats.from_qmp(ram) if ram is not None else None,
            blocked_reasons=tuple(str(reason) for reason in blocked),
        )


def _capabilities(reply: Any) -> dict[str, bool]:
    return {
        member(entry, "capability", str): member(entry, "state", bool)
        for entry in json_array(reply)
    }


async def query_capabilities(monitor: Monitor) -> Mapping[str, bool]:
    """Every migration capability this QEMU knows, and whether it is on
    (``query-migrate-capabilities``)."""
    return await query(monitor, "query-migrate-capabilities", _capabilities)


async def set_capabilities(monitor: Monitor, capabilities: Mapping[str, bool]) -> None:
    """``migrate-set-capabilities``; QEMU refuses the whole set if one name is unknown."""
    await monitor.execute(
        "migrate-set-capabilities",
        {
            "capabilities": [
                {"capability": name, "state": state} for name, state in capabilities.items()
            ]
        },
    )


async def query_parameters(monitor: Monitor) -> Mapping[str, Any]:
    """Every migration parameter and its value, by QMP name (``query-migrate-parameters``)."""
    return await query(monitor, "query-migrate-parameters", lambda reply: dict(json_object(reply)))


async def set_parameters(monitor: Monitor, parameters: Mapping[str, object]) -> None:
    """``migrate-set-parameters`` with QMP names: ``{"downtime-limit": 300}``."""
    await monitor.execute("migrate-set-parameters", parameters)


async def migrate(monitor: Monitor, uri: str) -> None:
    """``migrate``: start sending to ``uri`` (``unix:/path``, ``tcp:host:port``); returns at once,
    the outcome comes as ``MIGRATION`` events or from `query_migrate`."""
    await monitor.execute("migrate", {"uri": uri})


async def migrate_incoming(monitor: Monitor, uri: str) -> None:
    """``migrate-incoming`` on a QEMU started with ``-incoming defer``: listen on ``uri``."""
    await monitor.execute("migrate-incoming", {"uri": uri})


async def migrate_cancel(monitor: Monitor) -> None:
    """``migrate_cancel``: abandon the outgoing migration (a paused source resumes by itself)."""
    await monitor.execute("migrate_cancel")


async def migrate_continue(
    monitor: Monitor, state: MigrationStatus = MigrationStatus.PRE_SWITCHOVER
) -> None:
    """``migrate-continue``: go on from the pause that ``pause-before-switchover`` made;
    ``state`` is the status the migration is expected to be in."""
    await monitor.execute("migrate-continue", {"state": state})


async def migrate_pause(monitor: Monitor) -> None:
    """``migrate-pause``: break a post-copy's channel on purpose (``postcopy-paused``), as when
    its link failed, so that it can be resumed; QEMU alone may take the TCP timeout (minutes)
    to notice a link that went down."""
    await monitor.execute("migrate-pause")


async def migrate_recover(monitor: Monitor, uri: str) -> None:
    """``migrate-recover`` on a target in ``postcopy-paused``: listen on ``uri`` for the source
    to resume."""
    await monitor.execute("migrate-recover", {"uri": uri})


async def migrate_resume(monitor: Monitor, uri: str) -> None:
    """``migrate`` with ``resume``: a source in ``postcopy-paused`` reconnects to ``uri`` and
    post-copy goes on from where it broke."""
    await monitor.execute("migrate", {"uri": uri, "resume": True})


async def start_postcopy(monitor: Monitor) -> None:
    """``migrate-start-postcopy`` (needs ``postcopy-ram`` on both sides)."""
    await monitor.execute("migrate-start-postcopy")


async def query_migrate(monitor: Monitor) -> MigrationStats:
    """``query-migrate``."""
    return await query(monitor, "query-migrate", MigrationStats.from_qmp)
