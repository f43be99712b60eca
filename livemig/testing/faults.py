"""Fault injection: a plan of faults, and the wrappers that make them happen to a running migration.

Faults are values: a :class:`FaultPlan` is a tuple of :class:`Fault`, each a :class:`FaultKind`
and the point where it strikes (:class:`AtState` or :class:`AtCommand`), plus a seed; it reads and
writes JSON so a campaign's report can be replayed. A :class:`FaultInjector` makes a plan happen
through the runner's own seams only — nothing in the runner or the steps knows about faults::

    injector = FaultInjector(plan, kill=kill_qemu, cut_nbd=cut_nbd_link)
    result = await migrate(
        plan_of_migration,
        on_event=injector.on_event,
        connector=injector.connector(connect_monitor),
        host=injector.host(LocalHost()),
        interrupt=injector.interrupt,
    )
    injector.fired      # what actually struck, and where
    injector.unfired()  # faults whose point was never reached

A *point* is one operation the runner makes: a QMP command on one side, or a host operation
(:data:`HOST_OPERATIONS`). Every fault fires at most once, at the first point that matches it.
How each kind acts is in :class:`FaultKind`.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from livemig.drivers.host import Host
from livemig.drivers.image import ImageFormat
from livemig.drivers.qmp import EventStream, Monitor, QMPEvent
from livemig.fsm.events import Event, StateEntered
from livemig.fsm.machine import TERMINAL, State
from livemig.fsm.runner import Connector
from livemig.fsm.undo import Side
from livemig.transports.endpoints import Endpoint, Tls
from livemig.transports.errors import (
    CommandFailed,
    ConnectionLost,
    MonitorClosed,
    ProtocolError,
    QMPError,
    ToolError,
    UsageError,
)

__all__ = [
    "HOST_OPERATIONS",
    "AtCommand",
    "AtState",
    "Fault",
    "FaultInjector",
    "FaultKind",
    "FaultPlan",
    "FaultyHost",
    "FaultyMonitor",
    "Fired",
    "Where",
]


class FaultKind(enum.StrEnum):
    """What goes wrong. Each member says where it can strike and what the runner then sees."""

    #: QEMU refuses the command (``GenericError``); it did nothing. QMP commands only.
    QMP_ERROR = "qmp-error"
    #: QEMU carries the command out but never replies: the runner's command deadline must fire.
    #: QMP commands only.
    HANG = "hang"
    #: The monitor connection drops before QEMU reads the command: this command and every later
    #: one on that monitor raise ``ConnectionLost``, its event streams end. QEMU lives on.
    #: QMP commands only.
    DISCONNECT = "disconnect"
    #: QEMU carries the command out but its reply is not QMP: ``ProtocolError``. QMP only.
    MALFORMED = "malformed"
    #: The source QEMU process dies (the environment's ``kill``), then the operation goes on.
    KILL_SOURCE = "kill-source"
    #: The target QEMU process dies, likewise.
    KILL_TARGET = "kill-target"
    #: The NBD link between source and target is cut (the environment's ``cut_nbd``): the
    #: mirror fails at its next write, new NBD connections fail.
    CUT_NBD = "cut-nbd"
    #: The work directory is full: creating a directory or an image fails (``ToolError``).
    #: Host operations ``make-dir`` and ``create-image`` only.
    DISK_FULL = "disk-full"
    #: The operator cancels: the injector's ``interrupt`` event is set.
    CANCEL = "cancel"
    #: livemig itself is killed: from here on nothing it does reaches a QEMU or the host (every
    #: later operation raises without touching anything), so its shielded revert does nothing.
    #: What is left is what ``livemig recover`` must bring to safety.
    CRASH = "crash"


#: Kinds that replace the reply of one QMP command.
_QMP_KINDS = frozenset(
    {FaultKind.QMP_ERROR, FaultKind.HANG, FaultKind.DISCONNECT, FaultKind.MALFORMED}
)
#: Kinds that happen *beside* the operation they strike at; the operation then goes on.
_BESIDE_KINDS = frozenset(
    {
        FaultKind.KILL_SOURCE,
        FaultKind.KILL_TARGET,
        FaultKind.CUT_NBD,
        FaultKind.CANCEL,
        FaultKind.CRASH,
    }
)
#: Kinds that an :class:`AtState` fault fires on entering the state, not at an operation.
_ON_ENTRY_KINDS = frozenset({FaultKind.CANCEL, FaultKind.CRASH})

#: Names of the host operations (:class:`~livemig.drivers.host.Host` methods), as :class:`AtCommand`
#: takes them.
HOST_OPERATIONS = ("make-dir", "create-image", "copy-to-nbd", "remove")
#: Host operations that write to the work directory (where ``disk-full`` strikes).
_WRITES_WORK_DIR = frozenset({"make-dir", "create-image"})
#: Seconds the operation after a ``cancel`` waits, so that the runner's cancellation lands
#: before it, whatever order trio runs the woken tasks in (campaigns must be deterministic).
_CANCEL_LANDS = 0.001


def _fault_state(instance: object, attribute: attrs.Attribute[State], value: State) -> None:
    del instance, attribute
    if value in TERMINAL:
        raise UsageError(f"a fault cannot strike in the terminal state {value.value}")


@attrs.frozen
class AtState:
    """Strike at the first operation the runner makes while the machine is in ``state`` (on
    ``side``, when given; host operations have no side). ``cancel`` and ``crash`` without a side
    strike as the state is entered."""

    state: State = attrs.field(converter=State, validator=_fault_state)
    side: Side | None = attrs.field(default=None, converter=attrs.converters.optional(Side))

    def describe(self) -> str:
        return f"in {self.state.value}" + (f" on {self.side.value}" if self.side else "")

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "side": self.side.value if self.side else None}


@attrs.frozen
class AtCommand:
    """Strike at the ``nth`` call of ``command`` (a QMP command, or a host operation from
    :data:`HOST_OPERATIONS`) on ``side`` (any side when ``None``), counting from the start of
    the run, revert included."""

    command: str
    nth: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    side: Side | None = attrs.field(default=None, converter=attrs.converters.optional(Side))

    def describe(self) -> str:
        side = f" on {self.side.value}" if self.side else ""
        return f"at {self.command} #{self.nth}{side}"

    def to_json(self) -> dict[str, Any]:
        side = self.side.value if self.side else None
        return {"command": self.command, "nth": self.nth, "side": side}


Where = AtState | AtCommand


@attrs.frozen
class Fault:
    kind: FaultKind = attrs.field(converter=FaultKind)
    where: Where

    def describe(self) -> str:
        return f"{self.kind.value} {self.where.describe()}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "at": self.where.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fault:
        at = data["at"]
        where: Where = (
            AtCommand(at["command"], int(at.get("nth", 1)), at.get("side"))
            if "command" in at
            else AtState(at["state"], at.get("side"))
        )
        return cls(data["kind"], where)


def _tuple_of_faults(faults: Iterable[Fault]) -> tuple[Fault, ...]:
    return tuple(faults)


@attrs.frozen
class FaultPlan:
    """The faults of one run, and the seed of the campaign example that chose them."""

    faults: tuple[Fault, ...] = attrs.field(converter=_tuple_of_faults)
    seed: int = 0

    def describe(self) -> str:
        return "; ".join(f.describe() for f in self.faults) or "no fault"

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "faults": [f.to_json() for f in self.faults]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaultPlan:
        """Read a plan written by :meth:`to_json`.

        :raise UsageError: when it is not one.
        """
        try:
            return cls(tuple(Fault.from_json(f) for f in data["faults"]), int(data["seed"]))
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"not a fault plan: {err}") from err


@attrs.frozen
class Fired:
    """A fault that struck: in which state, at which operation, on which side."""

    fault: Fault
    state: State
    operation: str
    side: Side | None

    def describe(self) -> str:
        at = f"{self.operation} on {self.side.value}" if self.side else self.operation
        return f"{self.fault.kind.value} in {self.state.value} at {at}"


@attrs.define(eq=False)
class FaultInjector:
    """Makes a :class:`FaultPlan` happen to one run, through the runner's seams.

    :param kill: kills one side's QEMU process (a model marks it dead; on real QEMU, SIGKILL).
        Needed when the plan has ``kill-*`` faults.
    :param cut_nbd: cuts the NBD link between the two QEMUs. Needed for ``cut-nbd``.
    :param on_crash: called the moment livemig "dies" (``crash``), e.g. to keep its journal as
        a killed process leaves it: the run goes on afterwards, touching nothing.
    :param transit: seconds each side's command travels before it reaches the injector. On fake
        QEMUs (which answer in no time) two sides' commands sent at once would otherwise reach it
        in the order trio happens to run their tasks; distinct transits order them, so a plan
        strikes the same command in every replay.
    :raise UsageError: when the plan needs a callback that was not given.
    """

    plan: FaultPlan
    kill: Callable[[Side], Awaitable[None]] | None = attrs.field(default=None, kw_only=True)
    cut_nbd: Callable[[], Awaitable[None]] | None = attrs.field(default=None, kw_only=True)
    on_crash: Callable[[], None] | None = attrs.field(default=None, kw_only=True)
    transit: Mapping[Side, float] = attrs.field(factory=dict, kw_only=True)
    #: Give this to the runner as ``interrupt``; ``cancel`` sets it.
    interrupt: trio.Event = attrs.field(factory=trio.Event, init=False)
    #: The state the runner last announced.
    state: State = attrs.field(default=State.IDLE, init=False)
    #: Faults that struck, in order.
    fired: list[Fired] = attrs.field(factory=list, init=False)
    #: Set once ``crash`` struck: nothing the run does reaches anything any more.
    crashed: bool = attrs.field(default=False, init=False)
    _done: set[int] = attrs.field(factory=set, init=False)
    _cancel_landed: bool = attrs.field(default=False, init=False)
    _calls: Counter[tuple[str, Side | None]] = attrs.field(factory=Counter, init=False)

    def __attrs_post_init__(self) -> None:
        kinds = {f.kind for f in self.plan.faults}
        if kinds & {FaultKind.KILL_SOURCE, FaultKind.KILL_TARGET} and self.kill is None:
            raise UsageError("this fault plan kills QEMUs: give the injector a kill callback")
        if FaultKind.CUT_NBD in kinds and self.cut_nbd is None:
            raise UsageError("this fault plan cuts the NBD link: give the injector cut_nbd")

    # -- the runner's seams --

    def connector(self, inner: Connector) -> Connector:
        """Wrap a connector: each monitor it opens is a :class:`FaultyMonitor`."""

        async def connect(path: Path, name: str) -> Monitor:
            self._check_crashed(Side(name))
            return FaultyMonitor(await inner(path, name), Side(name), self)

        return connect

    def host(self, inner: Host) -> Host:
        """Wrap the runner's host tools."""
        return FaultyHost(inner, self)

    def on_event(self, event: Event) -> None:
        """The runner's ``on_event``: learns the state; fires ``cancel``/``crash`` on entry."""
        if not isinstance(event, StateEntered) or self.crashed:
            return
        self.state = State(event.state)
        for index, fault in enumerate(self.plan.faults):
            where = fault.where
            if (
                index not in self._done
                and fault.kind in _ON_ENTRY_KINDS
                and isinstance(where, AtState)
                and where.side is None
                and where.state is self.state
            ):
                self._fire(index, "entering the state", None)

    def unfired(self) -> tuple[Fault, ...]:
        """Faults whose point the run never reached."""
        return tuple(f for i, f in enumerate(self.plan.faults) if i not in self._done)

    def report(self) -> dict[str, Any]:
        """What a campaign records for this run (JSON-ready; ``plan`` replays it)."""
        return {
            "plan": self.plan.to_json(),
            "fired": [f.describe() for f in self.fired],
            "unfired": [f.describe() for f in self.unfired()],
        }

    # -- points --

    async def strike(self, operation: str, side: Side | None) -> FaultKind | None:
        """Called before each operation. Carries out the faults that happen beside it, and
        returns the kind that replaces its outcome, if any (at most one per operation).

        :raise ConnectionLost: once livemig has "crashed".
        """
        self._calls[(operation, side)] += 1
        if side is not None:
            self._calls[(operation, None)] += 1
        self._check_crashed(side)
        await self._let_cancel_land()
        due = [
            i
            for i, fault in enumerate(self.plan.faults)
            if i not in self._done and self._matches(fault, operation, side)
        ]
        for index in due:
            if self.plan.faults[index].kind in _BESIDE_KINDS:
                await self._beside(index, operation, side)
                self._check_crashed(side)
        await self._let_cancel_land()
        for index in due:
            if self.plan.faults[index].kind not in _BESIDE_KINDS:
                self._fire(index, operation, side)
                return self.plan.faults[index].kind
        return None

    async def _let_cancel_land(self) -> None:
        """Once ``cancel`` fired, the next operation does not start before the runner's
        cancellation reached it (within a shielded revert it goes on after a moment)."""
        if self.interrupt.is_set() and not self._cancel_landed:
            self._cancel_landed = True
            await trio.sleep(_CANCEL_LANDS)

    def _check_crashed(self, side: Side | None) -> None:
        if self.crashed:
            name = side.value if side is not None else "host"
            raise ConnectionLost("livemig crashed (injected): nothing reaches QEMU", monitor=name)

    def _matches(self, fault: Fault, operation: str, side: Side | None) -> bool:
        is_host = operation in HOST_OPERATIONS
        if fault.kind in _QMP_KINDS and is_host:
            return False
        if fault.kind is FaultKind.DISK_FULL and operation not in _WRITES_WORK_DIR:
            return False
        where = fault.where
        if where.side is not None and where.side is not side:
            return False
        if isinstance(where, AtCommand):
            return where.command == operation and self._calls[(operation, where.side)] == where.nth
        if fault.kind in _ON_ENTRY_KINDS and where.side is None:
            return False  # fired by on_event
        return where.state is self.state

    async def _beside(self, index: int, operation: str, side: Side | None) -> None:
        self._fire(index, operation, side)
        kind = self.plan.faults[index].kind
        if kind in (FaultKind.KILL_SOURCE, FaultKind.KILL_TARGET):
            assert self.kill is not None
            await self.kill(Side.SOURCE if kind is FaultKind.KILL_SOURCE else Side.TARGET)
        elif kind is FaultKind.CUT_NBD:
            assert self.cut_nbd is not None
            await self.cut_nbd()

    def _fire(self, index: int, operation: str, side: Side | None) -> None:
        fault = self.plan.faults[index]
        self._done.add(index)
        self.fired.append(Fired(fault, self.state, operation, side))
        if fault.kind is FaultKind.CANCEL:
            self.interrupt.set()
        elif fault.kind is FaultKind.CRASH:
            self.crashed = True
            if self.on_crash is not None:
                self.on_crash()


class FaultyMonitor:
    """A :class:`~livemig.drivers.qmp.Monitor` whose commands the injector may answer instead."""

    def __init__(self, inner: Monitor, side: Side, injector: FaultInjector) -> None:
        self._inner, self._side, self._injector = inner, side, injector
        #: Set by a ``disconnect`` fault: the connection is gone for good.
        self._dropped = False
        self._closed = False

    @property
    def name(self) -> str:
        return self._inner.name

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        return await self._through(command, partial(self._inner.execute, command, arguments))

    async def _through(self, command: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Send ``command`` (by ``call``), or what the injector makes of it."""
        if self._dropped:
            raise self._lost(command)
        if (transit := self._injector.transit.get(self._side)) is not None:
            await trio.sleep(transit)
        kind = await self._injector.strike(command, self._side)
        if self._dropped:  # another task's command dropped it while this one waited
            raise self._lost(command)
        match kind:
            case None:
                return await call()
            case FaultKind.QMP_ERROR:
                raise CommandFailed(
                    monitor=self.name,
                    command=command,
                    arguments=None,
                    error_class="GenericError",
                    desc="injected fault",
                )
            case FaultKind.HANG:
                await self._carry_out(call)
                await trio.sleep_forever()
            case FaultKind.DISCONNECT:
                self._dropped = True
                with trio.CancelScope(shield=True):
                    await self._inner.aclose()  # ends its event streams, as a dropped link does
                raise self._lost(command)
            case FaultKind.MALFORMED:
                await self._carry_out(call)
                raise ProtocolError(f"{command}: reply is not QMP (injected)", monitor=self.name)
        raise AssertionError(f"unhandled fault kind {kind}")

    @staticmethod
    async def _carry_out(call: Callable[[], Awaitable[Any]]) -> None:
        """Let QEMU do the command; whatever it answers is lost."""
        with suppress(QMPError):
            await call()

    def _lost(self, command: str) -> ConnectionLost:
        return ConnectionLost(f"{command}: connection dropped (injected)", monitor=self.name)

    def end_of_stream(self, closed: MonitorClosed) -> QMPError:
        """What one of its event streams raises once its inner stream reports ``closed``."""
        if self._dropped and not self._closed:
            return self._lost("event stream")
        return closed

    def listen(self, *names: str) -> AbstractAsyncContextManager[EventStream]:
        return self._listen(names)

    @asynccontextmanager
    async def _listen(self, names: tuple[str, ...]) -> AsyncIterator[EventStream]:
        if self._dropped:
            raise self._lost("listen")
        async with self._inner.listen(*names) as stream:
            yield _FaultyStream(stream, self)

    async def aclose(self) -> None:
        self._closed = True
        await self._inner.aclose()


class _FaultyStream(EventStream):
    """Events of a :class:`FaultyMonitor`: once it was dropped, the end is a lost connection."""

    def __init__(self, inner: EventStream, monitor: FaultyMonitor) -> None:
        self._inner, self._monitor = inner, monitor

    async def receive(self) -> QMPEvent:
        try:
            return await self._inner.receive()
        except MonitorClosed as closed:
            error = self._monitor.end_of_stream(closed)
            if error is closed:
                raise
            raise error from closed


class FaultyHost:
    """A :class:`~livemig.drivers.host.Host` whose operations the injector may fail."""

    def __init__(self, inner: Host, injector: FaultInjector) -> None:
        self._inner, self._injector = inner, injector

    async def _strike(self, operation: str, argv: list[str]) -> None:
        if await self._injector.strike(operation, None) is FaultKind.DISK_FULL:
            raise ToolError(argv, 1, "No space left on device (injected)")

    async def make_dir(self, path: Path) -> None:
        await self._strike("make-dir", ["mkdir", str(path)])
        await self._inner.make_dir(path)

    async def create_image(self, path: Path, fmt: ImageFormat, size: int) -> None:
        await self._strike("create-image", ["qemu-img", "create", "-f", fmt, str(path)])
        await self._inner.create_image(path, fmt, size)

    async def copy_to_nbd(
        self,
        source: Path,
        fmt: ImageFormat,
        nbd: Endpoint,
        export: str,
        *,
        target_is_zero: bool,
        tls: Tls | None = None,
    ) -> None:
        await self._strike("copy-to-nbd", ["qemu-img", "convert", str(source)])
        await self._inner.copy_to_nbd(
            source, fmt, nbd, export, target_is_zero=target_is_zero, tls=tls
        )

    async def remove(self, path: Path) -> None:
        await self._strike("remove", ["rm", str(path)])
        await self._inner.remove(path)
