"""One measured run, as recorded (a failed run is recorded too, never dropped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import attrs

__all__ = [
    "CROSS_HOST_VARIANTS",
    "OPT_IN_VARIANTS",
    "VARIANTS",
    "CopiedDisk",
    "RunRecord",
    "Status",
    "Variant",
    "VariantFiles",
]

Variant = Literal[
    "livemig",
    "livemig-stateful",
    "bare-qmp",
    "lxd-equivalent",
    "libvirt",
    "floor",
    "livemig-tls",
    "livemig-plain",
    "livemig-tunnel",
    "libvirt-tls",
]
#: The variants that migrate (the floor is computed from livemig's bytes).
VARIANTS: tuple[Variant, ...] = ("livemig", "bare-qmp", "lxd-equivalent", "libvirt")
#: Variants run only when named (``--variants``): livemig ``--mode stateful-stop`` on the same
#: lab, to weigh a stateful stop's downtime against the live route's.
OPT_IN_VARIANTS: tuple[Variant, ...] = ("livemig-stateful",)
#: The cross-host mode's variants (``bench/cross_host.py``): livemig ``--to ssh://`` with the
#: data over TLS, plain TCP (``--insecure``) and through ssh (``--tunnel ssh``); libvirt
#: ``--p2p --tls`` between a daemon on each "host".
CROSS_HOST_VARIANTS: tuple[Variant, ...] = (
    "livemig-tls",
    "livemig-plain",
    "livemig-tunnel",
    "libvirt-tls",
)

#: ``ok``: converged within the deadline; ``not-converged``: the deadline passed and the run was
#: reverted; ``failed``: it broke (the error says how); ``skipped``: the variant is unavailable.
Status = Literal["ok", "not-converged", "failed", "skipped"]


@attrs.define
class RunRecord:
    """Figures of one run of one variant on one scenario in one repetition.

    Times in milliseconds, bytes in bytes; ``None`` where the variant does not measure it.

    :param total_ms: the variant's own measure of the whole migration (livemig: its result's
        ``total_ms``; libvirt: the job's ``time_elapsed``; lxd-equivalent: its own start to the
        target's ``cont``; bare-qmp: its first command to the target's ``cont`` answered; floor:
        the time to stream the same bytes through a unix socket).
    :param downtime_ms: what QEMU reported (through libvirt for libvirt).
    :param heartbeat_gap_ms: the longest time between two consecutive guest heartbeats, as the
        host read them on the source and target consoles, around the migration.
    :param cpu_ms: user+system CPU time of the ``livemig`` process (livemig only).
    :param wall_ms: wall time of the ``livemig`` process, start to exit (livemig only).
    :param startup_cpu_ms: livemig only: the start-up CPU measured in this run's own lab, its
        guest running, just before the migration (median of refused ``livemig migrate``
        children, see ``bench/runner.py``). Start-up costs more CPU on a machine the guest keeps
        busy than on an idle one, so this, not the idle figure, is what the migration's CPU is
        net of.
    :param problems: invariant violations found by ``Lab.verify`` (livemig, bare-qmp,
        lxd-equivalent).
    :param detail: variant-specific extras (phases, last progress sample, raw statistics).
    """

    rep: int
    scenario: str
    variant: Variant
    status: Status
    total_ms: float | None = None
    downtime_ms: float | None = None
    heartbeat_gap_ms: float | None = None
    ram_bytes: int | None = None
    disk_bytes: int | None = None
    cpu_ms: float | None = None
    wall_ms: float | None = None
    startup_cpu_ms: float | None = None
    problems: list[str] = attrs.field(factory=list)
    error: str | None = None
    loadavg: float | None = None
    detail: dict[str, Any] = attrs.field(factory=dict)

    @property
    def converged(self) -> bool:
        return self.status == "ok"

    @property
    def cpu_share(self) -> float | None:
        if self.cpu_ms is None or not self.wall_ms:
            return None
        return self.cpu_ms / self.wall_ms

    def cpu_share_net(self, startup_ms: float | None) -> float | None:
        """The CPU share with Python's start-up taken out: ``(cpu - startup) / wall``; the
        start-up measured in this run's lab when there is one, else ``startup_ms``."""
        startup = self.startup_cpu_ms if self.startup_cpu_ms is not None else startup_ms
        if self.cpu_ms is None or not self.wall_ms or startup is None:
            return None
        return (self.cpu_ms - startup) / self.wall_ms

    @property
    def to_cont_ms(self) -> float | None:
        """From the variant's start to the target's ``cont`` answered, where known: livemig's
        is computed from its result (see ``bench/runner.py``); bare-qmp's and lxd-equivalent's
        are their totals (libvirt's ``time_elapsed`` ends elsewhere: unknown)."""
        if self.variant in ("bare-qmp", "lxd-equivalent"):
            return self.total_ms
        value = self.detail.get("to_cont_ms")
        return float(value) if isinstance(value, int | float) else None

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["converged"] = self.converged
        out["cpu_share"] = self.cpu_share
        out["to_cont_ms"] = self.to_cont_ms
        return out


@attrs.frozen
class CopiedDisk:
    """One disk a hand-driven variant (bare-qmp, lxd-equivalent) copies with non-shared storage.

    :param node: the format node on both QEMUs (``-blockdev``): the one snapshotted on the
        source, exported on the target.
    :param image: the source's image of it, frozen once the overlay is on (a qcow2 one is read
        through its backing chain: the copy flattens it).
    :param fmt: its format.
    """

    node: str
    image: Path
    fmt: Literal["raw", "qcow2"] = "raw"

    @property
    def suffix(self) -> str:
        """What the names a variant gives this disk's overlay, job and export end with: nothing
        for ``root`` (the one disk of the test guest, whose names stay as they were)."""
        return "" if self.node == "root" else f"-{self.node}"


@attrs.frozen
class VariantFiles:
    """The files a hand-driven variant (bare-qmp, lxd-equivalent) creates in its work dir:
    one overlay per copied disk (``overlay`` is the first's), the NBD and RAM sockets."""

    overlays: tuple[Path, ...]
    nbd_socket: Path
    ram_socket: Path

    @property
    def overlay(self) -> Path:
        return self.overlays[0]

    @classmethod
    def under(
        cls, work: Path, prefix: str, disks: tuple[CopiedDisk, ...] = (CopiedDisk("root", Path()),)
    ) -> VariantFiles:
        return cls(
            tuple(work / f"{prefix}-overlay{d.suffix}.qcow2" for d in disks),
            work / f"{prefix}-nbd.sock",
            work / f"{prefix}-ram.sock",
        )

    def overlay_of(self, disks: tuple[CopiedDisk, ...], disk: CopiedDisk) -> Path:
        return self.overlays[disks.index(disk)]

    def all(self) -> tuple[Path, ...]:
        return (*self.overlays, self.nbd_socket, self.ram_socket)
