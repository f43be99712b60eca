"""The monitor relay (`livemig.relay`) between a QMP server and its clients, one at a time:
against a scripted QMP server here (its id and out-of-band rules), and against a real QEMU."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

GREETING = {"QMP": {"version": {"qemu": {"major": 10}}, "capabilities": ["oob"]}}


class ScriptedQemu:
    """A QMP server: greets, takes qmp_capabilities, then records each message and answers it
    with ``{"return": {"seen": NAME}}`` — except ``hold``, which it answers only after the next
    message (a reply that arrives late)."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)
        self.seen: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        self.server.close()
        with conn:
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.sendall(json.dumps(GREETING).encode())
        decoder, buffer, held = json.JSONDecoder(), "", None
        while data := conn.recv(65536):
            buffer += data.decode()
            while buffer.strip():
                try:
                    message, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break
                buffer = buffer.lstrip()[end:]
                self.seen.append(message)
                name = message.get("execute") or message.get("exec-oob")
                reply = {"return": {"seen": name}, "id": message.get("id")}
                if name == "hold":
                    held = reply
                    continue
                if held is not None:
                    conn.sendall(json.dumps(held).encode())
                    held = None
                conn.sendall(json.dumps(reply).encode())


def client(path: Path) -> tuple[socket.socket, Iterator[dict[str, Any]]]:
    sock = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            sock.connect(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.02)
    sock.settimeout(10)
    decoder = json.JSONDecoder()

    def messages() -> Iterator[dict[str, Any]]:
        buffer = ""
        while True:
            while buffer.strip():
                try:
                    message, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break
                buffer = buffer.lstrip()[end:]
                yield message
            buffer += sock.recv(65536).decode()

    return sock, messages()


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode())  # no newline: qemu.qmp sends none


@pytest.fixture
def relayed(tmp_path: Path) -> Iterator[tuple[ScriptedQemu, Path]]:
    qemu = ScriptedQemu(tmp_path / "qmp.sock")
    listen = tmp_path / "relay.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "livemig.relay", str(tmp_path / "qmp.sock"), str(listen)]
    )
    try:
        yield qemu, listen
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert not listen.exists()  # it removes its socket
        qemu.thread.join(timeout=10)


def test_each_client_gets_the_greeting_and_only_its_own_replies(
    relayed: tuple[ScriptedQemu, Path],
) -> None:
    qemu, listen = relayed
    first, said = client(listen)
    assert next(said) == GREETING
    send(first, {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1})
    assert next(said) == {"return": {}, "id": 1}  # answered by the relay: negotiated once
    send(first, {"execute": "hold", "id": 2})  # its reply comes after the client is gone
    for _ in range(1000):  # until it got there (a new client replaces this one at once)
        if len(qemu.seen) == 2:
            break
        time.sleep(0.01)
    first.close()
    second, said = client(listen)
    assert next(said) == GREETING
    send(second, {"execute": "qmp_capabilities", "id": 2})
    assert next(said) == {"return": {}, "id": 2}
    send(second, {"execute": "migrate-recover", "arguments": {"uri": "tcp:x:1"}, "id": 2})
    # The late reply to the first client's id 2 never reaches the second client.
    assert next(said) == {"return": {"seen": "migrate-recover"}, "id": 2}
    names = [m.get("execute") or m.get("exec-oob") for m in qemu.seen]
    assert names == ["qmp_capabilities", "hold", "migrate-recover"]
    assert qemu.seen[0]["arguments"] == {"enable": ["oob"]}
    assert "exec-oob" in qemu.seen[2]  # sent out of band
    second.close()


@pytest.mark.qemu
def test_it_holds_a_real_qemus_monitor(tmp_path: Path) -> None:
    qmp, listen = tmp_path / "qmp.sock", tmp_path / "relay.sock"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{qmp},server=on,wait=off"]
    )  # fmt: skip
    try:
        for _ in range(500):
            if qmp.exists():
                break
            time.sleep(0.01)
        relay = subprocess.Popen([sys.executable, "-m", "livemig.relay", str(qmp), str(listen)])
        for _round in range(2):  # a second client after the first went away
            sock, said = client(listen)
            assert "oob" in next(said)["QMP"]["capabilities"]
            send(sock, {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": "a"})
            assert next(said) == {"return": {}, "id": "a"}
            send(sock, {"execute": "query-status", "id": "b"})
            assert "status" in next(said)["return"]
            send(sock, {"execute": "migrate-pause", "id": "c"})  # out of band; refused here
            reply = next(said)
            assert reply["id"] == "c"
            assert "error" in reply
            sock.close()
        qemu.terminate()
        assert relay.wait(timeout=10) == 0  # QEMU went: so does the relay
        assert not listen.exists()
    finally:
        qemu.kill()
        qemu.wait()
