"""The host's side of the guest's serial console: heartbeats, boot id, poweroff.

A guest writing to one disk says ``heartbeat <seq>`` and ``poweroff <seq>``; one writing to
several disks (``livemig.disks=vda,vdb``) adds every disk's last written seq to both lines:
``heartbeat 17 vda=17 vdb=16``, where ``17`` is the first disk's.
"""

from __future__ import annotations

import re
from collections import deque

import attrs
import trio

from livemig.drivers.process import QemuProcess
from livemig.transports.errors import ProcessError, UsageError

_ACKS = r"((?: [a-z0-9]+=\d+)*)"  # " vda=17 vdb=16": each disk's last written seq
_HEARTBEAT = re.compile(r"heartbeat (\d+)" + _ACKS)
_BOOT = re.compile(r"boot ([0-9a-f]{16})")
_POWEROFF = re.compile(r"poweroff (\d+)" + _ACKS)
_ACK = re.compile(r"([a-z0-9]+)=(\d+)")
_DIRTY_RATE = re.compile(r"dirtyrate (\d+(?:\.\d+)?)")
_MAX_LINE = 64 * 1024  # a longer run without newline is cut into lines
_LOG_TAIL_LINES = 20  # lines quoted in errors


@attrs.frozen
class Heartbeat:
    """One ``heartbeat <seq>`` line: record ``seq`` is on the (first) disk.

    :param at: :func:`trio.current_time` when the host read the line.
    :param acks: with several disks, each disk's last written seq (``(("vda", 17), ("vdb",
        16))``), in the guest's order; empty for a guest with one disk.
    """

    seq: int
    at: float
    acks: tuple[tuple[str, int], ...] = ()


class _Empty(trio.abc.ReceiveStream):
    """A stream with nothing in it (a console parsed from text reads none)."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        del max_bytes
        return b""

    async def aclose(self) -> None:
        return None


def _acks(text: str) -> tuple[tuple[str, int], ...]:
    return tuple((m[1], int(m[2])) for m in _ACK.finditer(text))


@attrs.define(eq=False)
class SerialConsole:
    """Reads the guest's serial console and keeps what the workload said.

    Run :meth:`run` in a nursery for as long as the console is needed (it also keeps QEMU's
    stdout pipe drained, so a guest never stalls on a full pipe). Waiters wake on every parsed
    line; when the console ends (QEMU exited) they raise :class:`ProcessError`.

    ``dirty_rate_mib_s`` is the RAM dirtying rate the workload last reported (once a second).
    ``disk_acks`` is, for a guest writing to several disks, each disk's last acknowledged seq
    (from the latest heartbeat or the poweroff line); see :meth:`acked`.

    :param max_lines: how many raw lines (and heartbeats) to keep for diagnostics.
    """

    name: str
    _receive: trio.abc.ReceiveStream = attrs.field(alias="receive")
    _send: trio.abc.SendStream | None = attrs.field(default=None, alias="send")
    max_lines: int = 10_000
    lines: deque[str] = attrs.field(init=False)
    heartbeats: deque[Heartbeat] = attrs.field(init=False)
    boot_ids: list[int] = attrs.field(init=False, factory=list)
    poweroff_seq: int | None = attrs.field(init=False, default=None)
    disk_acks: dict[str, int] = attrs.field(init=False, factory=dict)
    dirty_rate_mib_s: float | None = attrs.field(init=False, default=None)
    closed: bool = attrs.field(init=False, default=False)
    _changed: trio.Event = attrs.field(init=False, factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self.lines = deque(maxlen=self.max_lines)
        self.heartbeats = deque(maxlen=self.max_lines)

    @classmethod
    def of(cls, qemu: QemuProcess, *, max_lines: int = 10_000) -> SerialConsole:
        """The console of a QEMU started with ``serial="stdio"``."""
        return cls(
            qemu.spec.name,
            receive=qemu.serial_receive_stream,
            send=qemu.serial_send_stream,
            max_lines=max_lines,
        )

    @property
    def boot_id(self) -> int | None:
        """The id the workload printed at its (latest) boot."""
        return self.boot_ids[-1] if self.boot_ids else None

    @property
    def last_heartbeat(self) -> Heartbeat | None:
        return self.heartbeats[-1] if self.heartbeats else None

    @property
    def last_acked(self) -> int:
        """The highest seq the guest acknowledged (0 before the first heartbeat)."""
        beat = self.heartbeats[-1].seq if self.heartbeats else 0
        return max(beat, self.poweroff_seq or 0)

    def acked(self, disk: str) -> int:
        """The highest seq the guest acknowledged on ``disk`` (``"vda"``; 0 before the first).

        A guest writing to one disk names none on its console: then every name gets
        :attr:`last_acked`, the acks of its one disk.

        :raise UsageError: when the guest writes to several disks and ``disk`` is not one.
        """
        if not self.disk_acks:
            return self.last_acked
        if disk not in self.disk_acks:
            raise UsageError(
                f"{self.name}: the guest acknowledges {sorted(self.disk_acks)}, not {disk!r}"
            )
        return self.disk_acks[disk]

    @classmethod
    def parse(cls, name: str, text: str) -> SerialConsole:
        """A console read from the text it wrote (a QEMU detached from us logs its serial to a
        file): every line taken as :meth:`run` would, nothing to wait for."""
        console = cls(name, receive=_Empty())
        for raw in text.encode().split(b"\n"):
            if raw:
                console._take(raw)
        console.closed = True
        return console

    def log_text(self) -> str:
        """The kept console lines, for diagnostics."""
        return "\n".join(self.lines)

    async def run(self) -> None:
        """Read the console until it ends (QEMU exited or its pipe was closed)."""
        pending = b""
        try:
            while True:
                chunk = await self._receive.receive_some()
                if not chunk:
                    break
                *complete, pending = (pending + chunk).split(b"\n")
                for raw in complete:
                    self._take(raw)
                if len(pending) > _MAX_LINE:
                    self._take(pending)
                    pending = b""
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the owner stopped QEMU and closed the pipe
        finally:
            if pending:
                self._take(pending)
            self.closed = True
            self._wake()

    def _take(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").strip("\r\n\x00 ")
        self.lines.append(line)
        if m := _HEARTBEAT.fullmatch(line):
            acks = _acks(m[2])
            self.heartbeats.append(Heartbeat(int(m[1]), trio.current_time(), acks))
            self.disk_acks.update(acks)
        elif m := _BOOT.fullmatch(line):
            self.boot_ids.append(int(m[1], 16))
        elif m := _POWEROFF.fullmatch(line):
            self.poweroff_seq = int(m[1])
            self.disk_acks.update(_acks(m[2]))
        elif m := _DIRTY_RATE.fullmatch(line):
            self.dirty_rate_mib_s = float(m[1])
        else:
            return
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _gone(self, waiting_for: str) -> ProcessError:
        tail = "\n".join(list(self.lines)[-_LOG_TAIL_LINES:])
        return ProcessError(
            f"{self.name}: console ended while waiting for {waiting_for}", stderr_tail=tail
        )

    async def wait_boot(self) -> int:
        """Wait until the workload printed its boot id and return it."""
        while not self.boot_ids:
            if self.closed:
                raise self._gone("the boot id")
            await self._changed.wait()
        return self.boot_ids[-1]

    async def wait_heartbeat(self, after_seq: int | None = None) -> Heartbeat:
        """Wait for a heartbeat with a seq above ``after_seq`` (default: the last one seen) and
        return the latest heartbeat.

        :raise ProcessError: when the console ends first.
        """
        floor = self.last_acked if after_seq is None else after_seq
        while not (self.heartbeats and self.heartbeats[-1].seq > floor):
            if self.closed:
                raise self._gone(f"a heartbeat after {floor}")
            await self._changed.wait()
        return self.heartbeats[-1]

    async def send_line(self, line: str) -> None:
        """Type one line on the console (e.g. ``"poweroff"``).

        :raise ProcessError: when the console has no input side or QEMU went away.
        """
        if self._send is None:
            raise ProcessError(f"{self.name}: console has no input")
        try:
            await self._send.send_all(line.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            raise ProcessError(f"{self.name}: cannot write to the console") from err

    async def wait_poweroff(self) -> int:
        """Wait for ``poweroff <seq>`` and return that last written seq.

        :raise ProcessError: when the console ends first.
        """
        while self.poweroff_seq is None:
            if self.closed:
                raise self._gone("poweroff")
            await self._changed.wait()
        return self.poweroff_seq
