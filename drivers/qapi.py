"""QEMU's QMP words as Python values, with no connection: the monitor protocol every layer
above types against, events as values, and the helpers that decode replies.

Pure: importing this imports neither trio nor qemu.qmp, so the decision-making core and the
typed driver wrappers (:mod:`livemig.drivers.migration`, :mod:`livemig.drivers.block`, …) can be
read, tested and imported without an event loop. :mod:`livemig.drivers.qmp` is the connection.
"""

from __future__ import annotations

import types
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar, cast

import attrs

from livemig.transports.errors import ProtocolError

__all__ = [
    "EventStream",
    "Monitor",
    "QMPEvent",
    "json_array",
    "json_object",
    "member",
    "optional_member",
    "qmp_arguments",
    "query",
]

T = TypeVar("T")


@attrs.frozen
class QMPEvent:
    """One asynchronous event from QEMU.

    :param name: the event name (``STOP``, ``MIGRATION``, ``JOB_STATUS_CHANGE``, …).
    :param data: its ``data`` member (empty when QEMU sends none), read-only.
    :param timestamp: when QEMU emitted it, in seconds since the epoch (host clock).
    """

    name: str
    data: Mapping[str, Any]
    timestamp: float

    @classmethod
    def from_qmp(cls, message: Mapping[str, object]) -> QMPEvent:
        """Build from a raw QMP event message.

        :raise KeyError: when a required member is absent.
        :raise TypeError: when a member has the wrong JSON type.
        """
        stamp = member(message, "timestamp", dict)
        data = message.get("data", {})
        return cls(
            name=member(message, "event", str),
            data=types.MappingProxyType(dict(json_object(data))),
            timestamp=member(stamp, "seconds", int) + member(stamp, "microseconds", int) / 1e6,
        )


class EventStream(ABC):
    """QEMU's events in arrival order, from the moment `Monitor.listen` was entered.

    ``async for event in stream`` is ``while True: event = await stream.receive()``. A stream never
    ends quietly: when its connection goes away it raises.
    """

    @abstractmethod
    async def receive(self) -> QMPEvent:
        """Wait for the next event.

        :raise ConnectionLost: when the connection went away (events that arrived before are
            returned first).
        :raise MonitorClosed: when we closed the monitor, or the ``listen`` block has ended.
        :raise QMPError: when more than `EVENT_BUFFER_LIMIT` events were left unread.
        """

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> QMPEvent:
        return await self.receive()


class Monitor(Protocol):
    """What the layers above need from one QEMU monitor (and what fault injection wraps)."""

    @property
    def name(self) -> str:
        """The monitor's name in logs and errors (``"source"``, ``"target"``, …)."""
        ...

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command and return its ``return`` member.

        :raise CommandFailed: when QEMU answered with an error.
        :raise ConnectionLost: when the connection went away before the reply.
        :raise MonitorClosed: when the monitor was closed by us.
        :raise ProtocolError: when the reply was not QMP.
        """
        ...

    def listen(self, *names: str) -> AbstractAsyncContextManager[EventStream]:
        """Collect the events called ``names`` (all events when none) while the block runs."""
        ...

    async def aclose(self) -> None:
        """Close the connection; idempotent. QEMU keeps running."""
        ...


# ---- decoding replies -------------------------------------------------------------------------


def json_object(value: object) -> Mapping[str, Any]:
    """``value`` as a JSON object.

    :raise TypeError: when it is something else.
    """
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return cast(Mapping[str, Any], value)


def json_array(value: object) -> list[Any]:
    """``value`` as a JSON array.

    :raise TypeError: when it is something else.
    """
    if not isinstance(value, list):
        raise TypeError(f"expected a JSON array, got {type(value).__name__}")
    return value


def member(obj: object, key: str, kind: type[T]) -> T:
    """The member ``key`` of the JSON object ``obj``, checked to be a ``kind``.

    A JSON integer is accepted where a float is wanted; a boolean is not accepted as an integer.

    :raise KeyError: when the member is absent.
    :raise TypeError: when ``obj`` is not an object or the member has another type.
    """
    value = json_object(obj)[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return cast(T, float(value))
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"member {key!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def optional_member(obj: object, key: str, kind: type[T]) -> T | None:
    """Like `member`, but ``None`` when QEMU left the member out."""
    return member(obj, key, kind) if key in json_object(obj) else None


def qmp_arguments(**given: object) -> dict[str, object]:
    """QMP arguments from Python keywords: ``job_id`` becomes ``job-id``, and ``None`` means
    "not sent", so that QEMU's default applies."""
    return {name.replace("_", "-"): value for name, value in given.items() if value is not None}


async def query(
    monitor: Monitor,
    command: str,
    build: Callable[[Any], T],
    arguments: Mapping[str, object] | None = None,
) -> T:
    """Run ``command`` and build a typed value from its reply with ``build`` (a ``from_qmp``).

    :raise ProtocolError: when ``build`` does not understand the reply (``KeyError``,
        ``TypeError`` or ``ValueError``).
    """
    reply = await monitor.execute(command, arguments)
    try:
        return build(reply)
    except (KeyError, TypeError, ValueError) as err:
        raise ProtocolError(
            f"unexpected reply to {command}: {reply!r} ({err})", monitor=monitor.name
        ) from err
