"""The QMP connection to one QEMU, used from trio.

qemu.qmp is asyncio-only. This module runs it on the trio-asyncio loop that the caller opened once
(``async with trio_asyncio.open_loop():``) and turns everything it raises into livemig's error
tree, chained with ``raise … from``:

=============================  ==============================================================
qemu.qmp raises                livemig raises
=============================  ==============================================================
``ConnectError``               `ConnectFailed` (socket missing or refused, greeting not QMP)
``ExecuteError``               `CommandFailed` (command, arguments, ``error_class``, ``desc``)
``ExecInterruptedError``       `ConnectionLost`; `ProtocolError` when what cut the connection
                               was a line that is not QMP; `MonitorClosed` when we closed it
``StateError``                 `MonitorClosed` after `QMPConnection.aclose`, else
                               `ConnectionLost`
reply of the wrong shape       `ProtocolError` (the connection stays usable)
=============================  ==============================================================

Nothing here takes a timeout: wrap calls in `trio.fail_after`. Cancelling a call is safe for the
connection but **not** for QEMU: a cancelled command was already written to the socket, QEMU still
runs it, and its reply is dropped. Query the state again before going on (a cancelled ``migrate``
needs ``migrate_cancel``).

Every command, reply and event is logged at DEBUG on the ``livemig.qmp`` logger.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from enum import Enum
from typing import Any, TypeVar

import trio
import trio_asyncio
from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    Runstate,
    StateError,
)
from qemu.qmp.error import ProtocolError as QMPProtocolError
from qemu.qmp.message import DeserializationError

from livemig.drivers.qapi import (
    EventStream,
    Monitor,
    QMPEvent,
    json_array,
    json_object,
    member,
    optional_member,
    qmp_arguments,
    query,
)
from livemig.transports.errors import (
    CommandFailed,
    ConnectFailed,
    ConnectionLost,
    MonitorClosed,
    ProtocolError,
    QMPError,
)

__all__ = [
    "EVENT_BUFFER_LIMIT",
    "EventStream",
    "Monitor",
    "QMPConnection",
    "QMPEvent",
    "connect",
    "json_array",
    "json_object",
    "member",
    "open_monitor",
    "optional_member",
    "qmp_arguments",
    "query",
]

logger = logging.getLogger("livemig.qmp")

#: Events one `EventStream` holds for a slow reader. Past it the stream stops buffering and
#: `EventStream.receive` fails once the buffered events are read: losing events silently would be
#: worse (a missed ``MIGRATION completed`` is a wait that never ends).
EVENT_BUFFER_LIMIT = 4096

T = TypeVar("T")


# ---- the connection ---------------------------------------------------------------------------


class _State(Enum):
    """Where a `QMPConnection` is in its one-way life."""

    #: Greeted and negotiated; commands and events flow.
    OPEN = "open"
    #: QEMU went away or sent garbage; the cause is kept. Nothing flows any more.
    LOST = "lost"
    #: We closed it (`QMPConnection.aclose`).
    CLOSED = "closed"


def _is_hang_up(cause: BaseException | None) -> bool:
    """Whether ``cause`` (what ended qemu.qmp's reader) means the peer went away.

    Anything else (a complete line that is not JSON, a message of the wrong shape) is a protocol
    violation. A line cut off by the hang-up is not: it is what dying mid-reply looks like.
    """
    if cause is None or isinstance(cause, EOFError | OSError):
        return True
    return isinstance(cause, DeserializationError) and not cause.raw.endswith(b"\n")


class _Inbox(EventListener):
    """qemu.qmp's end of one `EventStream`.

    It hands each accepted event to the stream instead of keeping it in `EventListener`'s
    unbounded queue and history.
    """

    def __init__(self, names: tuple[str, ...], deliver: Callable[[Message], None]) -> None:
        super().__init__(names)
        self._deliver = deliver

    async def put(self, event: Message) -> None:
        if self.accept(event):
            self._deliver(event)


class _QMPEventStream(EventStream):
    """The events of one ``listen`` block, buffered up to `EVENT_BUFFER_LIMIT`."""

    def __init__(self, connection: QMPConnection, names: tuple[str, ...]) -> None:
        self._connection = connection
        self._buffer: deque[QMPEvent] = deque()
        # Set whenever something changes for a waiting receive(): an event, the end.
        self._changed = asyncio.Event()
        self._overflowed = False
        self._finished = False
        self.inbox = _Inbox(names, self._deliver)

    def _deliver(self, message: Message) -> None:
        # Runs in qemu.qmp's reader task. A malformed event raises here and ends the connection.
        event = QMPEvent.from_qmp(message)
        if len(self._buffer) >= EVENT_BUFFER_LIMIT:
            self._overflowed = True
        else:
            self._buffer.append(event)
        self._changed.set()

    def wake(self) -> None:
        """Make a waiting `receive` look again (the connection's state changed)."""
        self._changed.set()

    def finish(self) -> None:
        """The ``listen`` block ended: nothing more will arrive."""
        self._finished = True
        self._changed.set()

    def _end(self) -> QMPError | None:
        """Why no more events will come, or ``None`` while they still may."""
        name = self._connection.name
        if self._finished:
            return MonitorClosed("event stream used after its listen() block ended", monitor=name)
        if self._overflowed:
            return QMPError(
                f"more than {EVENT_BUFFER_LIMIT} events were left unread; later ones were dropped",
                monitor=name,
            )
        return self._connection._gone()

    async def receive(self) -> QMPEvent:
        await trio.lowlevel.checkpoint()
        while not self._buffer:
            end = self._end()
            if end is not None:
                raise end
            await trio_asyncio.aio_as_trio(self._aio_wait)()
        return self._buffer.popleft()

    async def _aio_wait(self) -> None:
        # Check and wait in one asyncio step, so a wake-up cannot fall between them.
        self._changed.clear()
        if not self._buffer and self._end() is None:
            await self._changed.wait()


def _require_loop() -> None:
    if trio_asyncio.current_loop.get() is None:
        raise RuntimeError(
            "livemig's QMP driver runs qemu.qmp on trio-asyncio: call it inside "
            "`async with trio_asyncio.open_loop():`"
        )


class QMPConnection:
    """A connected, negotiated QMP session with one QEMU. Implements `Monitor`.

    Get one with `connect` or `open_monitor`, not by calling the class. Commands may run
    concurrently from several trio tasks; QEMU answers them in order.

    Besides qemu.qmp's own reader and writer, one asyncio task per connection watches its run
    state: qemu.qmp's event listeners never wake when the peer goes away, so this watcher finishes
    the disconnect, keeps its cause and wakes every waiting `EventStream`.
    """

    def __init__(self, client: QMPClient, name: str) -> None:
        self._client = client
        self._name = name
        self._state = _State.OPEN
        # What ended qemu.qmp's reader (EOFError, OSError, a parse error), once reaped.
        self._cause: BaseException | None = None
        self._streams: set[_QMPEventStream] = set()
        self._watcher: asyncio.Task[None] | None = None
        # Held while calling qemu.qmp's disconnect(), which must not run twice at once.
        self._disconnecting = asyncio.Lock()
        # qemu.qmp's built-in catch-all listener would queue every event forever. Its filter is
        # our log tap instead: it logs each event and keeps none.
        client.events.event_filter = self._log_event

    @property
    def name(self) -> str:
        """The monitor's name in logs and errors."""
        return self._name

    def __repr__(self) -> str:
        return f"<QMPConnection {self._name!r} {self._state.value}>"

    # -- commands --

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command and return its ``return`` member.

        If the caller is cancelled, QEMU still runs the command (see the module docstring).

        :raise CommandFailed: when QEMU answered with an error.
        :raise ConnectionLost: when QEMU went away before replying, or had already.
        :raise ProtocolError: when the reply was not QMP.
        :raise MonitorClosed: when we closed the connection, before or during the command.
        """
        gone = self._gone()
        if gone is not None:
            raise gone
        args = dict(arguments) if arguments is not None else None
        logger.debug("%s: -> %s %r", self._name, command, args or {})
        try:
            reply = await trio_asyncio.aio_as_trio(self._client.execute)(command, args)
        except ExecuteError as err:
            logger.debug("%s: <- %s error %s: %s", self._name, command, err.error_class, err)
            raise CommandFailed(
                monitor=self._name,
                command=command,
                arguments=args,
                error_class=err.error_class,
                desc=err.error.error.desc,
            ) from err
        except (ExecInterruptedError, StateError) as err:
            error = await self._interrupted(command)
            raise error from self._cause or err
        except QMPProtocolError as err:
            raise ProtocolError(f"{command}: reply is not QMP: {err}", monitor=self._name) from err
        logger.debug("%s: <- %s %r", self._name, command, reply)
        return reply

    async def _interrupted(self, command: str) -> QMPError:
        """The error for a command whose connection ended under it (its cause, if known, is
        ``self._cause`` once this returns)."""
        if self._state is not _State.CLOSED:
            await trio_asyncio.aio_as_trio(self._aio_reap)()
        if self._state is _State.CLOSED:
            return MonitorClosed(
                f"{command} interrupted: the monitor was closed", monitor=self._name
            )
        if _is_hang_up(self._cause):
            error: QMPError = ConnectionLost(
                f"{command} interrupted: connection lost ({self._cause!r})", monitor=self._name
            )
        else:
            error = ProtocolError(
                f"{command} interrupted: QEMU sent something that is not QMP: {self._cause}",
                monitor=self._name,
            )
        return error

    # -- events --

    def listen(self, *names: str) -> AbstractAsyncContextManager[EventStream]:
        """Collect the events called ``names`` (every event when none) while the block runs.

        Events are collected from the moment the block is entered, whether or not a task is
        receiving yet; what is still unread when the block ends is dropped.

        :raise MonitorClosed: on entry, when we closed the connection.
        """
        return self._listen(names)

    @asynccontextmanager
    async def _listen(self, names: tuple[str, ...]) -> AsyncIterator[EventStream]:
        if self._state is _State.CLOSED:
            raise MonitorClosed("listen() after close", monitor=self._name)
        stream = _QMPEventStream(self, names)
        self._client.register_listener(stream.inbox)
        self._streams.add(stream)
        try:
            yield stream
        finally:
            self._streams.discard(stream)
            self._client.remove_listener(stream.inbox)
            stream.finish()

    def _log_event(self, message: Message) -> bool:
        logger.debug("%s: event %s %r", self._name, message.get("event"), message.get("data", {}))
        return False

    def _wake_streams(self) -> None:
        for stream in self._streams:
            stream.wake()

    def _gone(self) -> QMPError | None:
        """Why the connection cannot be used any more, or ``None`` while it is open."""
        if self._state is _State.CLOSED:
            return MonitorClosed("used after close", monitor=self._name)
        if self._state is _State.LOST:
            error = ConnectionLost(f"connection lost ({self._cause!r})", monitor=self._name)
            error.__cause__ = self._cause
            return error
        return None

    # -- life cycle (the _aio_ methods run on the asyncio side) --

    async def aclose(self) -> None:
        """Close the connection (QEMU keeps running); idempotent, and completes even when the
        caller is cancelled. Waiting event streams raise `MonitorClosed`."""
        self._state = _State.CLOSED
        with trio.CancelScope(shield=True):
            await trio_asyncio.aio_as_trio(self._aio_close)()

    async def _aio_open(self, path: str) -> None:
        # On failure or cancellation qemu.qmp's connect() rolls the client back to IDLE itself.
        await self._client.connect(path)
        self._watcher = asyncio.create_task(self._aio_watch())

    async def _aio_watch(self) -> None:
        # Check-then-wait in one step each time round, so no change of run state is missed.
        while self._client.runstate is Runstate.RUNNING:
            await self._client.runstate_changed()
        if self._state is _State.OPEN:
            logger.debug("%s: connection dropped", self._name)
            await self._aio_reap()

    async def _aio_reap(self) -> None:
        """Finish a disconnect that qemu.qmp began on its own, and keep its cause."""
        async with self._disconnecting:
            if self._client.runstate is not Runstate.IDLE:
                try:
                    await self._client.disconnect()
                except Exception as err:
                    # Kept, and raised (classified) by whoever uses the connection next.
                    self._cause = err
            if self._state is _State.OPEN:
                self._state = _State.LOST
                logger.debug("%s: connection lost: %r", self._name, self._cause)
        self._wake_streams()

    async def _aio_close(self) -> None:
        self._wake_streams()
        async with self._disconnecting:
            if self._client.runstate is not Runstate.IDLE:
                try:
                    await self._client.disconnect()
                except Exception as err:
                    # We are closing: how the connection had failed no longer matters.
                    logger.debug("%s: closed a failed connection: %r", self._name, err)
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait([self._watcher])
        logger.debug("%s: closed", self._name)


async def connect(path: os.PathLike[str] | str, *, name: str) -> QMPConnection:
    """Connect to the QMP socket at ``path``, read the greeting and negotiate capabilities.

    Takes no timeout: wrap it in `trio.fail_after` (a QEMU whose monitor already has a client
    does not greet a second one). A cancelled connect leaves nothing open.

    :param name: the monitor's name in logs and errors.
    :raise ConnectFailed: when the socket is missing or refuses, or the greeting is not QMP.
    :raise RuntimeError: when no trio-asyncio loop is open.
    """
    _require_loop()
    connection = QMPConnection(QMPClient(name), name)
    try:
        await trio_asyncio.aio_as_trio(connection._aio_open)(os.fspath(path))
    except ConnectError as err:
        raise ConnectFailed(f"cannot connect to {os.fspath(path)}: {err}", monitor=name) from err
    try:
        # Cancelled just as the connection completed: close it rather than hand it out.
        await trio.lowlevel.checkpoint_if_cancelled()
    except trio.Cancelled:
        await connection.aclose()
        raise
    logger.debug("%s: connected to %s", name, os.fspath(path))
    return connection


@asynccontextmanager
async def open_monitor(path: os.PathLike[str] | str, *, name: str) -> AsyncIterator[QMPConnection]:
    """`connect`, and `QMPConnection.aclose` on every way out of the block."""
    connection = await connect(path, name=name)
    try:
        yield connection
    finally:
        await connection.aclose()
