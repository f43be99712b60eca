"""QMP commands that add and remove user-creatable objects: the TLS credentials of a run.

Thin typed wrappers: one QMP command each, no policy, no timeouts, no retries.
"""

from __future__ import annotations

from livemig.drivers.qapi import Monitor, json_array, member, query
from livemig.transports.endpoints import Tls

__all__ = ["add_tls_creds", "object_del", "object_ids"]


async def add_tls_creds(monitor: Monitor, tls: Tls, object_id: str, *, endpoint: str) -> None:
    """``object-add`` of a ``tls-creds-x509`` object reading ``tls.directory``; ``endpoint`` is
    ``client`` (the source: it dials) or ``server`` (the target: it listens). Both verify their
    peer. QEMU loads and checks the files here: a missing or unreadable one, or a certificate
    its CA did not sign, is refused with the reason."""
    await monitor.execute("object-add", tls.creds_object(object_id, endpoint))


async def object_del(monitor: Monitor, object_id: str) -> None:
    """``object-del``."""
    await monitor.execute("object-del", {"id": object_id})


async def object_ids(monitor: Monitor) -> frozenset[str]:
    """The ids of the user-created objects (``qom-list /objects``)."""
    return await query(
        monitor,
        "qom-list",
        lambda reply: frozenset(
            member(p, "name", str)
            for p in json_array(reply)
            if member(p, "type", str).startswith("child<")
        ),
        {"path": "/objects"},
    )
