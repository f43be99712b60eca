"""An in-process model of a QEMU process and its QMP monitor, for fast fault campaigns.

`FakeQemu` is one QEMU: its run state, the guest it holds, its block layer
(:mod:`livemig.testing.model.block`) and its migration (:mod:`livemig.testing.model.migration`).
`FakeMonitor` implements `livemig.drivers.qmp.Monitor` on it with no socket: commands run at once,
in order, and events reach every open ``listen`` block. Two of them, a host and a running guest
make a :class:`livemig.testing.model.world.World`.

The guest: while a QEMU runs it, it writes one numbered record per tick to the disk's active
layer and counts it as acknowledged. A QEMU that runs without having received the guest's state
starts a new guest (a reboot); two QEMUs running copies of one guest write the same numbers.
"""

from __future__ import annotations

import itertools
import types
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from livemig.drivers.qmp import EventStream, QMPEvent
from livemig.drivers.status import JobStatus, RunState
from livemig.testing.model.block import (
    BLOCK_COMMANDS,
    Export,
    Job,
    Node,
    QemuError,
    forward_write,
    pause_jobs_for_stop,
)
from livemig.testing.model.migration import CAPABILITIES, MIGRATION_COMMANDS, PARAMETERS, Migration
from livemig.transports.errors import CommandFailed, ConnectionLost, MonitorClosed

if TYPE_CHECKING:
    from livemig.testing.model.world import World

__all__ = ["RECORDS_PER_BOOT", "Command", "FakeMonitor", "FakeQemu", "Guest"]

#: Record numbers of boot ``b`` are ``b * RECORDS_PER_BOOT + n``, n = 1, 2, …
RECORDS_PER_BOOT = 1_000_000


@attrs.frozen
class Command:
    """One command a QEMU carried out, and its run state when it arrived."""

    name: str
    arguments: Mapping[str, Any]
    runstate: RunState


@attrs.define
class Guest:
    """The guest's memory as far as the model cares: which boot it is, and its last record."""

    boot: int
    last: int = 0

    def next_record(self) -> int:
        self.last += 1
        return self.boot * RECORDS_PER_BOOT + self.last


@attrs.define(eq=False)
class FakeQemu:
    world: World
    name: str
    qmp: Path
    runstate: RunState
    nodes: dict[str, Node]
    #: The node the guest's disk device is attached to (the active layer).
    device: Node
    guest: Guest | None = None
    alive: bool = True
    #: Why the process ended (``quit``, ``killed``, …).
    exit_reason: str | None = None
    jobs: dict[str, Job] = attrs.field(factory=dict)
    exports: dict[str, Export] = attrs.field(factory=dict)
    nbd_server: str | None = None
    migration: Migration = attrs.field(factory=Migration)
    capabilities: dict[str, bool] = attrs.field(factory=lambda: dict.fromkeys(CAPABILITIES, False))
    #: Why this QEMU would refuse to migrate (its `query-migrate` says so before any migration).
    blocked_reasons: list[str] = attrs.field(factory=list)
    parameters: dict[str, Any] = attrs.field(factory=lambda: dict(PARAMETERS))
    #: ``cont`` was sent while incoming: run as soon as the migration completes.
    autostart: bool = False
    monitors: set[FakeMonitor] = attrs.field(factory=set)
    #: Every command this QEMU carried out, in order.
    log: list[Command] = attrs.field(factory=list)
    #: Commands and connections tried after the process ended (whoever tried saw it gone).
    tries_after_exit: int = 0
    _implicit: itertools.count[int] = attrs.field(factory=lambda: itertools.count(100))

    def implicit_name(self) -> str:
        return f"#block{next(self._implicit)}"

    # -- commands and events --

    def execute(self, command: str, arguments: Mapping[str, Any]) -> Any:
        """Carry out one command and return its ``return`` value.

        :raise QemuError: QEMU's error reply.
        """
        self.log.append(Command(command, arguments, self.runstate))
        handler = _COMMANDS.get(command)
        if handler is None:
            raise QemuError(f"The command {command} has not been found", "CommandNotFound")
        return handler(self, arguments)

    def emit(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        event = QMPEvent(name, types.MappingProxyType(dict(data or {})), self.world.now())
        for monitor in self.monitors:
            monitor.deliver(event)

    def job_status(self, job: Job, status: JobStatus) -> None:
        job.status = status
        self.emit("JOB_STATUS_CHANGE", {"id": job.id, "status": status})

    # -- the guest --

    def start_guest(self) -> None:
        self.runstate = RunState.RUNNING
        for node in self.nodes.values():
            node.active = True
        self.emit("RESUME")

    def stop_guest(self, runstate: RunState) -> None:
        was_running = self.runstate.running
        self.runstate = runstate
        if was_running:
            self.emit("STOP")
            pause_jobs_for_stop(self)

    def write_record(self) -> None:
        """One tick of the guest's workload: a record to the active layer, acknowledged."""
        if self.guest is None:
            self.guest = Guest(self.world.new_boot())  # no state came: the guest boots afresh
        record = self.guest.next_record()
        assert self.device.image is not None
        self.device.image.records.add(record)
        forward_write(self, self.device, record)
        self.world.acknowledge(self, record)

    # -- the process --

    def die(self, reason: str) -> None:
        """The process exits: its monitors drop, its jobs, exports and listeners are gone."""
        if not self.alive:
            return
        self.alive = False
        self.exit_reason = reason
        self.runstate = RunState.SHUTDOWN
        self.jobs.clear()
        self.exports.clear()
        self.nbd_server = None
        for monitor in self.monitors:
            monitor.wake()
        self.world.died(self)


# -- run state, identity ------------------------------------------------------------------------


def _query_status(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    del args
    return {"status": qemu.runstate, "running": qemu.runstate.running, "singlestep": False}


def _cont(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    del args
    if qemu.runstate is RunState.INMIGRATE:
        qemu.autostart = True  # as QEMU does: run once the incoming migration completes
    elif qemu.runstate is RunState.FINISH_MIGRATE:
        raise QemuError("the fake does not model cont during finish-migrate")
    elif not qemu.runstate.running:
        qemu.start_guest()
    return {}


def _stop(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    del args
    if qemu.runstate is RunState.INMIGRATE:
        qemu.autostart = False
    elif qemu.runstate.running:
        qemu.stop_guest(RunState.PAUSED)
    return {}


def _quit(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    del args
    qemu.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    qemu.world.after(0, lambda: qemu.die("quit"))  # it replies, then exits
    return {}


def _query_memory_size_summary(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    del qemu, args
    return {"base-memory": 512 * 1024 * 1024, "plugged-memory": 0}


def _query_version(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    del qemu, args
    return {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "fake"}


def _qom_get(qemu: FakeQemu, args: Mapping[str, Any]) -> str:
    del qemu
    if (args.get("path"), args.get("property")) != ("/machine", "type"):
        raise QemuError(f"Property '{args.get('property')}' not found", "GenericError")
    return "pc-q35-10.0-machine"


_COMMANDS: Mapping[str, Callable[[FakeQemu, Mapping[str, Any]], Any]] = {
    "qom-get": _qom_get,
    "qom-list": lambda qemu, args: [],
    "query-status": _query_status,
    "cont": _cont,
    "stop": _stop,
    "quit": _quit,
    "query-memory-size-summary": _query_memory_size_summary,
    "query-version": _query_version,
    **BLOCK_COMMANDS,
    **MIGRATION_COMMANDS,
}


# -- the monitor --------------------------------------------------------------------------------


class FakeMonitor:
    """A `livemig.drivers.qmp.Monitor` connected to a `FakeQemu`, without a socket."""

    def __init__(self, qemu: FakeQemu, name: str) -> None:
        self.qemu = qemu
        self._name = name
        self.closed = False
        self._streams: set[_FakeStream] = set()
        qemu.monitors.add(self)

    @property
    def name(self) -> str:
        return self._name

    def gone(self) -> MonitorClosed | ConnectionLost | None:
        if self.closed:
            return MonitorClosed("used after close", monitor=self._name)
        if not self.qemu.alive:
            self.qemu.tries_after_exit += 1
            reason = self.qemu.exit_reason
            return ConnectionLost(f"connection lost (QEMU exited: {reason})", monitor=self._name)
        return None

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        await trio.lowlevel.checkpoint()
        if (error := self.gone()) is not None:
            raise error
        args = dict(arguments or {})
        try:
            return self.qemu.execute(command, args)
        except QemuError as err:
            raise CommandFailed(
                monitor=self._name,
                command=command,
                arguments=args,
                error_class=err.error_class,
                desc=err.desc,
            ) from err

    def listen(self, *names: str) -> AbstractAsyncContextManager[EventStream]:
        return self._listen(names)

    @asynccontextmanager
    async def _listen(self, names: tuple[str, ...]) -> AsyncIterator[EventStream]:
        if self.closed:
            raise MonitorClosed("listen() after close", monitor=self._name)
        stream = _FakeStream(self, frozenset(names))
        self._streams.add(stream)
        try:
            yield stream
        finally:
            self._streams.discard(stream)
            stream.finished = True
            stream.wake()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.closed = True
        self.qemu.monitors.discard(self)
        self.wake()

    def deliver(self, event: QMPEvent) -> None:
        for stream in self._streams:
            stream.deliver(event)

    def wake(self) -> None:
        for stream in self._streams:
            stream.wake()


class _FakeStream(EventStream):
    def __init__(self, monitor: FakeMonitor, names: frozenset[str]) -> None:
        self._monitor = monitor
        self._names = names
        self._buffer: deque[QMPEvent] = deque()
        self._changed = trio.Event()
        self.finished = False

    def deliver(self, event: QMPEvent) -> None:
        if not self._names or event.name in self._names:
            self._buffer.append(event)
            self.wake()

    def wake(self) -> None:
        self._changed.set()

    async def receive(self) -> QMPEvent:
        await trio.lowlevel.checkpoint()
        while not self._buffer:
            if self.finished:
                raise MonitorClosed(
                    "event stream used after its listen() block ended", monitor=self._monitor.name
                )
            if (error := self._monitor.gone()) is not None:
                raise error
            self._changed = trio.Event()
            await self._changed.wait()
        return self._buffer.popleft()
