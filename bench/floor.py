"""The floor: how long the bytes a migration must move take through a local socket.

A plain stream of the same size through a unix stream socket, one sending and one receiving OS
thread (both release the GIL in the system call, so on two cores they run side by side), 1 MiB
per call. Measured in the same run as the migrations it is compared with.
"""

from __future__ import annotations

import socket

import attrs
import trio

__all__ = ["StreamTiming", "stream_through_unix_socket"]

_CHUNK = 1 << 20


@attrs.frozen
class StreamTiming:
    nbytes: int
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")


def _send(sock: socket.socket, nbytes: int) -> None:
    data = memoryview(bytes(_CHUNK))
    left = nbytes
    while left > 0:
        sent = sock.send(data[: min(left, _CHUNK)])
        left -= sent
    sock.shutdown(socket.SHUT_WR)


def _receive(sock: socket.socket, nbytes: int) -> int:
    buf = bytearray(_CHUNK)
    got = 0
    while got < nbytes:
        n = sock.recv_into(buf)
        if n == 0:
            break
        got += n
    return got


async def stream_through_unix_socket(nbytes: int) -> StreamTiming:
    """Stream ``nbytes`` from one thread to another through a unix socket and time it."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    received: list[int] = []
    limiter = trio.CapacityLimiter(2)
    try:
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: trio.to_thread.run_sync(_send, a, nbytes, limiter=limiter))
            received.append(await trio.to_thread.run_sync(_receive, b, nbytes, limiter=limiter))
        elapsed = trio.current_time() - started
    finally:
        a.close()
        b.close()
    if received[0] != nbytes:
        raise RuntimeError(f"streamed {received[0]} of {nbytes} bytes")
    return StreamTiming(nbytes, elapsed)
