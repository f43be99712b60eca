"""The fake QEMU's migration: capabilities, parameters, and the RAM/device-state stream.

Source statuses: ``none`` → ``setup`` → ``active`` → (converged after ``converge_after``: the
guest stops, run state ``finish-migrate``) → ``pre-switchover`` (with that capability; waits for
``migrate-continue``) → ``device`` → ``completed`` (run state ``postmigrate``). The target goes
``setup`` (``migrate-incoming``) → ``active`` → ``completed``; it then holds the guest's state and
is ``paused`` (started with ``-S``), or runs if ``cont`` was sent while it was still incoming.

A ``file:`` URI saves the guest's state to a file (``setup`` → ``active`` → ``completed``, run
state ``postmigrate``) and ``migrate-incoming file:`` loads it back; QEMU's migration blockers
stop a save only in mode ``normal`` (they are blockers of live migration).

``migrate_cancel`` goes ``cancelling`` → ``cancelled`` and resumes a source that the migration
paused; a target whose incoming stream breaks (cancel, a dead peer) fails and exits, as QEMU does
with ``exit-on-error`` (its default). A source whose peer dies fails the same way and resumes.
``MIGRATION`` events are sent only with the ``events`` capability on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from livemig.drivers.status import MigrationStatus, RunState
from livemig.testing.model.block import QemuError
from livemig.testing.model.host import SocketFile, StateFile

if TYPE_CHECKING:
    from livemig.testing.model.qemu import FakeQemu

__all__ = ["CAPABILITIES", "MIGRATION_COMMANDS", "PARAMETERS", "Migration", "peer_died"]

#: QEMU 10.0's migration capabilities, all off at start.
CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram",
    "x-colo", "release-ram", "return-path", "pause-before-switchover", "multifd",
    "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt",
    "switchover-ack", "dirty-limit", "mapped-ram",
)  # fmt: skip
#: Some of its parameters, at their defaults.
PARAMETERS: Mapping[str, Any] = {
    "downtime-limit": 300,
    "max-bandwidth": 128 * 1024 * 1024,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "multifd-channels": 2,
    "mode": "normal",
}
#: How long saving or loading the guest's state to a file takes.
SAVE_SECONDS = 0.0203
RAM_BYTES = 512 * 1024 * 1024
#: How fast RAM is sent, and dirtied again, by a busy guest.
SEND_BYTES_PER_S = 1024 * 1024 * 1024
DIRTY_PAGES_PER_S = 200_000
#: What a migration that never converges keeps left to send.
PLATEAU_BYTES = 96 * 1024 * 1024


@attrs.define(eq=False)
class Migration:
    """One side's view of the migration (outgoing on the source, incoming on the target)."""

    status: MigrationStatus = MigrationStatus.NONE
    uri: str | None = None
    peer: FakeQemu | None = None
    #: The source guest ran when the migration started (so a failed one resumes it).
    was_running: bool = False
    started_at: float = 0.0


def _set_status(qemu: FakeQemu, status: MigrationStatus) -> None:
    qemu.migration.status = status
    if qemu.capabilities["events"]:
        qemu.emit("MIGRATION", {"status": status})


def _later(qemu: FakeQemu, delay: float, expect: MigrationStatus, then: Callable[[], None]) -> None:
    """Run ``then`` after ``delay`` if the migration is still in status ``expect`` by then."""
    migration = qemu.migration

    def step() -> None:
        if qemu.alive and qemu.migration is migration and migration.status is expect:
            then()

    qemu.world.after(delay, step)


def _query_capabilities(qemu: FakeQemu, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    del args
    return [{"capability": c, "state": s} for c, s in qemu.capabilities.items()]


def _set_capabilities(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    if qemu.migration.status.sending:
        raise QemuError("There's a migration process in progress")
    wanted = {str(c["capability"]): bool(c["state"]) for c in args["capabilities"]}
    if unknown := [c for c in wanted if c not in qemu.capabilities]:
        raise QemuError(f"Parameter 'capability' does not accept value '{unknown[0]}'")
    qemu.capabilities.update(wanted)
    return {}


def _query_parameters(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    del args
    return dict(qemu.parameters)


def _set_parameters(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    if unknown := [k for k in args if k not in qemu.parameters]:
        raise QemuError(f"Parameter '{unknown[0]}' is unexpected")
    qemu.parameters.update(args)
    return {}


def _migrate_incoming(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    if qemu.runstate is not RunState.INMIGRATE or qemu.migration.status is not MigrationStatus.NONE:
        raise QemuError("'-incoming' was not specified on the command line")
    uri = str(args["uri"])
    if uri.startswith("file:"):
        return _load_state(qemu, uri)
    if not uri.startswith("unix:"):
        raise QemuError("the fake models unix: and file: migration URIs only")
    qemu.migration = Migration(uri=uri)
    path = uri.removeprefix("unix:")
    qemu.world.host.files[path] = SocketFile(path, qemu.name)
    _set_status(qemu, MigrationStatus.SETUP)
    return {}


def _migrate(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    if qemu.migration.status.sending:
        raise QemuError("There's a migration process in progress")
    if qemu.runstate is RunState.INMIGRATE:
        raise QemuError("Guest is waiting for an incoming migration")
    uri = str(args["uri"])
    if qemu.blocked_reasons and qemu.parameters.get("mode") == "normal":
        raise QemuError(qemu.blocked_reasons[0])
    if uri.startswith("file:"):
        return _save_state(qemu, uri)
    peer = qemu.world.incoming_on(uri)
    qemu.migration = Migration(
        uri=uri, peer=peer, was_running=qemu.runstate.running, started_at=qemu.world.now()
    )
    _set_status(qemu, MigrationStatus.SETUP)
    if peer is None:  # the connection is made after the reply; its failure ends the migration
        _later(
            qemu, 0.0051, MigrationStatus.SETUP, lambda: _set_status(qemu, MigrationStatus.FAILED)
        )
        return {}
    peer.migration.peer = qemu
    _later(qemu, 0.0107, MigrationStatus.SETUP, lambda: _activate(qemu, peer))
    return {}


def _save_state(qemu: FakeQemu, uri: str) -> dict[str, Any]:
    qemu.migration = Migration(
        uri=uri, was_running=qemu.runstate.running, started_at=qemu.world.now()
    )
    _set_status(qemu, MigrationStatus.SETUP)

    def active() -> None:
        _set_status(qemu, MigrationStatus.ACTIVE)
        _later(qemu, SAVE_SECONDS, MigrationStatus.ACTIVE, saved)

    def saved() -> None:
        if qemu.runstate.running:
            qemu.stop_guest(RunState.FINISH_MIGRATE)
        path = uri.removeprefix("file:")
        guest = None if qemu.guest is None else attrs.evolve(qemu.guest)
        qemu.world.host.files[path] = StateFile(path, guest)
        _set_status(qemu, MigrationStatus.COMPLETED)
        qemu.runstate = RunState.POSTMIGRATE
        for node in qemu.nodes.values():
            node.active = False

    _later(qemu, 0.0021, MigrationStatus.SETUP, active)
    return {}


def _load_state(qemu: FakeQemu, uri: str) -> dict[str, Any]:
    qemu.migration = Migration(uri=uri)
    _set_status(qemu, MigrationStatus.SETUP)
    path = uri.removeprefix("file:")

    def active() -> None:
        _set_status(qemu, MigrationStatus.ACTIVE)
        _later(qemu, SAVE_SECONDS, MigrationStatus.ACTIVE, loaded)

    def loaded() -> None:
        saved = qemu.world.host.files.get(path)
        if not isinstance(saved, StateFile):
            _incoming_failed(qemu)
            return
        qemu.guest = None if saved.guest is None else attrs.evolve(saved.guest)
        _set_status(qemu, MigrationStatus.COMPLETED)
        if qemu.autostart:
            qemu.start_guest()
        else:
            qemu.runstate = RunState.PAUSED

    _later(qemu, 0.0019, MigrationStatus.SETUP, active)
    return {}


def _activate(source: FakeQemu, target: FakeQemu) -> None:
    if not target.alive:
        _fail_outgoing(source)
        return
    _set_status(target, MigrationStatus.ACTIVE)
    _set_status(source, MigrationStatus.ACTIVE)
    delay = source.world.knobs.converge_after
    if delay is not None:
        _later(source, delay, MigrationStatus.ACTIVE, lambda: _converged(source))


def _converged(source: FakeQemu) -> None:
    """RAM converged: the guest stops for the last pass."""
    source.stop_guest(RunState.FINISH_MIGRATE)
    if source.capabilities["pause-before-switchover"]:
        _set_status(source, MigrationStatus.PRE_SWITCHOVER)
    else:
        _switch_over(source)


def _migrate_continue(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    expected, status = str(args["state"]), qemu.migration.status
    if status is not MigrationStatus.PRE_SWITCHOVER or expected != status:
        raise QemuError(f"Migration not in expected state: {qemu.migration.status}")
    _switch_over(qemu)
    return {}


def _switch_over(source: FakeQemu) -> None:
    _set_status(source, MigrationStatus.DEVICE)
    _later(source, 0.0053, MigrationStatus.DEVICE, lambda: _complete(source))


def _complete(source: FakeQemu) -> None:
    target = source.migration.peer
    if target is None or not target.alive:
        _fail_outgoing(source)
        return
    target.guest = None if source.guest is None else attrs.evolve(source.guest)
    _set_status(source, MigrationStatus.COMPLETED)
    source.runstate = RunState.POSTMIGRATE
    for node in source.nodes.values():
        node.active = False
    _set_status(target, MigrationStatus.COMPLETED)
    if target.autostart:
        target.start_guest()
    else:
        target.runstate = RunState.PAUSED


def _migrate_cancel(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    del args
    status = qemu.migration.status
    if not status.sending or status is MigrationStatus.CANCELLING:
        return {}  # nothing to cancel: QEMU says nothing either
    _set_status(qemu, MigrationStatus.CANCELLING)
    peer = qemu.migration.peer

    def cancelled() -> None:
        _set_status(qemu, MigrationStatus.CANCELLED)
        _resume_after_failure(qemu)
        if peer is not None and peer.alive and peer.migration.status is MigrationStatus.ACTIVE:
            _incoming_failed(peer)

    _later(qemu, 0.0017, MigrationStatus.CANCELLING, cancelled)
    return {}


def _fail_outgoing(source: FakeQemu) -> None:
    _set_status(source, MigrationStatus.FAILED)
    _resume_after_failure(source)


def _resume_after_failure(source: FakeQemu) -> None:
    if source.runstate is RunState.FINISH_MIGRATE and source.migration.was_running:
        source.start_guest()
    elif source.runstate is RunState.FINISH_MIGRATE:
        source.runstate = RunState.PAUSED


def _incoming_failed(target: FakeQemu) -> None:
    """The stream broke: the incoming QEMU fails the load and exits (``exit-on-error``)."""
    _set_status(target, MigrationStatus.FAILED)
    target.die("load of migration failed")


def peer_died(qemu: FakeQemu) -> None:
    """``qemu``'s migration peer died: the stream is broken."""
    status = qemu.migration.status
    incoming = qemu.runstate is RunState.INMIGRATE
    if incoming and status is MigrationStatus.ACTIVE:
        _incoming_failed(qemu)
    elif not incoming and status.sending:
        _fail_outgoing(qemu)


def _query_migrate(qemu: FakeQemu, args: Mapping[str, Any]) -> dict[str, Any]:
    """Progress as QEMU reports it: RAM drains over ``converge_after``; a migration that never
    converges drains its first pass, then stalls on a plateau of redirtied pages."""
    del args
    migration = qemu.migration
    if migration.status is MigrationStatus.NONE:
        blocked = qemu.blocked_reasons and qemu.parameters.get("mode") == "normal"
        return {"blocked-reasons": list(qemu.blocked_reasons)} if blocked else {}
    out: dict[str, Any] = {"status": migration.status}
    if qemu.runstate is RunState.INMIGRATE or migration.peer is None:
        return out
    elapsed = qemu.world.now() - migration.started_at
    converge = qemu.world.knobs.converge_after
    if migration.status is MigrationStatus.COMPLETED:
        remaining = 0
    elif converge is None:
        remaining = max(PLATEAU_BYTES, RAM_BYTES - int(elapsed * SEND_BYTES_PER_S))
    else:
        remaining = int(RAM_BYTES * max(0.0, 1 - elapsed / max(converge, 1e-9)))
    out["total-time"] = int(elapsed * 1000)
    out["ram"] = {
        "transferred": int(elapsed * SEND_BYTES_PER_S),
        "remaining": remaining,
        "total": RAM_BYTES,
        "dirty-sync-count": 1 + int(elapsed / 0.1),
        "dirty-pages-rate": DIRTY_PAGES_PER_S,
        "page-size": 4096,
    }
    if migration.status is MigrationStatus.COMPLETED:
        out["downtime"] = 7
    else:
        out["expected-downtime"] = remaining * 1000 // SEND_BYTES_PER_S
    return out


Handler = Callable[["FakeQemu", Mapping[str, Any]], Any]

MIGRATION_COMMANDS: Mapping[str, Handler] = {
    "query-migrate-capabilities": _query_capabilities,
    "migrate-set-capabilities": _set_capabilities,
    "query-migrate-parameters": _query_parameters,
    "migrate-set-parameters": _set_parameters,
    "migrate-incoming": _migrate_incoming,
    "migrate": _migrate,
    "migrate-continue": _migrate_continue,
    "migrate_cancel": _migrate_cancel,
    "query-migrate": _query_migrate,
}
