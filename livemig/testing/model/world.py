"""Two fake QEMUs, a host and a running guest: everything a fake migration touches.

::

    async with fake_world(work_dir, storage="non-shared") as world:
        result = await migrate(plan, connector=world.connect, host=world.host)
        verdict = check_invariants(world, result)

The source runs the guest from the start; the target waits (``-S -incoming defer``) with its
own empty disk (non-shared) or the source's (shared), exactly like the real migration lab. Time
is trio's: run under the mock clock. `Knobs` set how fast things happen, or that they never do.

Not modelled (the real-QEMU tests and ``livemig faults --real`` cover what matters of it):
post-copy (``migrate-start-postcopy`` is an unknown command here), multifd and TCP/TLS
transports, RAM contents (the guest is a record counter), guest I/O errors and
``werror`` pauses, the write-permission conflict between an export and a running guest's disk,
QEMU 7.2's different capability set, and durable journal files (a fake run journals in memory).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import attrs
import trio

from livemig.drivers.qmp import Monitor
from livemig.drivers.status import MigrationStatus, RunState
from livemig.fsm.machine import StorageMode
from livemig.fsm.undo import Side
from livemig.testing.model.block import Export, Node
from livemig.testing.model.host import FakeHost, ImageFile
from livemig.testing.model.migration import peer_died
from livemig.testing.model.qemu import RECORDS_PER_BOOT, FakeMonitor, FakeQemu, Guest
from livemig.transports.errors import ConnectFailed

__all__ = ["DISK_BYTES", "FIRST_BOOT", "Knobs", "Snapshot", "Storage", "World", "fake_world"]

DISK_BYTES = 64 * 1024 * 1024
#: The guest's first boot.
FIRST_BOOT = 1

Storage = Literal["shared", "non-shared"]


@attrs.frozen
class Knobs:
    """How the fake behaves. ``None`` means *never*. The defaults are odd numbers of
    milliseconds so that independent things rarely fall on the same instant (trio runs tasks
    woken at one instant in a random order)."""

    #: Seconds between two guest records.
    tick: float = 0.019
    mirror_ready_after: float | None = 0.053
    commit_ready_after: float = 0.023
    #: Seconds of ``active`` migration before RAM converges.
    converge_after: float | None = 0.211
    copy_seconds: float = 0.031
    #: Seconds an aborting job takes to end (its in-flight requests drain).
    job_abort_seconds: float = 0.0047
    #: Seconds a command to each side travels (:attr:`FaultInjector.transit`): distinct, so
    #: commands sent to both at once reach a fault in one order.
    source_transit: float = 0.00037
    target_transit: float = 0.00053


@attrs.frozen
class Snapshot:
    """What one QEMU looked like before the migration (what a clean run leaves)."""

    nodes: frozenset[str]
    device: str
    capabilities: tuple[tuple[str, bool], ...]
    parameters: tuple[tuple[str, object], ...]


@attrs.define(eq=False)
class World:
    work_dir: Path
    storage: Storage
    knobs: Knobs
    nursery: trio.Nursery
    host: FakeHost = attrs.field(init=False)
    source: FakeQemu = attrs.field(init=False)
    target: FakeQemu = attrs.field(init=False)
    #: Every record acknowledged to the guest, and which QEMU wrote it.
    acked: dict[int, str] = attrs.field(factory=dict)
    #: Records two QEMUs both wrote: two copies of the guest ran.
    conflicts: list[str] = attrs.field(factory=list)
    #: Injected kills of a QEMU that held the only up-to-date copy of the guest.
    guest_killed: list[str] = attrs.field(factory=list)
    nbd_cut: bool = False
    #: Files there before the migration.
    initial_files: frozenset[str] = attrs.field(factory=frozenset)
    before: dict[str, Snapshot] = attrs.field(factory=dict)
    #: Every monitor connection opened through `connect`.
    connections: list[FakeMonitor] = attrs.field(factory=list)
    _boots: itertools.count[int] = attrs.field(factory=lambda: itertools.count(FIRST_BOOT + 1))

    def __attrs_post_init__(self) -> None:
        self.host = FakeHost(self.resolve_nbd, copy_seconds=self.knobs.copy_seconds)
        self.host.dirs.add(str(self.work_dir))
        source_disk = self.work_dir / "source.raw"
        self.host.add_image(source_disk, "raw", DISK_BYTES)
        if self.storage == "non-shared":
            self.host.add_image(self.work_dir / "target.raw", "raw", DISK_BYTES)
        self.source = self._qemu("source", source_disk, RunState.RUNNING)
        self.source.guest = Guest(FIRST_BOOT)
        self.target = self.new_target()
        self.initial_files = frozenset(self.host.files)

    def _qemu(self, name: str, disk: Path, runstate: RunState) -> FakeQemu:
        image = self.host.image(disk)
        assert image is not None
        active = runstate is not RunState.INMIGRATE  # an incoming QEMU opens its images inactive
        file = Node("root-file", "file", image.path, image.size, image=image, active=active)
        root = Node("root", "raw", image.path, image.size, image=image, file=file, active=active)
        qemu = FakeQemu(
            self,
            name,
            self.work_dir / f"{name}.qmp",
            runstate,
            {n.name: n for n in (file, root)},
            root,
        )
        self.before[name] = Snapshot(
            frozenset(qemu.nodes),
            root.name,
            tuple(sorted(qemu.capabilities.items())),
            tuple(sorted(qemu.parameters.items())),
        )
        return qemu

    def new_target(self) -> FakeQemu:
        """Start a (new) target QEMU: ``-S -incoming defer`` on the target's disk."""
        disk = "source.raw" if self.storage == "shared" else "target.raw"
        self.target = self._qemu("target", self.work_dir / disk, RunState.INMIGRATE)
        return self.target

    def qemus(self) -> tuple[FakeQemu, FakeQemu]:
        return (self.source, self.target)

    def qemu(self, side: Side) -> FakeQemu:
        return self.source if side is Side.SOURCE else self.target

    # -- time --

    def now(self) -> float:
        return trio.current_time()

    def after(self, delay: float, action: Callable[[], None]) -> None:
        """Run ``action`` ``delay`` seconds from now (it checks whether it still applies)."""

        async def later() -> None:
            await trio.sleep(delay)
            action()

        self.nursery.start_soon(later)

    async def _run_guest(self) -> None:
        while True:
            await trio.sleep(self.knobs.tick)
            for qemu in self.qemus():
                if qemu.alive and qemu.runstate.running:
                    qemu.write_record()

    # -- what the QEMUs ask of their surroundings --

    def new_boot(self) -> int:
        return next(self._boots)

    def acknowledge(self, qemu: FakeQemu, record: int) -> None:
        writer = self.acked.setdefault(record, qemu.name)
        if writer != qemu.name:
            self.conflicts.append(f"record {record} written by both {writer} and {qemu.name}")

    def latest_record(self) -> int:
        """The number of the last record the original guest acknowledged (0: none yet)."""
        return max(
            (r % RECORDS_PER_BOOT for r in self.acked if r // RECORDS_PER_BOOT == 1), default=0
        )

    def incoming_on(self, uri: str) -> FakeQemu | None:
        for qemu in self.qemus():
            migration = qemu.migration
            listening = migration.uri == uri and migration.status is MigrationStatus.SETUP
            if qemu.alive and qemu.runstate is RunState.INMIGRATE and listening:
                return qemu
        return None

    def resolve_nbd(self, socket: str, export: str) -> ImageFile | None:
        """The image an NBD client of ``socket``/``export`` reaches; ``None`` if nothing does."""
        if self.nbd_cut:
            return None
        for qemu in self.qemus():
            if qemu.alive and qemu.nbd_server == socket:
                for exported in qemu.exports.values():
                    if exported.name == export:
                        return exported.node.image
        return None

    def nbd_clients(self, server: FakeQemu, export: Export) -> int:
        """How many NBD client nodes are connected to ``export`` of ``server``."""
        return sum(
            1
            for qemu in self.qemus()
            if qemu.alive
            for node in qemu.nodes.values()
            if node.nbd is not None
            and node.nbd.socket == server.nbd_server
            and node.nbd.export == export.name
        )

    def died(self, qemu: FakeQemu) -> None:
        for other in self.qemus():
            if other is not qemu and other.alive and other.migration.peer is qemu:
                peer_died(other)

    # -- the environment of a fault campaign --

    async def connect(self, path: Path, name: str) -> Monitor:
        """The runner's connector."""
        await trio.lowlevel.checkpoint()
        for qemu in self.qemus():
            if qemu.qmp == path and qemu.alive:
                monitor = FakeMonitor(qemu, name)
                self.connections.append(monitor)
                return monitor
            if qemu.qmp == path:
                qemu.tries_after_exit += 1
        raise ConnectFailed(f"cannot connect to {path}: Connection refused", monitor=name)

    async def kill(self, side: Side) -> None:
        """SIGKILL one QEMU."""
        await trio.lowlevel.checkpoint()
        qemu = self.qemu(side)
        if qemu.alive and self._holds_only_copy(qemu):
            self.guest_killed.append(f"{qemu.name} was killed while it held the guest")
        qemu.die("killed")

    def _holds_only_copy(self, qemu: FakeQemu) -> bool:
        """Whether ``qemu`` runs, or holds the only up-to-date state of, the original guest."""
        latest = self.latest_record()

        def current(q: FakeQemu) -> bool:
            g = q.guest
            return q.alive and g is not None and g.boot == FIRST_BOOT and g.last >= latest

        others = [q for q in self.qemus() if q is not qemu and current(q)]
        return current(qemu) and (qemu.runstate.running or not others)

    async def cut_nbd(self) -> None:
        """Cut the NBD link between the QEMUs, for good."""
        await trio.lowlevel.checkpoint()
        self.nbd_cut = True


@asynccontextmanager
async def fake_world(
    work_dir: Path,
    *,
    storage: Storage | StorageMode = "non-shared",
    knobs: Knobs | None = None,
) -> AsyncIterator[World]:
    """Both QEMUs and the guest, running while the block runs."""
    mode: Storage = "shared" if storage == StorageMode.SHARED else "non-shared"
    async with trio.open_nursery() as nursery:
        world = World(work_dir, mode, knobs or Knobs(), nursery)
        nursery.start_soon(world._run_guest)
        yield world
        nursery.cancel_scope.cancel()
