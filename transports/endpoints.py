"""Where bytes travel: QMP monitors, the migration stream, the NBD export.

Value objects only: each endpoint knows how to spell itself for the QMP command that needs it
(``migrate`` takes a URI; ``blockdev-add`` of an NBD client the flat form). Parsing user input
raises :class:`~livemig.transports.errors.UsageError`.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import attrs

from livemig.transports.errors import UsageError

__all__ = ["Endpoint", "TcpEndpoint", "Tls", "UnixEndpoint", "as_endpoint", "parse_endpoint"]


@attrs.frozen
class UnixEndpoint:
    """A unix-domain socket on this host."""

    path: Path = attrs.field(converter=Path)

    @property
    def uri(self) -> str:
        """As ``migrate`` / ``migrate-incoming`` take it."""
        return f"unix:{self.path}"

    def flat_address(self) -> dict[str, Any]:
        """``SocketAddress``, as ``blockdev-add`` (driver nbd) takes it."""
        return {"type": "unix", "path": str(self.path)}

    def __str__(self) -> str:
        return self.uri


@attrs.frozen
class TcpEndpoint:
    """A TCP host and port. Plain TCP carries guest memory in the clear: use it on trusted links."""

    host: str
    port: int = attrs.field(
        validator=attrs.validators.and_(attrs.validators.ge(1), attrs.validators.le(65535))
    )

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    def flat_address(self) -> dict[str, Any]:
        return {"type": "inet", "host": self.host, "port": str(self.port)}

    @property
    def loopback(self) -> bool:
        """Whether the address stays on this host (``localhost``, 127.0.0.0/8, ``::1``); any
        other name may resolve off it."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return self.uri


Endpoint = UnixEndpoint | TcpEndpoint


@attrs.frozen
class Tls:
    """QEMU's own TLS on the data channels (the RAM stream, the NBD server and its clients).

    :param directory: x509 credentials in QEMU's layout (``ca-cert.pem``, ``server-cert.pem``,
        ``server-key.pem``, ``client-cert.pem``, ``client-key.pem``), at the same path on both
        hosts: the source uses the client's, the target the server's; each verifies its peer.
    :param hostname: the name the target's certificate must carry (QEMU's ``tls-hostname``):
        the name or address the source connects to.
    """

    directory: Path = attrs.field(converter=Path)
    hostname: str

    def creds_object(self, object_id: str, endpoint: str) -> dict[str, Any]:
        """``object-add`` arguments of the ``tls-creds-x509`` object of one side."""
        return {
            "qom-type": "tls-creds-x509",
            "id": object_id,
            "dir": str(self.directory),
            "endpoint": endpoint,
            "verify-peer": True,
        }


def as_endpoint(where: Endpoint | os.PathLike[str] | str) -> Endpoint:
    """An endpoint as is, or a path as the unix socket it names."""
    if isinstance(where, UnixEndpoint | TcpEndpoint):
        return where
    return UnixEndpoint(Path(where))


def parse_endpoint(text: str) -> Endpoint:
    """Read ``unix:PATH``, ``tcp:HOST:PORT`` (``tcp:[v6]:PORT``) or a bare path.

    :raise UsageError: when the text names neither.
    """
    if text.startswith("tcp:"):
        rest = text[len("tcp:") :]
        host, sep, port = rest.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UsageError(f"bad tcp endpoint {text!r}: expected tcp:HOST:PORT")
        if bracketed or ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError as err:
                raise UsageError(f"bad IPv6 address in {text!r}") from err
        return TcpEndpoint(host, int(port))
    path = text.removeprefix("unix:")
    if not path:
        raise UsageError(f"bad endpoint {text!r}: expected unix:PATH, tcp:HOST:PORT or a path")
    return UnixEndpoint(Path(path))
