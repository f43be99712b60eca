"""QMP commands that serve block nodes over NBD (the target side of a non-shared migration).

Thin typed wrappers: one QMP command each, no policy, no timeouts, no retries.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from livemig.drivers.qapi import Monitor, json_array, member, qmp_arguments, query
from livemig.transports.endpoints import Endpoint, UnixEndpoint, as_endpoint

__all__ = [
    "BlockExport",
    "block_export_add",
    "block_export_del",
    "nbd_server_start",
    "nbd_server_stop",
    "query_block_exports",
]


@attrs.frozen
class BlockExport:
    """One entry of ``query-block-exports``.

    :param shutting_down: deleted, but a client still holds it open.
    """

    id: str
    type: str
    node_name: str
    shutting_down: bool

    @classmethod
    def from_qmp(cls, export: Any) -> BlockExport:
        return cls(
            id=member(export, "id", str),
            type=member(export, "type", str),
            node_name=member(export, "node-name", str),
            shutting_down=member(export, "shutting-down", bool),
        )


async def nbd_server_start(
    monitor: Monitor,
    address: Endpoint | os.PathLike[str] | str,
    *,
    max_connections: int = 1,
    tls_creds: str | None = None,
) -> None:
    """``nbd-server-start`` listening on a unix socket or a TCP address, for
    ``max_connections`` clients at a time (livemig's base copy, then its mirror: one per disk at
    a time; nobody else gets in beside them).

    QEMU takes the legacy address form here, ``{"type": "unix", "data": {"path": …}}`` (the flat
    form that ``blockdev-add`` takes is refused: "Parameter 'addr.data' is missing").

    :param tls_creds: the id of a ``tls-creds-x509`` server object: every client must do TLS
        with a certificate that object's CA signed.
    """
    where = as_endpoint(address)
    data: dict[str, str]
    if isinstance(where, UnixEndpoint):
        data = {"path": str(where.path)}
        addr = {"type": "unix", "data": data}
    else:
        data = {"host": where.host, "port": str(where.port)}
        addr = {"type": "inet", "data": data}
    arguments: dict[str, Any] = {"addr": addr, "max-connections": max_connections}
    if tls_creds is not None:
        arguments["tls-creds"] = tls_creds
    await monitor.execute("nbd-server-start", arguments)


async def nbd_server_stop(monitor: Monitor) -> None:
    """``nbd-server-stop``: also removes every NBD export (``BLOCK_EXPORT_DELETED`` each)."""
    await monitor.execute("nbd-server-stop")


async def block_export_add(
    monitor: Monitor,
    *,
    export_id: str,
    node_name: str,
    writable: bool,
    name: str | None = None,
    allow_inactive: bool | None = None,
) -> None:
    """``block-export-add`` of type ``nbd`` on the running NBD server.

    :param name: the NBD export name clients ask for; QEMU uses ``node_name`` when omitted.
    :param allow_inactive: QEMU 10's switch to export a node without activating it. Left out,
        exporting an incoming QEMU's inactive node activates it.
    """
    await monitor.execute(
        "block-export-add",
        qmp_arguments(
            type="nbd",
            id=export_id,
            node_name=node_name,
            writable=writable,
            name=name,
            allow_inactive=allow_inactive,
        ),
    )


async def block_export_del(monitor: Monitor, export_id: str, mode: str = "safe") -> None:
    """``block-export-del``; ``safe`` refuses while clients are connected, ``hard`` drops them.
    Completion is the ``BLOCK_EXPORT_DELETED`` event."""
    await monitor.execute("block-export-del", {"id": export_id, "mode": mode})


async def query_block_exports(monitor: Monitor) -> tuple[BlockExport, ...]:
    """``query-block-exports``."""
    return await query(
        monitor,
        "query-block-exports",
        lambda reply: tuple(BlockExport.from_qmp(e) for e in json_array(reply)),
    )
