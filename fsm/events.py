"""What a migration tells its watcher while it runs, and what it returns.

All frozen values. Times are milliseconds since the migration started, from the trio clock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "DiskResult",
    "Event",
    "LinkEvent",
    "MigrationResult",
    "Outcome",
    "Progress",
    "Reverting",
    "StateEntered",
    "Steered",
]


@attrs.frozen
class StateEntered:
    """The machine entered ``state``."""

    state: str
    at_ms: float

    def to_json(self) -> dict[str, Any]:
        return {"event": "state", "state": self.state, "at_ms": round(self.at_ms, 1)}


@attrs.frozen
class Progress:
    """A progress sample, from ``query-migrate`` and the block jobs.

    Fields QEMU did not report are ``None``.
    """

    state: str
    at_ms: float
    migration_status: str | None = None
    ram_transferred: int | None = None
    ram_remaining: int | None = None
    ram_total: int | None = None
    dirty_pages_rate: int | None = None
    passes: int | None = None
    mbps: float | None = None
    expected_downtime_ms: int | None = None
    disk_done: int | None = None
    disk_total: int | None = None
    #: The disk ``disk_done``/``disk_total`` are of (``None``: the sum over every copied disk).
    disk: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": "progress"}
        out.update({k: v for k, v in attrs.asdict(self).items() if v is not None})
        out["at_ms"] = round(self.at_ms, 1)
        return out


@attrs.frozen
class Reverting:
    """A fault stopped the forward path; the undo stack is being unwound."""

    state: str
    at_ms: float
    reason: str
    #: How many undo steps are to run (0: nothing had been touched).
    undo_steps: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "reverting",
            "state": self.state,
            "reason": self.reason,
            "undo_steps": self.undo_steps,
        }


@attrs.frozen
class Steered:
    """The convergence policy acted: RAM was not converging (``action`` and why)."""

    state: str
    at_ms: float
    action: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "policy",
            "state": self.state,
            "at_ms": round(self.at_ms, 1),
            "action": self.action,
            "reason": self.reason,
        }


@attrs.frozen
class LinkEvent:
    """Post-copy over a broken link: ``paused`` (it stopped, livemig tries to resume it) or
    ``resumed`` (it goes on from where it broke)."""

    state: str
    at_ms: float
    what: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "event": f"postcopy-{self.what}",
            "state": self.state,
            "at_ms": round(self.at_ms, 1),
            "detail": self.detail,
        }


Event = StateEntered | Progress | Reverting | Steered | LinkEvent


class Outcome(enum.StrEnum):
    """How a run ended."""

    #: The guest runs on the target only.
    FINALIZED = "finalized"
    #: The guest runs on the source only, with every write it made; the undo stack ran.
    REVERTED = "reverted"
    #: Needs attention: an undo step failed, or a fault came after the point of no return.
    FAILED = "failed"
    #: Bad input, found before anything was touched: nothing was attempted, nothing undone.
    #: ``states`` is ``["idle"]``.
    REFUSED = "refused"


@attrs.frozen
class DiskResult:
    """One disk of a migration: how it reached the target.

    :param name: its guest device's id (else its BlockBackend's name, else its node).
    :param copied: copied (frozen base, then the overlay mirrored); ``False``: shared, the target
        opens the same image.
    :param source: the source's image; :param target: the target's.
    :param bytes_sent: what the base copy and the mirror sent for it (``None``: not copied, or
        not told).
    """

    name: str
    copied: bool
    source: str
    target: str
    bytes_sent: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["storage"] = "non-shared" if out.pop("copied") else "shared"
        return out


@attrs.frozen
class MigrationResult:
    """How a migration ended.

    :param outcome: the terminal state, or ``refused`` when none was entered.
    :param states: every state entered, in order.
    :param error: why it did not finalize (``None`` when it did).
    :param error_type: the error's class name, for programs.
    :param failed_in: the state the fault happened in.
    :param undo_failures: undo steps that failed (only when ``outcome`` is failed).
    :param interrupted: the operator stopped it (a signal or a cancel), not a fault.
    :param switchover: the guest's downtime window as livemig lived it: ``(ms, what)`` from the
        moment the source's ``pre-switchover`` event reached livemig (0) to the target's
        ``cont`` answered — every QMP command sent (``→``) and answered (``←``), every event
        waited for. The first entry, when QEMU's own timestamp allows, is negative: when the
        source emitted the event (the guest paused). Empty when the run never got there.
    """

    outcome: Outcome
    states: tuple[str, ...]
    total_ms: float
    downtime_ms: int | None = None
    ram_bytes: int | None = None
    disk_bytes: int | None = None
    error: str | None = None
    error_type: str | None = None
    failed_in: str | None = None
    warnings: tuple[str, ...] = ()
    undo_failures: tuple[str, ...] = ()
    phases_ms: tuple[tuple[str, float], ...] = ()
    interrupted: bool = False
    switchover: tuple[tuple[float, str], ...] = ()
    #: Each disk the run moved (empty when it never got past connect).
    disks: tuple[DiskResult, ...] = ()
    #: The target livemig launched (``--to local``): its QMP socket, pid, serial, images.
    target: Mapping[str, Any] | None = None
    #: How the guest's state moved: ``live`` or ``stateful-stop`` (``None``: decided at connect,
    #: which the run did not get past).
    transfer: str | None = None
    #: Why a stateful stop was done when the plan did not ask for one (live transfer was
    #: impossible); ``None`` otherwise.
    fallback: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=False)
        out["disks"] = [d.to_json() for d in self.disks]
        if self.target is None:
            del out["target"]
        out["switchover"] = [[round(ms, 2), what] for ms, what in self.switchover]
        out["outcome"] = self.outcome.value
        out["states"] = list(self.states)
        out["warnings"] = list(self.warnings)
        out["undo_failures"] = list(self.undo_failures)
        out["phases_ms"] = {k: round(v, 1) for k, v in self.phases_ms}
        out["total_ms"] = round(self.total_ms, 1)
        return {"event": "result", **out}
