"""``livemig remote-target relay``: hold a launched target's QMP monitor on its own host.

A target on another host is controlled through a forwarded socket (`livemig.remote`), and a
forward dies with its ssh connection. QEMU serves one monitor client at a time and negotiates
each one in its main loop — which, in a post-copy whose link broke, may be blocked on a guest
page that will only come once the link is resumed. A new connection then cannot even be
greeted, and ``migrate-recover`` could never be sent. (libvirt does not meet this: its monitor
connection is local to the target host.)

So the monitor connection lives on the target host, in this relay: it connects to QEMU's QMP
socket once, negotiates it (with out-of-band execution, which QEMU offers on socket monitors),
and serves one client at a time on its own socket: the greeting QEMU sent, ``qmp_capabilities``
answered here, every other line passed on with its ``id`` tagged per client (so that a reply to
a client that went away never reaches the next one), events to the current client. A new
client replaces the old one. ``migrate-recover`` and ``migrate-pause`` are sent out of band
(``exec-oob``): QEMU runs them in its monitor thread, even while its main loop is blocked.

It exits when QEMU closes the monitor (QEMU exited), on SIGTERM (livemig stops it once the
guest runs on the target, handing the monitor back to the operator), and removes its socket.
Plain blocking I/O with ``selectors``: one small process, nothing else to run.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
from pathlib import Path
from typing import Any

__all__ = ["relay"]

_CHUNK = 65536
#: Commands sent out of band (QEMU runs them in its monitor thread, even while its main loop
#: waits for a post-copy page): what resuming a broken post-copy needs.
OUT_OF_BAND = frozenset({"migrate-recover", "migrate-pause"})


class _Lines:
    """A socket read as a stream of JSON values (QMP needs no newline between them: qemu.qmp
    sends none)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = ""
        self._decoder = json.JSONDecoder()
        #: Values read by :func:`_first` and not yet taken.
        self.early: list[Any] = []

    def read(self) -> list[Any] | None:
        """The complete values now readable; ``None`` at the end of the stream."""
        try:
            data = self.sock.recv(_CHUNK)
        except OSError:
            return None
        if not data:
            return None
        self.buffer += data.decode(errors="replace")
        return self.take()

    def take(self) -> list[Any]:
        """The complete values in the buffer (the rest stays for the next read)."""
        values = []
        while self.buffer.strip():
            text = self.buffer.lstrip()
            try:
                value, end = self._decoder.raw_decode(text)
            except ValueError:
                break  # incomplete: more is coming
            values.append(value)
            self.buffer = text[end:]
        return values


def _send(sock: socket.socket, message: Any) -> bool:
    try:
        sock.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        return False
    return True


def relay(qmp: Path, listen: Path) -> int:
    """Hold ``qmp`` and serve it on ``listen`` until QEMU goes or SIGTERM; exit status."""
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu.connect(os.fspath(qmp))
    upstream = _Lines(qemu)
    greeting = _first(upstream)
    offered = greeting.get("QMP", {}).get("capabilities", [])
    enable = ["oob"] if "oob" in offered else []
    _send(qemu, {"execute": "qmp_capabilities", "arguments": {"enable": enable}, "id": "relay"})
    while (reply := _first(upstream)).get("id") != "relay":
        pass
    if "error" in reply:
        return 1
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        listen.unlink()
    old = os.umask(0o177)
    try:
        server.bind(os.fspath(listen))
    finally:
        os.umask(old)
    server.listen(4)
    stop_r, stop_w = os.pipe()
    signal.signal(signal.SIGTERM, lambda *_: os.write(stop_w, b"x"))
    try:
        _serve(qemu, upstream, server, greeting, stop_r)
    finally:
        with contextlib.suppress(OSError):
            listen.unlink()
    return 0


def _first(lines: _Lines) -> dict[str, Any]:
    """The next value from QEMU (its greeting, the negotiation's reply), before serving."""
    while not lines.early:
        got = lines.read()
        if got is None:
            raise SystemExit(1)
        lines.early.extend(got)
    return dict(lines.early.pop(0))


def _serve(
    qemu: socket.socket,
    upstream: _Lines,
    server: socket.socket,
    greeting: dict[str, Any],
    stop: int,
) -> None:
    upstream.early.clear()  # events QEMU sent during the negotiation: before any client
    selector = selectors.DefaultSelector()
    selector.register(qemu, selectors.EVENT_READ, "qemu")
    selector.register(server, selectors.EVENT_READ, "accept")
    selector.register(stop, selectors.EVENT_READ, "stop")
    client: _Lines | None = None
    generation = 0
    while True:
        for key, _ in selector.select():
            if key.data == "stop":
                return
            if key.data == "accept":
                sock, _ = server.accept()
                if client is not None:  # a new client replaces the old: it went away
                    selector.unregister(client.sock)
                    client.sock.close()
                generation += 1
                client = _Lines(sock)
                selector.register(sock, selectors.EVENT_READ, "client")
                _send(sock, greeting)
            elif key.data == "qemu":
                lines = upstream.read()
                if lines is None:
                    return  # QEMU closed its monitor: it exited
                for message in lines:
                    _to_client(client, generation, message)
            elif key.data == "client" and client is not None:
                lines = client.read()
                if lines is None:
                    selector.unregister(client.sock)
                    client.sock.close()
                    client = None
                    continue
                for message in lines:
                    _to_qemu(qemu, client, generation, message)


def _to_qemu(qemu: socket.socket, client: _Lines, generation: int, message: Any) -> None:
    if not isinstance(message, dict):
        return
    if message.get("execute") == "qmp_capabilities":
        _send(client.sock, {"return": {}, **({"id": message["id"]} if "id" in message else {})})
        return
    if "id" in message:
        message = {**message, "id": f"{generation}|{json.dumps(message['id'])}"}
        if message.get("execute") in OUT_OF_BAND:
            message = {"exec-oob": message.pop("execute"), **message}
    _send(qemu, message)


def _to_client(client: _Lines | None, generation: int, message: Any) -> None:
    if client is None or not isinstance(message, dict):
        return
    tag = message.get("id")
    if isinstance(tag, str) and "|" in tag:
        owner, _, original = tag.partition("|")
        if owner != str(generation):
            return  # a reply to a client that went away
        message = {**message, "id": json.loads(original)}
    _send(client.sock, message)


if __name__ == "__main__":
    sys.exit(relay(Path(sys.argv[1]), Path(sys.argv[2])))
