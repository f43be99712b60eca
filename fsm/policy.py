"""Convergence policy: how fast to send, when a migration has stalled, and what to do about it.

Everything here is a pure function of its arguments or a frozen value: time and progress samples
come in as arguments, nothing reads a clock or talks to QEMU. The runner polls ``query-migrate``,
turns each answer into a :class:`ProgressSample` and folds it into a :class:`ConvergenceTracker`;
the tracker answers with a :class:`Decision` (an action and why) or ``None``.

The parts, each usable on its own:

=========================  =================================================================
`downtime_schedule`        the ``downtime-limit`` values the ladder steps through
`find_stall`               whether a window of samples shows no progress (`Stall` or ``None``)
`next_action`              the next rung of the ladder: raise downtime, throttle, post-copy, abort
`PROGRESS_INTERVAL_S`      how often to poll ``query-migrate``
=========================  =================================================================

How a runner waits for ``pre-switchover`` with it (the pause arrives as a ``MIGRATION`` event; the
loop below only watches progress and is cancelled when the event comes)::

    tracker = ConvergenceTracker(policy, capabilities)
    while True:
        stats = await migration.query_migrate(source)
        sample = ProgressSample.from_stats(trio.current_time(), stats)
        if sample is not None:
            tracker, decision = tracker.observe(sample)
            if decision is not None:
                await apply(decision.action)  # SetDowntime / Throttle / StartPostcopy / Abort
        await trio.sleep(PROGRESS_INTERVAL_S)

Defaults come from measurements on QEMU 10, uncapped over loopback: it converges a 512 MiB guest
that dirties memory flat out in about 1 s with the 300 ms downtime limit, so in the common case no
rung is ever used; auto-converge alone needed 26 s; post-copy after 3 s finished at 3.2 s with a
5 ms pause.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, TypeVar

import attrs

from livemig.drivers.status import MigrationStatus
from livemig.transports.errors import UsageError

if TYPE_CHECKING:
    # Only annotations: importing the driver pulls in trio and qemu.qmp (~190 ms).
    from livemig.drivers.migration import MigrationStats

__all__ = [
    "PROGRESS_INTERVAL_S",
    "Abort",
    "Action",
    "Capabilities",
    "ConvergencePolicy",
    "ConvergenceTracker",
    "Decision",
    "Ladder",
    "LadderPosition",
    "ProgressSample",
    "ProgressWindow",
    "Rung",
    "SetDowntime",
    "Stall",
    "StallKind",
    "StallRule",
    "StartPostcopy",
    "Throttle",
    "downtime_schedule",
    "expected_downtime_ms",
    "find_stall",
    "next_action",
]

GiB: Final = 2**30
MiB: Final = 2**20

#: Seconds between ``query-migrate`` polls while RAM is streaming. QEMU recomputes its rate
#: counters (throughput, expected downtime) once per 100 ms rate-limit cycle (``BUFFER_DELAY``),
#: so polling faster shows no fresher rates; at 100 ms a 3 s stall window holds thirty samples and
#: a decision comes at most 0.1 s after its evidence. State changes (``pre-switchover`` above all)
#: arrive as ``MIGRATION`` events: never poll for them.
PROGRESS_INTERVAL_S: Final = 0.1


_Number = TypeVar("_Number", int, float)


def _in_range(
    low: _Number, high: _Number
) -> Callable[[object, attrs.Attribute[_Number], _Number], None]:
    def check(instance: object, attribute: attrs.Attribute[_Number], value: _Number) -> None:
        del instance
        if not low <= value <= high:
            raise UsageError(f"{attribute.name} must be from {low} to {high}, not {value!r}")

    return check


# --- Downtime --------------------------------------------------------------------------------


def downtime_schedule(initial_ms: int, maximum_ms: int, steps: int) -> tuple[int, ...]:
    """The ``downtime-limit`` values to step through: ``initial_ms`` first, ``maximum_ms`` last,
    up to ``steps`` raises in between, spaced geometrically and strictly increasing.

    Why geometric: QEMU switches over once what is left to send fits in ``bandwidth x limit``.
    A raise helps in proportion to how much it *multiplies* that threshold, so geometric steps
    give every raise the same chance to converge the guest; linear steps (Nova) spend their first
    step on a big jump and their last ones on raises too small to matter. Values round to whole
    ms; a raise rounding to no change is dropped (it would waste a stall window).

    ============================ ================================ =============================
    initial → maximum, steps     geometric (this function)        linear, for comparison
    ============================ ================================ =============================
    300 → 1000, 4 (the default)  300 405 548 740 1000 (x1.35)     300 475 650 825 1000
                                                                  (x1.58 … x1.21)
    50 → 2000, 6                 50 92 171 316 585 1081 2000      50 375 700 1025 1350 1675
                                                                  2000
    300 → 1000, 1                300 1000                         300 1000
    300 → 300, 4                 300                              300
    1 → 3, 10                    1 2 3                            1 2 3
    ============================ ================================ =============================

    :raise UsageError: unless 1 ≤ ``initial_ms`` ≤ ``maximum_ms`` ≤ 60 000 and ``steps`` ≥ 1.
    """
    if not 1 <= initial_ms <= maximum_ms <= 60_000:
        raise UsageError(
            f"downtime must satisfy 1 <= initial <= maximum <= 60000 ms, "
            f"not {initial_ms} -> {maximum_ms}"
        )
    if steps < 1:
        raise UsageError(f"downtime steps must be at least 1, not {steps}")
    ratio = maximum_ms / initial_ms
    values = [initial_ms]
    for k in range(1, steps):
        value = round(initial_ms * ratio ** (k / steps))  # below maximum_ms: k < steps
        if value > values[-1]:
            values.append(value)
    if maximum_ms > values[-1]:
        values.append(maximum_ms)
    return tuple(values)


# --- Progress samples and stall detection ----------------------------------------------------


@attrs.frozen
class ProgressSample:
    """One reading of the RAM stream.

    :param at: seconds on any monotonic clock (the runner's trio clock).
    :param remaining: RAM bytes still to send (QEMU's ``ram.remaining``).
    :param transferred: RAM bytes sent so far.
    :param total: the guest's RAM size in bytes.
    :param passes: dirty-bitmap syncs so far (``dirty-sync-count``): one per pass over RAM.
    :param dirty_bytes_per_s: how fast the guest dirties memory.
    :param expected_downtime_ms: QEMU's own estimate of the pause.
    :param throttle_percent: auto-converge's current CPU throttle.
    """

    at: float
    remaining: int = attrs.field(validator=attrs.validators.ge(0))
    transferred: int = attrs.field(validator=attrs.validators.ge(0))
    total: int = 0
    passes: int | None = None
    dirty_bytes_per_s: int | None = None
    expected_downtime_ms: int | None = None
    throttle_percent: int | None = None

    @classmethod
    def from_stats(cls, at: float, stats: MigrationStats) -> ProgressSample | None:
        """A sample from ``query-migrate``, or ``None`` unless pre-copy is streaming (status
        ``active``). That filter matters: in ``pre-switchover`` the source is paused and
        ``remaining`` stands still, which must not read as a stall."""
        ram = stats.ram
        if stats.status is not MigrationStatus.ACTIVE or ram is None:
            return None
        dirty = None
        if ram.dirty_pages_rate is not None:
            dirty = ram.dirty_pages_rate * (ram.page_size or 4096)
        return cls(
            at=at,
            remaining=ram.remaining,
            transferred=ram.transferred,
            total=ram.total,
            passes=ram.dirty_sync_count,
            dirty_bytes_per_s=dirty,
            expected_downtime_ms=stats.expected_downtime_ms,
            throttle_percent=stats.cpu_throttle_percentage,
        )


def expected_downtime_ms(remaining: int, bytes_per_s: float) -> int | None:
    """The pause needed to send ``remaining`` bytes at the measured throughput, rounded up; ``None``
    when nothing is being sent.

    ========== =========== ========
    remaining  throughput  pause
    ========== =========== ========
    62 MB      620 MB/s    100 ms
    180 MiB    590 MB/s    320 ms
    1 byte     1 GB/s      1 ms
    any        0           None
    ========== =========== ========
    """
    if bytes_per_s <= 0:
        return None
    return math.ceil(remaining * 1000 / bytes_per_s)


@attrs.frozen
class StallRule:
    """When a migration counts as stalled.

    A window is the most recent stretch of samples that spans at least ``seconds`` and, when QEMU
    reports passes, at least ``passes`` passes over RAM. Within a pass ``remaining`` falls as pages
    are sent and jumps back up at each sync, so the rule compares low-water marks: stalled when the
    lowest ``remaining`` inside the window is not below ``(1 - tolerance)`` x the lowest seen
    before it. Noise cannot hide a stall for long, since every lucky low raises the bar for the
    next window. Separately, nothing sent for ``seconds`` is a stall of its own kind.

    Defaults: a converging guest finishes in about 1 s on loopback (measured on QEMU 10), so 3 s and
    3 passes never fire on it; 3 s also spans at least one step of QEMU's auto-converge, which
    raises the throttle every second high-dirty period (about 2 s).
    """

    seconds: float = attrs.field(default=3.0, validator=_in_range(0.001, 3600.0))
    passes: int = attrs.field(default=3, validator=_in_range(0, 1000))
    tolerance: float = attrs.field(default=0.05, validator=_in_range(0.0, 0.99))

    def opens_window(self, sample: ProgressSample, now: ProgressSample) -> bool:
        """Whether a window judged at ``now`` may start at ``sample``. True for a prefix of the
        samples (times and passes only grow), so the latest such sample starts the window."""
        if now.at - sample.at < self.seconds:
            return False
        if self.passes and sample.passes is not None and now.passes is not None:
            return now.passes - sample.passes >= self.passes
        return True


class StallKind(enum.StrEnum):
    """Why a migration stalled; it decides which remedies can help."""

    #: Bytes flow, but what is left does not shrink: the guest dirties memory as fast as it
    #: is sent. More downtime, a throttle or post-copy can help.
    NOT_CONVERGING = "not-converging"
    #: No bytes sent for a whole window: the link or the target is stuck. Only abort helps;
    #: post-copy over a dead link would strand the guest between two hosts.
    NO_TRANSFER = "no-transfer"


@attrs.frozen
class Stall:
    """The evidence that a migration stalled.

    :param seconds: the window judged.
    :param passes: passes over RAM in the window, when QEMU reports them.
    :param remaining: the lowest ``remaining`` in the window.
    :param bytes_per_s: the throughput measured over the window.
    :param expected_downtime_ms: the pause needed to send ``remaining`` at that throughput (QEMU's
        own estimate when nothing was sent).
    :param dirty_bytes_per_s: how fast the guest dirties memory, when QEMU reports it.
    :param throttle_rising: auto-converge raised its throttle during the window.
    """

    kind: StallKind
    seconds: float
    passes: int | None
    remaining: int
    bytes_per_s: float
    expected_downtime_ms: int | None
    dirty_bytes_per_s: int | None = None
    throttle_rising: bool = False

    def describe(self) -> str:
        over = f"{self.seconds:.1f} s" + (f" / {self.passes} passes" if self.passes else "")
        if self.kind is StallKind.NO_TRANSFER:
            return f"nothing sent for {over} ({self.remaining / MiB:.1f} MiB left)"
        text = (
            f"{self.remaining / MiB:.1f} MiB left, not shrinking over {over}; "
            f"sending {self.bytes_per_s / 1e6:.1f} MB/s"
        )
        if self.dirty_bytes_per_s is not None:
            text += f", guest dirtying {self.dirty_bytes_per_s / 1e6:.1f} MB/s"
        if self.expected_downtime_ms is not None:
            text += f", would need a {self.expected_downtime_ms} ms pause"
        return text


@attrs.frozen
class ProgressWindow:
    """The samples stall detection still needs, oldest first, and the lowest ``remaining`` among
    those already dropped. Bounded: a sample older than the current window start can never start
    a window again, so only its ``remaining`` is kept (in ``floor``)."""

    samples: tuple[ProgressSample, ...] = ()
    floor: int | None = None

    def add(self, sample: ProgressSample, rule: StallRule) -> ProgressWindow:
        """This window with ``sample`` appended. A sample no later than the last one is ignored:
        without time passing there is no rate to measure."""
        if self.samples and sample.at <= self.samples[-1].at:
            return self
        samples = (*self.samples, sample)
        floor = self.floor
        drop = 0
        while drop + 1 < len(samples) and rule.opens_window(samples[drop + 1], sample):
            dropped = samples[drop].remaining
            floor = dropped if floor is None else min(floor, dropped)
            drop += 1
        return ProgressWindow(samples[drop:], floor)


def _last_index(samples: Sequence[ProgressSample], test: Callable[[ProgressSample], bool]) -> int:
    """The last index whose sample passes ``test`` (they form a prefix), or -1."""
    found = -1
    for index, sample in enumerate(samples):
        if not test(sample):
            break
        found = index
    return found


def find_stall(window: ProgressWindow, rule: StallRule) -> Stall | None:
    """Judge the newest sample of ``window`` against ``rule``: a :class:`Stall`, or ``None`` while
    the migration progresses or the samples do not yet span a full window.

    Worked example, rule 3 s / 3 passes / 5 %, one sample a second (remaining in MiB):

    ===== ====== ====== ================================================================
    at s  passes remain verdict
    ===== ====== ====== ================================================================
    0     1      512    - (no window yet)
    1     2      200    - (first pass draining)
    2     3      180    -
    3     4      190    - (window 0 s → 3 s: low 180 < 0.95 x 512)
    4     5      182    - (window 1 s → 4 s: low 180 < 0.95 x 200)
    5     6      185    stalled: window 2 s → 5 s, low 182 ≥ 0.95 x 180 (the best before)
    ===== ====== ====== ================================================================
    """
    samples = window.samples
    if not samples:
        return None
    now = samples[-1]
    timed = _last_index(samples, lambda s: now.at - s.at >= rule.seconds)
    if timed >= 0 and now.transferred <= samples[timed].transferred:
        return Stall(
            kind=StallKind.NO_TRANSFER,
            seconds=now.at - samples[timed].at,
            passes=_passes_between(samples[timed], now),
            remaining=now.remaining,
            bytes_per_s=0.0,
            expected_downtime_ms=now.expected_downtime_ms,
            dirty_bytes_per_s=now.dirty_bytes_per_s,
        )
    start = _last_index(samples, lambda s: rule.opens_window(s, now))
    if start < 0:
        return None
    before = [s.remaining for s in samples[: start + 1]]
    if window.floor is not None:
        before.append(window.floor)
    low = min(s.remaining for s in samples[start + 1 :])
    if low == 0 or low < min(before) * (1 - rule.tolerance):
        return None
    first = samples[start]
    seconds = now.at - first.at
    rate = (now.transferred - first.transferred) / seconds
    estimate = expected_downtime_ms(low, rate)
    return Stall(
        kind=StallKind.NOT_CONVERGING,
        seconds=seconds,
        passes=_passes_between(first, now),
        remaining=low,
        bytes_per_s=rate,
        expected_downtime_ms=estimate if estimate is not None else now.expected_downtime_ms,
        dirty_bytes_per_s=now.dirty_bytes_per_s,
        throttle_rising=(first.throttle_percent or 0) < (now.throttle_percent or 0),
    )


def _passes_between(first: ProgressSample, last: ProgressSample) -> int | None:
    if first.passes is None or last.passes is None:
        return None
    return last.passes - first.passes


# --- Actions and the ladder ------------------------------------------------------------------


@attrs.frozen
class SetDowntime:
    """Raise ``downtime-limit`` to ``limit_ms``."""

    limit_ms: int

    def parameters(self) -> dict[str, int]:
        """For ``migrate-set-parameters``."""
        return {"downtime-limit": self.limit_ms}


@attrs.frozen
class Throttle:
    """Make auto-converge throttle harder: it starts at ``initial_percent`` of CPU time (if it has
    not started yet) and adds ``increment_percent`` each time the guest still dirties too fast.
    Needs the ``auto-converge`` capability, which QEMU only accepts before ``migrate``.

    Default 40 / +20 instead of QEMU's 20 / +10: QEMU steps the throttle every second high-dirty
    period (about 2 s), so its defaults take about 16 s to reach 99 % (auto-converge alone took
    26 s to converge a 512 MiB guest on QEMU 10 over loopback); from wherever it stands, +20 reaches
    the top in at most four steps.
    """

    initial_percent: int = attrs.field(default=40, validator=_in_range(1, 99))
    increment_percent: int = attrs.field(default=20, validator=_in_range(1, 100))

    def parameters(self) -> dict[str, int]:
        """For ``migrate-set-parameters``."""
        return {
            "cpu-throttle-initial": self.initial_percent,
            "cpu-throttle-increment": self.increment_percent,
        }


@attrs.frozen
class StartPostcopy:
    """``migrate-start-postcopy``: the target runs and pulls the remaining pages on demand. Once
    the target runs, the source no longer holds the whole guest: there is no revert."""


@attrs.frozen
class Abort:
    """Give up: ``migrate_cancel`` and revert; the guest keeps running on the source."""

    reason: str


Action = SetDowntime | Throttle | StartPostcopy | Abort


class Rung(enum.StrEnum):
    """One remedy on the ladder, tried in the configured order on each stall."""

    #: The next downtime limit of the schedule (each value once).
    RAISE_DOWNTIME = "raise-downtime"
    #: Harder auto-converge throttling (once; skipped without ``auto-converge``).
    THROTTLE = "throttle"
    #: Switch to post-copy (once; skipped unless allowed and both sides support it).
    POSTCOPY = "postcopy"
    #: Cancel and revert; always the last rung.
    ABORT = "abort"


@attrs.frozen
class Capabilities:
    """What this migration may use, decided before ``migrate`` (QEMU refuses capability changes
    while a migration runs).

    :param auto_converge: the source has ``auto-converge`` on.
    :param postcopy_allowed: the plan accepts post-copy's trade: no revert once the target runs.
    :param postcopy_on_source: ``postcopy-ram`` is on at the source.
    :param postcopy_on_target: ``postcopy-ram`` is on at the target.
    """

    auto_converge: bool = False
    postcopy_allowed: bool = False
    postcopy_on_source: bool = False
    postcopy_on_target: bool = False

    @property
    def postcopy(self) -> bool:
        return self.postcopy_allowed and self.postcopy_on_source and self.postcopy_on_target


def _strictly_increasing(
    instance: object, attribute: attrs.Attribute[tuple[int, ...]], value: tuple[int, ...]
) -> None:
    del instance
    if not value or value[0] < 1 or any(a >= b for a, b in itertools.pairwise(value)):
        raise UsageError(f"{attribute.name} must be positive and strictly increasing: {value!r}")


def _abort_last(
    instance: object, attribute: attrs.Attribute[tuple[Rung, ...]], value: tuple[Rung, ...]
) -> None:
    del instance
    if len(set(value)) != len(value) or not value or value[-1] is not Rung.ABORT:
        raise UsageError(f"{attribute.name} must name each rung once and end with abort: {value}")


@attrs.frozen
class Ladder:
    """The remedies for a stalled migration, in order.

    :param downtimes_ms: the downtime schedule; the first value is set before ``migrate``.
    :param rungs: the order to try remedies in, each once, ending with :attr:`Rung.ABORT`.
    :param throttle: the throttle the :attr:`Rung.THROTTLE` rung sets.

    Default order: raise the downtime (costs only pause length, within a bound), throttle (costs
    the guest CPU time for a while), post-copy (fast, 3.2 s measured, but gives up revert — only
    when the plan allows), abort (the guest stays on the source, unharmed).
    """

    downtimes_ms: tuple[int, ...] = attrs.field(
        default=downtime_schedule(300, 1000, 4), validator=_strictly_increasing
    )
    rungs: tuple[Rung, ...] = attrs.field(
        default=(Rung.RAISE_DOWNTIME, Rung.THROTTLE, Rung.POSTCOPY, Rung.ABORT),
        validator=_abort_last,
    )
    throttle: Throttle = Throttle()

    @classmethod
    def create(
        cls,
        *,
        initial_downtime_ms: int = 300,
        max_downtime_ms: int = 1000,
        downtime_steps: int = 4,
        rungs: Sequence[Rung | str] = ("raise-downtime", "throttle", "postcopy", "abort"),
        throttle: Throttle | None = None,
    ) -> Ladder:
        """Build a ladder from configuration (rung names as in :class:`Rung`).

        :raise UsageError: on a bad downtime range, an unknown or repeated rung, or a ladder that
            does not end with abort.
        """
        try:
            order = tuple(Rung(r) for r in rungs)
        except ValueError as err:
            choices = ", ".join(r.value for r in Rung)
            raise UsageError(f"rungs must be among {choices}: {list(rungs)}") from err
        return cls(
            downtimes_ms=downtime_schedule(initial_downtime_ms, max_downtime_ms, downtime_steps),
            rungs=order,
            throttle=throttle or Throttle(),
        )


@attrs.frozen
class LadderPosition:
    """Where a migration stands on its ladder.

    :param rung: index of the rung to try next.
    :param downtime: index of the downtime limit in force (0: the one set before ``migrate``).
    """

    rung: int = 0
    downtime: int = 0


def next_action(
    ladder: Ladder, position: LadderPosition, capabilities: Capabilities, stall: Stall
) -> tuple[Action, LadderPosition]:
    """The remedy for ``stall`` and the position after taking it.

    Rungs are tried in order from ``position``; one that cannot act is passed over: no downtime
    left to raise, no ``auto-converge`` to throttle, post-copy not allowed or not supported on both
    sides. A downtime raise goes straight to the smallest scheduled limit that covers the stall's
    expected pause (one step when there is no estimate, the maximum when none covers it): a raise
    that cannot be enough would only waste a window. A stall with nothing sent skips straight to
    abort. Abort is last and repeats once reached.

    Default ladder, all capabilities, successive stalls (limits 300 405 548 740 1000 ms):

    ================================ ===================================
    stall's expected pause           action
    ================================ ===================================
    500 ms                           SetDowntime(548)
    900 ms                           SetDowntime(1000)
    1200 ms                          Throttle(40, 20)
    any                              StartPostcopy()
    any                              Abort(…)
    ================================ ===================================
    """
    abort_at = len(ladder.rungs) - 1
    if stall.kind is StallKind.NO_TRANSFER:
        return _abort(stall), attrs.evolve(position, rung=abort_at)
    for index in range(position.rung, abort_at):
        rung = ladder.rungs[index]
        if rung is Rung.RAISE_DOWNTIME and position.downtime < len(ladder.downtimes_ms) - 1:
            target = _downtime_index(ladder.downtimes_ms, position.downtime, stall)
            return SetDowntime(ladder.downtimes_ms[target]), LadderPosition(index, target)
        if rung is Rung.THROTTLE and capabilities.auto_converge:
            return ladder.throttle, LadderPosition(index + 1, position.downtime)
        if rung is Rung.POSTCOPY and capabilities.postcopy:
            return StartPostcopy(), LadderPosition(index + 1, position.downtime)
    return _abort(stall), attrs.evolve(position, rung=abort_at)


def _abort(stall: Stall) -> Abort:
    return Abort(f"did not converge: {stall.describe()}")


def _downtime_index(downtimes: tuple[int, ...], current: int, stall: Stall) -> int:
    if stall.expected_downtime_ms is None:
        return current + 1
    for index in range(current + 1, len(downtimes)):
        if downtimes[index] >= stall.expected_downtime_ms:
            return index
    return len(downtimes) - 1


# --- The policy and the tracker --------------------------------------------------------------


@attrs.frozen
class ConvergencePolicy:
    """How to drive a migration to convergence; every field has a measured default.

    :param ladder: downtime schedule, remedy order and throttle.
    :param stall: when a migration counts as stalled.
    :param bandwidth_cap: the operator's ``max-bandwidth`` in bytes/s; ``None``: uncapped.
        QEMU's 128 MiB/s default is a fifth of what a unix socket carries here (about 620 MB/s),
        and a capped stream only converges later; stalls and the deadline, not a guessed cap,
        end a migration that cannot converge.

    The RAM phase's deadline is not here: it is the runner's, from
    :meth:`livemig.fsm.plan.Deadlines.ram_phase`.
    """

    ladder: Ladder = Ladder()
    stall: StallRule = StallRule()
    bandwidth_cap: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_in_range(1, 2**62))
    )

    @property
    def initial_downtime_ms(self) -> int:
        """The ``downtime-limit`` to set before ``migrate``."""
        return self.ladder.downtimes_ms[0]


@attrs.frozen
class Decision:
    """What the tracker wants done now, and why (for the operator's event stream)."""

    action: Action
    reason: str


@attrs.frozen
class ConvergenceTracker:
    """The convergence state of one migration, advanced by :meth:`observe` one sample at a time.

    :param finished: an abort or post-copy was decided: nothing more will be.
    """

    policy: ConvergencePolicy
    capabilities: Capabilities
    position: LadderPosition = LadderPosition()
    window: ProgressWindow = ProgressWindow()
    finished: bool = False

    @property
    def downtime_ms(self) -> int:
        """The downtime limit in force."""
        return self.policy.ladder.downtimes_ms[self.position.downtime]

    def observe(self, sample: ProgressSample) -> tuple[ConvergenceTracker, Decision | None]:
        """Fold in one sample: the next tracker and what to do now, if anything.

        A stall resets the window, so each remedy gets a full window to show its effect; after the
        throttle rung, a stall is forgiven while auto-converge is still raising its throttle.

        Example (``test_tracker_worked_example``): default policy, every capability, a 512 MiB
        guest that never converges, polled every 100 ms. One pass a second; ``remaining`` saws
        from 495 down to 450 MiB; 629 MB/s sent; auto-converge's throttle rises from 20 % at 6 s
        by 10 points every 2 s and tops out at 99 % at 22 s:

        ====== ===================== =================================================
        at s   decision              why
        ====== ===================== =================================================
        0-3.4  -                     the first window is not full, then still improving
        3.5    SetDowntime(1000)     low of 450 MiB needs 750 ms: more than 740, jump
        6.6    Throttle(40, 20)      a full new window, still 450 MiB: downtime is at max
        6.7-24 -                     the throttle is still rising: QEMU is acting
        25.0   StartPostcopy()       3 s at 99 % without progress
        ====== ===================== =================================================

        Without post-copy the last decision is ``Abort("did not converge: ...")``. The tracker
        keeps no deadline: if stalls never show, the runner's RAM-phase deadline
        (:meth:`livemig.fsm.plan.Deadlines.ram_phase`, 67.5 s for 512 MiB uncapped) reverts.
        """
        if self.finished:
            return self, None
        window = self.window.add(sample, self.policy.stall)
        stall = find_stall(window, self.policy.stall)
        if stall is None or self._throttle_working(stall):
            return attrs.evolve(self, window=window), None
        action, position = next_action(self.policy.ladder, self.position, self.capabilities, stall)
        finished = isinstance(action, StartPostcopy | Abort)
        tracker = attrs.evolve(self, position=position, window=ProgressWindow(), finished=finished)
        return tracker, Decision(action, stall.describe())

    def _throttle_working(self, stall: Stall) -> bool:
        """Auto-converge is still raising the throttle our throttle rung set: let it work."""
        rungs = self.policy.ladder.rungs
        if Rung.THROTTLE not in rungs or not self.capabilities.auto_converge:
            return False
        throttled = self.position.rung > rungs.index(Rung.THROTTLE)
        return throttled and stall.throttle_rising  # only a NOT_CONVERGING stall rises
