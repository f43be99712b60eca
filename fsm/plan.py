"""What to migrate and how: the frozen plan, its policy and its deadlines.

Plans are values: build one with :meth:`Plan.create` (which fills in a run id and the default
socket paths under the work directory) and change it with :func:`attrs.evolve`.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from attrs import validators as v

from livemig.fsm.machine import StorageChoice, TransferChoice
from livemig.fsm.policy import ConvergencePolicy, GiB, Ladder, Rung, StallRule
from livemig.transports.endpoints import (
    Endpoint,
    TcpEndpoint,
    Tls,
    UnixEndpoint,
    parse_endpoint,
)
from livemig.transports.errors import UsageError

__all__ = ["SENDS_AT_CAP", "Deadlines", "DiskNames", "Plan", "Policy"]

#: How many times the RAM phase's deadline lets a capped link send each GiB (see
#: :meth:`Deadlines.ram_phase`).
SENDS_AT_CAP = 4

#: A node name, a BlockBackend name or a device id (QEMU's id syntax), or one of the node
#: names QEMU generates for ``-drive`` disks (``#block123``).
_NODE_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9_.+-]{0,30}|#block[0-9]{1,9})$")


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    del instance
    if not value > 0:
        raise UsageError(f"{attribute.name} must be positive, not {value!r}")


def _not_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    del instance
    if not value >= 0:
        raise UsageError(f"{attribute.name} must not be negative, not {value!r}")


def _between(low: int, high: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        del instance
        if not low <= value <= high:
            raise UsageError(f"{attribute.name} must be from {low} to {high}, not {value!r}")

    return check


@attrs.frozen
class Policy:
    """How hard to push.

    :param max_bandwidth: migration bandwidth cap in bytes/s; ``None`` lifts QEMU's 128 MiB/s
        default (a local link should not be throttled; a shared WAN link should be capped).
    :param downtime_limit_ms: the pause QEMU may take at switchover.
    :param auto_converge: let QEMU throttle a guest that dirties memory faster than it is sent.
    :param progress_interval: seconds between ``query-migrate`` polls for progress events. Only
        progress is polled; state changes arrive as QMP events.
    :param stop_source: quit the source QEMU once the guest runs on the target.
    :param postcopy: allow switching to post-copy when RAM does not converge (only if both
        QEMUs offer ``postcopy-ram``). Post-copy always converges, but once it starts a fault
        can no longer revert: the migration then ends ``failed``.
    :param multifd_channels: send RAM over this many parallel channels (``multifd``), when
        both QEMUs offer it; ``None``: one stream.
    :param max_downtime_ms: how far the downtime limit may be raised when RAM stalls.
    :param stall_seconds: how long remaining RAM may stop shrinking before the next remedy.
    :param stall_passes: how many passes over RAM it may stop shrinking for, likewise.

    When RAM stops converging, livemig climbs a ladder (:mod:`livemig.fsm.policy`): raise the
    downtime
    limit step by step to ``max_downtime_ms``, throttle the guest (auto-converge), switch to
    post-copy (if allowed), and finally abort and revert. The RAM phase's deadline
    (:meth:`Deadlines.ram_phase`, scaled by the guest's RAM) reverts a migration that never
    stalls but never finishes either.
    """

    max_bandwidth: int | None = attrs.field(default=None, validator=v.optional(_between(1, 2**62)))
    downtime_limit_ms: int = attrs.field(default=300, validator=_between(1, 60_000))
    auto_converge: bool = True
    progress_interval: float = attrs.field(default=0.1, validator=_positive)
    stop_source: bool = True
    postcopy: bool = False
    multifd_channels: int | None = attrs.field(default=None, validator=v.optional(_between(1, 255)))
    max_downtime_ms: int = attrs.field(default=1000, validator=_between(1, 60_000))
    stall_seconds: float = attrs.field(default=3.0, validator=_positive)
    stall_passes: int = attrs.field(default=3, validator=_between(1, 1000))

    def convergence(self) -> ConvergencePolicy:
        """The convergence ladder and deadline this policy asks for."""
        rungs = [Rung.RAISE_DOWNTIME]
        if self.auto_converge:
            rungs.append(Rung.THROTTLE)
        if self.postcopy:
            rungs.append(Rung.POSTCOPY)
        rungs.append(Rung.ABORT)
        ladder = Ladder.create(
            initial_downtime_ms=self.downtime_limit_ms,
            max_downtime_ms=max(self.max_downtime_ms, self.downtime_limit_ms),
            rungs=rungs,
        )
        return ConvergencePolicy(
            ladder=ladder,
            stall=StallRule(seconds=self.stall_seconds, passes=self.stall_passes),
            bandwidth_cap=self.max_bandwidth,
        )


@attrs.frozen
class Deadlines:
    """Seconds each wait may take. Every wait livemig makes has exactly one deadline, from here.

    A forward step that runs out of time reverts the migration; an undo step that does is
    recorded and the revert goes on. The values are seconds and must be positive
    (``switchover_per_gib`` may be 0).

    The RAM phase (from ``migrate`` until the source pauses at ``pre-switchover``) has one
    deadline, scaled by the guest's RAM: :meth:`ram_phase`. By default 60 s plus 15 s per GiB:
    67.5 s for 512 MiB, 120 s for 4 GiB, 1020 s for 64 GiB. On the command line,
    ``livemig migrate --switchover-timeout S`` makes it a fixed ``S`` seconds
    (``switchover=S, switchover_per_gib=0``) and ``--switchover-per-gib P`` scales it by ``P``
    seconds per GiB; ``livemig recover --step-timeout S`` sets ``recover_step``.
    """

    #: Opening a monitor, greeting included (QEMU greets at once: a silent socket is no monitor).
    connect: float = attrs.field(default=5.0, validator=_positive)
    #: Each QMP command (the prechecks and short steps get a few commands' worth).
    command: float = attrs.field(default=30.0, validator=_positive)
    #: The mirror's copy of the base image (non-shared), plus ``mirror_ready`` for it to get ready.
    base_copy: float = attrs.field(default=900.0, validator=_positive)
    mirror_ready: float = attrs.field(default=300.0, validator=_positive)
    #: The RAM phase: this many seconds plus ``switchover_per_gib`` per GiB (:meth:`ram_phase`).
    switchover: float = attrs.field(default=60.0, validator=_positive)
    #: Seconds per GiB of guest RAM added to ``switchover``; 0: ``switchover`` alone.
    switchover_per_gib: float = attrs.field(default=15.0, validator=_not_negative)
    #: The switchover itself (last RAM, disk, ``cont``) and, after post-copy, its last pages.
    completion: float = attrs.field(default=60.0, validator=_positive)
    #: Each undo step of a revert.
    undo_step: float = attrs.field(default=60.0, validator=_positive)
    #: Asking a QEMU whether it runs the guest, again after each failed question, before the
    #: answer is "unknown" (after a revert, after a lost ``cont`` answer, before quitting a
    #: target that holds the whole guest, and in recovery).
    liveness: float = attrs.field(default=60.0, validator=_positive)
    #: Closing a monitor connection (shielded: it also runs while the run is cancelled).
    close: float = attrs.field(default=5.0, validator=_positive)
    #: ``livemig recover``: each connect, QMP command and undo step.
    recover_step: float = attrs.field(default=60.0, validator=_positive)
    #: A target on another host (``--to ssh://``): how long its ssh connection may stay down
    #: (not made again) before a migration not yet past the point of no return reverts.
    link: float = attrs.field(default=15.0, validator=_positive)
    #: Post-copy paused by a broken link: how long livemig tries to resume it before it ends
    #: ``failed`` with both QEMUs kept (neither alone holds the whole guest).
    postcopy_recover: float = attrs.field(default=300.0, validator=_positive)

    def ram_phase(self, ram_bytes: int, bandwidth: int | None = None) -> float:
        """The RAM phase's deadline for a guest of ``ram_bytes`` sent at ``bandwidth`` bytes/s
        (``None``: uncapped): ``switchover`` plus, per GiB, ``switchover_per_gib`` or — when a
        cap is set and slower — the time to send that GiB :data:`SENDS_AT_CAP` times at the
        cap (the first pass and the re-sends that converge a busy guest). With
        ``switchover_per_gib`` 0 it is ``switchover``, whatever the RAM.

        ``switchover`` covers setup and the whole convergence ladder on a small guest (a few
        3 s stall windows plus a throttle ramp); 15 s per GiB is about eight sends of a GiB at
        a loopback's 620 MB/s.

        ========= ============== ==================================
        RAM       bandwidth      deadline
        ========= ============== ==================================
        512 MiB   uncapped       60 + 0.5 x 15 = 67.5 s
        4 GiB     uncapped       60 + 4 x 15 = 120 s
        64 GiB    uncapped       60 + 64 x 15 = 1020 s
        16 GiB    125 MB/s       60 + 16 x 4 x 8.6 = 610 s (1 GbE)
        ========= ============== ==================================

        :raise UsageError: on negative RAM or a bandwidth below 1 byte/s.
        """
        if ram_bytes < 0:
            raise UsageError(f"RAM size must not be negative, not {ram_bytes}")
        if bandwidth is not None and bandwidth < 1:
            raise UsageError(f"bandwidth must be at least 1 byte/s, not {bandwidth}")
        if self.switchover_per_gib == 0:
            return self.switchover
        per_gib = self.switchover_per_gib
        if bandwidth is not None:
            per_gib = max(per_gib, SENDS_AT_CAP * GiB / bandwidth)
        return self.switchover + ram_bytes / GiB * per_gib


def _node_name(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    del instance, attribute
    if not _NODE_NAME.match(value):
        raise UsageError(f"bad block node name {value!r}")


@attrs.frozen
class Plan:
    """One migration, fully described.

    :param source_qmp: the source QEMU's monitor socket.
    :param target_qmp: the target QEMU's monitor socket; the target was started with the same
        devices, ``-S`` and ``-incoming defer``.
    :param work_dir: where the overlay and the sockets go; must be reachable by both QEMUs.
    :param storage: how the disks reach the target: ``shared`` (the target opens the same
        images), ``non-shared`` (every disk is copied) or ``auto`` (decided per disk at connect:
        a disk the target opens as the same file is shared, every other one is copied).
    :param disks: the disks to move, each named by its block node, its BlockBackend name
        (``-drive …,id=drive0``) or its guest device's id, resolved on each side to the node
        the disk runs on (the two QEMUs may name it differently: ``-drive`` nodes are
        auto-named). Empty (the default): every disk attached to a guest device. Read-only
        media and empty drives are never copied; a writable disk left out must be shared.
    :param run_id: makes every node, job and file name of this run unique.
    :param migrate_uri: where the target listens for the RAM stream.
    :param nbd: where the target serves its disk for the mirror (non-shared only).
    :param target_files: what livemig made for a target it launched (``--to local``: its
        directory first, then its log, sockets and images): removed in the reverse order, once
        the target is quit, when the run reverts — by ``livemig recover`` too, after a crash.
    :param tls: QEMU's TLS on the RAM stream, the NBD server, the mirror and the base copy
        (``None``: none).
    :param migrate_listen: where the target listens for the RAM stream when that is not where
        the source connects (an SSH tunnel: the target listens on its host's socket, the source
        connects to the tunnel's end on this one); ``None``: ``migrate_uri``.
    :param nbd_listen: likewise for the NBD server; ``None``: ``nbd``.
    :param remote: how to reach the target's host when it is another one (``--to ssh://``),
        as `livemig.remote` journals it for ``livemig recover``; ``None``: this host.
    :param transfer: how the guest's state moves: ``live`` (RAM streams while the guest runs),
        ``stateful-stop`` (the guest is paused, its state saved to :attr:`state_file` and
        restored on the target) or ``auto`` (the default: live, and a stateful stop when live
        transfer is impossible — the result says why).
    """

    source_qmp: UnixEndpoint
    target_qmp: UnixEndpoint
    storage: StorageChoice = attrs.field(converter=StorageChoice)
    work_dir: Path
    run_id: str
    migrate_uri: Endpoint
    nbd: Endpoint
    disks: tuple[str, ...] = attrs.field(
        default=(), converter=tuple[str, ...], validator=v.deep_iterable(_node_name)
    )
    policy: Policy = Policy()
    deadlines: Deadlines = Deadlines()
    target_files: tuple[Path, ...] = attrs.field(default=(), converter=tuple[Path, ...])
    #: Random part of the NBD export's name: only the mirror and the base copy, which are told
    #: it, can find the disk on the target's NBD server.
    export_token: str = attrs.field(factory=lambda: secrets.token_hex(8), eq=False)
    tls: Tls | None = None
    migrate_listen: Endpoint | None = None
    nbd_listen: Endpoint | None = None
    remote: Mapping[str, Any] | None = None
    #: Target images livemig created empty for this run (a launched target's): a base copy
    #: into one skips zeros and leaves it sparse.
    created_images: tuple[Path, ...] = attrs.field(default=(), converter=tuple[Path, ...])
    transfer: TransferChoice = attrs.field(
        default=TransferChoice.AUTO, converter=TransferChoice, kw_only=True
    )

    @property
    def state_file(self) -> Path:
        """Where a stateful stop saves the guest's state (both QEMUs read the work dir)."""
        return self.work_dir / f"lm-{self.run_id}-state"

    def fresh_image(self, path: Path) -> bool:
        """Whether ``path`` is a target image livemig made empty for this run."""
        return path in self.created_images or path in self.target_files

    @property
    def incoming_uri(self) -> Endpoint:
        """Where the target listens for the RAM stream."""
        return self.migrate_listen if self.migrate_listen is not None else self.migrate_uri

    @property
    def nbd_server(self) -> Endpoint:
        """Where the target's NBD server listens."""
        return self.nbd_listen if self.nbd_listen is not None else self.nbd

    @property
    def tls_object(self) -> str:
        """The id of this run's ``tls-creds-x509`` object, on each QEMU."""
        return f"lm-{self.run_id}-tls"

    @classmethod
    def create(
        cls,
        *,
        source_qmp: str | Path,
        target_qmp: str | Path,
        storage: StorageChoice | str,
        work_dir: str | Path,
        disks: Sequence[str] = (),
        migrate_uri: str | None = None,
        nbd: str | None = None,
        policy: Policy | None = None,
        deadlines: Deadlines | None = None,
        run_id: str | None = None,
        insecure: bool = False,
        tls: Tls | None = None,
        transfer: TransferChoice | str = TransferChoice.AUTO,
    ) -> Plan:
        """Build a plan from caller input, filling in defaults.

        :param insecure: allow plain TCP to an address off this host (guest memory and disk
            in the clear); refused otherwise (with ``tls`` it is not in the clear).
        :raise UsageError: on any bad value; nothing is touched.
        """
        try:
            mode = StorageChoice(storage)
        except ValueError as err:
            choices = ", ".join(m.value for m in StorageChoice)
            raise UsageError(f"storage must be one of {choices}, not {storage!r}") from err
        try:
            how = TransferChoice(transfer)
        except ValueError as err:
            choices = ", ".join(m.value for m in TransferChoice)
            raise UsageError(f"mode must be one of {choices}, not {transfer!r}") from err
        if os.path.realpath(source_qmp) == os.path.realpath(target_qmp):
            raise UsageError(
                f"the source and target QMP sockets are the same ({source_qmp}): the target "
                "must be a second QEMU"
            )
        work = Path(work_dir).absolute()
        rid = run_id or secrets.token_hex(4)
        if not re.fullmatch(r"[a-z0-9]{1,16}", rid):
            raise UsageError(f"run id must be 1-16 lowercase letters or digits, not {rid!r}")
        ram = (
            parse_endpoint(migrate_uri)
            if migrate_uri
            else UnixEndpoint(work / f"lm-{rid}-ram.sock")
        )
        disk = parse_endpoint(nbd) if nbd else UnixEndpoint(work / f"lm-{rid}-nbd.sock")
        if not insecure and tls is None:
            _refuse_off_host(ram, "the RAM stream")
            _refuse_off_host(disk, "the disk copy")
        return cls(
            source_qmp=_unix(source_qmp, "source QMP"),
            target_qmp=_unix(target_qmp, "target QMP"),
            storage=mode,
            work_dir=work,
            run_id=rid,
            migrate_uri=ram,
            nbd=disk,
            disks=_unique(disks),
            policy=policy or Policy(),
            deadlines=deadlines or Deadlines(),
            tls=tls,
            transfer=how,
        )

    # Names of everything this run creates: unique per run so a leftover from an earlier,
    # crashed run can never collide with this one; per disk, by the disk's index in the run.

    def names(self, index: int) -> DiskNames:
        """The names of what this run creates for its ``index``-th copied disk."""
        return DiskNames(self.work_dir, f"lm-{self.run_id}-d{index}", self.export_token)

    @property
    def overlay_path(self) -> Path:
        return self.names(0).overlay_path

    @property
    def overlay_node(self) -> str:
        return self.names(0).overlay_node

    @property
    def nbd_node(self) -> str:
        return self.names(0).nbd_node

    @property
    def mirror_job(self) -> str:
        return self.names(0).mirror_job

    @property
    def commit_job(self) -> str:
        return self.names(0).commit_job

    @property
    def export_id(self) -> str:
        return self.names(0).export_id

    @property
    def export_name(self) -> str:
        return self.names(0).export_name


@attrs.frozen
class DiskNames:
    """What a run creates for one copied disk, by name: ``prefix`` is ``lm-<run id>-d<index>``
    (at most 25 characters: QEMU node names stay under its 32-character limit)."""

    work_dir: Path
    prefix: str
    export_token: str

    @property
    def overlay_path(self) -> Path:
        return self.work_dir / f"{self.prefix}-overlay.qcow2"

    @property
    def overlay_node(self) -> str:
        return f"{self.prefix}-overlay"

    @property
    def nbd_node(self) -> str:
        return f"{self.prefix}-nbd"

    @property
    def mirror_job(self) -> str:
        return f"{self.prefix}-mirror"

    @property
    def commit_job(self) -> str:
        return f"{self.prefix}-commit"

    @property
    def export_id(self) -> str:
        return f"{self.prefix}-export"

    @property
    def export_name(self) -> str:
        return f"{self.prefix}-{self.export_token}"


def _unique(disks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(disks, str):
        disks = (disks,)
    seen: list[str] = []
    for name in disks:
        if name in seen:
            raise UsageError(f"disk {name!r} is named twice")
        seen.append(name)
    return tuple(seen)


def _refuse_off_host(endpoint: Endpoint, what: str) -> None:
    if isinstance(endpoint, TcpEndpoint) and not endpoint.loopback:
        raise UsageError(
            f"{what} over {endpoint} would carry the guest in the clear off this host; use a "
            "unix socket, a loopback address or TLS (--tls-dir), or allow it with --insecure"
        )


def _unix(value: str | Path, what: str) -> UnixEndpoint:
    endpoint = parse_endpoint(str(value))
    if not isinstance(endpoint, UnixEndpoint):
        raise UsageError(f"{what} must be a unix socket path, not {value!r}")
    return endpoint
