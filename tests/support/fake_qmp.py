"""A fake QMP server on trio, for fast fault exploration without QEMU.

It listens on a unix socket, greets, negotiates ``qmp_capabilities`` like QEMU (commands before it
are refused), then answers each command with a *handler*::

    async def handler(command: str, arguments: Mapping[str, Any]) -> object:
        if command == "query-status":
            return {"status": "running", "running": True}   # the reply's "return" member
        return Hang()                                        # or a fault

    async with fake_qmp_server(tmp_path, handler) as server:
        async with open_monitor(server.path, name="source") as monitor:
            ...
        await server.emit("STOP")

A handler returns the command's ``return`` value, or one of the faults: `ErrorReply`, `Hang`,
`Disconnect` (at a `Stage`), `Malformed`, `RawReply`, `Delayed`. It may await `FakeQMPServer.emit`
to send events before it answers, as QEMU does (``stop`` sends ``STOP`` before its reply). Like
QEMU, the server runs one command at a time and serves one client at a time; a second client waits
in the listen backlog without a greeting until the first one leaves. Every command received,
``qmp_capabilities`` included, is recorded in `FakeQMPServer.commands`.
"""

from __future__ import annotations

import enum
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

__all__ = [
    "QEMU_GREETING",
    "Delayed",
    "Disconnect",
    "ErrorReply",
    "FakeQMPServer",
    "Fault",
    "Handler",
    "Hang",
    "Malformed",
    "RawReply",
    "ReceivedCommand",
    "Stage",
    "fake_qmp_server",
    "replies",
]

#: What QEMU 10.0 says first.
QEMU_GREETING: Mapping[str, object] = {
    "QMP": {
        "version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "fake"},
        "capabilities": ["oob"],
    }
}

_CHUNK = 65536


class Stage(enum.Enum):
    """When a `Disconnect` hangs up, seen from the command it answers."""

    #: The command is left unread in the socket: the client sees a connection reset.
    BEFORE_READ = "before-read"
    #: The command is read, then the server hangs up without a reply: the client sees EOF.
    AFTER_READ = "after-read"
    #: Half of the reply line is sent, then the server hangs up.
    MID_REPLY = "mid-reply"


@attrs.frozen
class ErrorReply:
    """Answer with a QMP error."""

    error_class: str = "GenericError"
    desc: str = "injected failure"


@attrs.frozen
class Hang:
    """Never answer. Like a stuck QEMU, the server reads and ignores everything after it until the
    client hangs up; events can still be emitted."""


@attrs.frozen
class Disconnect:
    """Hang up at ``stage``."""

    stage: Stage = Stage.AFTER_READ


@attrs.frozen
class Malformed:
    """Send ``line`` (not JSON by default) instead of the reply."""

    line: bytes = b'{"return": {"status": '


@attrs.frozen
class RawReply:
    """Send ``message`` as the reply, with only the command's ``id`` added: for replies of the
    wrong shape (no ``return``, an ``error`` without ``class``, …)."""

    message: Mapping[str, object]


@attrs.frozen
class Delayed:
    """Answer with ``reply`` (a value or another fault) after ``seconds`` of trio time."""

    seconds: float
    reply: object


Fault = ErrorReply | Hang | Disconnect | Malformed | RawReply | Delayed

#: ``(command, arguments) -> return value | Fault``. ``arguments`` is ``{}`` when none were sent.
Handler = Callable[[str, Mapping[str, Any]], Awaitable[object]]


@attrs.frozen
class ReceivedCommand:
    """One command as the server read it."""

    command: str
    arguments: Mapping[str, Any]
    id: object = None


def replies(table: Mapping[str, object]) -> Handler:
    """A handler answering from ``table`` (command → return value or fault); QEMU's
    ``CommandNotFound`` for anything else."""

    async def handler(command: str, arguments: Mapping[str, Any]) -> object:
        if command in table:
            return table[command]
        return ErrorReply("CommandNotFound", f"The command {command} has not been found")

    return handler


def _message_end(data: bytes) -> int:
    """Where the first complete JSON text in ``data`` ends, or -1.

    Like QEMU's JSON streamer it counts brackets outside strings: qemu.qmp sends no newlines.
    """
    depth = 0
    in_string = escaped = False
    for index, byte in enumerate(data):
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        elif byte in b"{[":
            depth += 1
        elif byte in b"}]":
            depth -= 1
            if depth <= 0:
                return index + 1
        elif depth == 0 and byte not in b" \t\r\n":
            return index + 1  # a stray token: handed on alone, and refused as not JSON
    return -1


class _MessageReader:
    """Reads commands, peeking first so that a fault can leave a command unread in the socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._head = b""  # the start of a command whose end has not arrived yet
        self._unread = 0  # bytes of the peeked command still in the socket

    async def peek(self) -> bytes | None:
        """The next command's bytes, not yet consumed; ``None`` at end of file."""
        while True:
            data = await self._sock.recv(_CHUNK, socket.MSG_PEEK)
            if not data:
                return None
            end = _message_end(self._head + data)
            if end >= 0:
                self._unread = end - len(self._head)
                return (self._head + data)[:end]
            # Not complete yet: take what is there, so that the next peek waits for more.
            self._head += await self._sock.recv(len(data))

    async def consume(self) -> None:
        """Take the peeked command out of the socket."""
        while self._unread:
            self._unread -= len(await self._sock.recv(self._unread))
        self._head = b""


@attrs.define(eq=False)
class FakeQMPServer:
    """The server's state and controls; get one from `fake_qmp_server`."""

    path: Path
    handler: Handler
    greeting: Mapping[str, object] | bytes | None
    #: Every command received, in order.
    commands: list[ReceivedCommand] = attrs.field(factory=list)
    #: Connections that have ended, however they ended.
    sessions_ended: int = 0
    _client: trio.socket.SocketType | None = None
    _sending: trio.Lock = attrs.field(factory=trio.Lock)
    _connected: trio.Event = attrs.field(factory=trio.Event)
    _ended: trio.Event = attrs.field(factory=trio.Event)

    async def wait_connected(self) -> None:
        """Wait until a client has been greeted."""
        await self._connected.wait()

    async def wait_sessions_ended(self, count: int = 1) -> None:
        """Wait until ``count`` connections have ended (the client left, or the server hung up)."""
        while self.sessions_ended < count:
            await self._ended.wait()

    async def emit(
        self, name: str, data: Mapping[str, object] | None = None, *, timestamp: float | None = None
    ) -> None:
        """Send the event ``name`` to the connected client.

        :param timestamp: seconds for its ``timestamp`` member; trio's clock when omitted.
        :raise RuntimeError: when no client is connected.
        """
        if self._client is None:
            raise RuntimeError("emit() with no client connected")
        stamp = trio.current_time() if timestamp is None else timestamp
        seconds = int(stamp)
        event: dict[str, object] = {
            "event": name,
            "timestamp": {"seconds": seconds, "microseconds": int((stamp - seconds) * 1e6)},
        }
        if data is not None:
            event["data"] = dict(data)
        await self._send(self._client, _encode(event))

    def hang_up(self) -> None:
        """Close the current client's connection now (QEMU died)."""
        if self._client is not None:
            self._client.close()

    async def _serve(self, listener: trio.socket.SocketType) -> None:
        while True:
            sock, _ = await listener.accept()
            with sock:
                self._client = sock
                try:
                    await self._session(sock)
                except (OSError, trio.ClosedResourceError):
                    pass  # the client or hang_up() ended the connection
                finally:
                    self._client = None
                    self._connected = trio.Event()
                    self.sessions_ended += 1
                    self._ended.set()
                    self._ended = trio.Event()

    async def _session(self, sock: trio.socket.SocketType) -> None:
        if self.greeting is None:
            await _drain(sock)
            return
        await self._send(
            sock,
            self.greeting + b"\r\n" if isinstance(self.greeting, bytes) else _encode(self.greeting),
        )
        self._connected.set()
        reader = _MessageReader(sock)
        negotiated = False
        while (text := await reader.peek()) is not None:
            try:
                message = json.loads(text)
                command = str(message["execute"])
                arguments = message.get("arguments", {})
            except (ValueError, KeyError, TypeError):
                await reader.consume()
                await self._reply(sock, None, ErrorReply("GenericError", "JSON parse error"))
                continue
            msg_id = message.get("id")
            self.commands.append(ReceivedCommand(command, arguments, msg_id))
            if command == "qmp_capabilities":
                await reader.consume()
                await self._reply(sock, msg_id, {} if not negotiated else _NEGOTIATED)
                negotiated = True
                continue
            if not negotiated:
                await reader.consume()
                await self._reply(sock, msg_id, _NOT_NEGOTIATED)
                continue
            answer = await self.handler(command, arguments)
            if not await self._answer(sock, reader, msg_id, answer):
                return

    async def _answer(
        self, sock: trio.socket.SocketType, reader: _MessageReader, msg_id: object, answer: object
    ) -> bool:
        """Carry out ``answer``; whether the session goes on."""
        while isinstance(answer, Delayed):
            await trio.sleep(answer.seconds)
            answer = answer.reply
        if isinstance(answer, Disconnect) and answer.stage is Stage.BEFORE_READ:
            return False  # closing with the command unread makes the kernel reset the connection
        await reader.consume()
        if isinstance(answer, Disconnect):
            if answer.stage is Stage.MID_REPLY:
                reply = _encode({"return": {"status": "running", "running": True}, "id": msg_id})
                await self._send(sock, reply[: len(reply) // 2])
            return False
        if isinstance(answer, Hang):
            await _drain(sock)
            return False
        await self._reply(sock, msg_id, answer)
        return True

    async def _reply(self, sock: trio.socket.SocketType, msg_id: object, answer: object) -> None:
        if isinstance(answer, Malformed):
            await self._send(sock, answer.line + b"\r\n")
            return
        if isinstance(answer, RawReply):
            message = dict(answer.message)
        elif isinstance(answer, ErrorReply):
            message = {"error": {"class": answer.error_class, "desc": answer.desc}}
        else:
            message = {"return": answer}
        if msg_id is not None:
            message["id"] = msg_id
        await self._send(sock, _encode(message))

    async def _send(self, sock: trio.socket.SocketType, data: bytes) -> None:
        async with self._sending:
            while data:
                data = data[await sock.send(data) :]


_NOT_NEGOTIATED = ErrorReply(
    "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
)
_NEGOTIATED = ErrorReply(
    "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
)


async def _drain(sock: trio.socket.SocketType) -> None:
    """Read and ignore everything until the client hangs up."""
    while await sock.recv(_CHUNK):
        pass


def _encode(message: Mapping[str, object]) -> bytes:
    return json.dumps(message).encode() + b"\r\n"


@asynccontextmanager
async def fake_qmp_server(
    tmp_path: Path,
    handler: Handler,
    *,
    greeting: Mapping[str, object] | bytes | None = QEMU_GREETING,
    socket_name: str = "fake-qmp.sock",
) -> AsyncIterator[FakeQMPServer]:
    """Serve QMP on ``tmp_path / socket_name`` while the block runs.

    :param greeting: the greeting object; raw bytes to send instead (a broken greeting); ``None``
        to never greet (a monitor that is busy with another client).
    """
    path = tmp_path / socket_name
    # Bound synchronously: trio's async bind() may use a thread, and the mock clock jumps
    # while a thread works.
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    plain.bind(str(path))
    plain.listen()
    with trio.socket.from_stdlib_socket(plain) as listener:
        server = FakeQMPServer(path, handler, greeting)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._serve, listener)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
    path.unlink(missing_ok=True)
