"""Convergence policy: property tests for every function, plus the worked tables of the
docstrings as examples. Pure: no I/O, no clock; time is a number in the samples."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.drivers.migration import MigrationStats, RamStats
from livemig.drivers.status import MigrationStatus
from livemig.fsm.plan import Deadlines, Policy
from livemig.fsm.policy import (
    PROGRESS_INTERVAL_S,
    Abort,
    Action,
    Capabilities,
    ConvergencePolicy,
    ConvergenceTracker,
    Decision,
    Ladder,
    LadderPosition,
    ProgressSample,
    ProgressWindow,
    Rung,
    SetDowntime,
    Stall,
    StallKind,
    StallRule,
    StartPostcopy,
    Throttle,
    downtime_schedule,
    expected_downtime_ms,
    find_stall,
    next_action,
)
from livemig.transports.errors import UsageError

MiB = 2**20
GiB = 2**30
ALL = Capabilities(
    auto_converge=True, postcopy_allowed=True, postcopy_on_source=True, postcopy_on_target=True
)

#: 50 examples per property (deterministic: see conftest) keep this whole file under 5 s.
EXAMPLES = settings(max_examples=50)

# --- Bandwidth cap -----------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [None, 1, 200 * 10**6])
def test_the_bandwidth_cap_is_the_operators(cap: int | None) -> None:
    assert ConvergencePolicy().bandwidth_cap is None  # uncapped unless asked
    assert Policy(max_bandwidth=cap).convergence().bandwidth_cap == cap


@pytest.mark.parametrize("cap", [0, -5, 2**63])
def test_the_bandwidth_cap_rejects_bad_input(cap: int) -> None:
    with pytest.raises(UsageError):
        ConvergencePolicy(bandwidth_cap=cap)
    with pytest.raises(UsageError):
        Policy(max_bandwidth=cap)


# --- Downtime schedule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("initial", "maximum", "steps", "expected"),
    [
        (300, 1000, 4, (300, 405, 548, 740, 1000)),
        (50, 2000, 6, (50, 92, 171, 316, 585, 1081, 2000)),
        (300, 1000, 1, (300, 1000)),
        (300, 300, 4, (300,)),
        (1, 3, 10, (1, 2, 3)),
    ],
)
def test_downtime_schedule_table(
    initial: int, maximum: int, steps: int, expected: tuple[int, ...]
) -> None:
    assert downtime_schedule(initial, maximum, steps) == expected


@st.composite
def downtime_ranges(draw: st.DrawFn) -> tuple[int, int, int]:
    initial = draw(st.integers(1, 60_000))
    maximum = draw(st.integers(initial, 60_000))
    return initial, maximum, draw(st.integers(1, 50))


@EXAMPLES
@given(downtime_ranges())
def test_downtime_schedule_properties(args: tuple[int, int, int]) -> None:
    initial, maximum, steps = args
    schedule = downtime_schedule(initial, maximum, steps)
    assert schedule[0] == initial
    assert schedule[-1] == maximum  # exactly
    assert all(a < b for a, b in itertools.pairwise(schedule))  # never repeats
    assert all(initial <= v <= maximum for v in schedule)  # never above the maximum
    assert len(schedule) <= steps + 1
    if initial == maximum:
        assert schedule == (maximum,)
    elif steps == 1:
        assert schedule == (initial, maximum)


@EXAMPLES
@given(downtime_ranges())
def test_downtime_steps_are_geometric(args: tuple[int, int, int]) -> None:
    """Each raise multiplies the limit by at most the even ratio, give or take rounding to whole
    milliseconds (the exact value before rounding was at most half a millisecond away)."""
    initial, maximum, steps = args
    ratio = (maximum / initial) ** (1 / steps)
    schedule = downtime_schedule(initial, maximum, steps)
    for low, high in itertools.pairwise(schedule):
        assert high <= (low + 0.5) * ratio + 0.5 + 1e-9


@pytest.mark.parametrize(("initial", "maximum", "steps"), [(0, 10, 1), (20, 10, 1), (1, 10, 0)])
def test_downtime_schedule_rejects_bad_input(initial: int, maximum: int, steps: int) -> None:
    with pytest.raises(UsageError):
        downtime_schedule(initial, maximum, steps)


# --- Expected downtime -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "rate", "expected"),
    [(62 * 10**6, 620e6, 100), (180 * MiB, 590e6, 320), (1, 1e9, 1), (10**9, 0.0, None)],
)
def test_expected_downtime_table(remaining: int, rate: float, expected: int | None) -> None:
    assert expected_downtime_ms(remaining, rate) == expected


@EXAMPLES
@given(
    remaining=st.integers(0, 2**40),
    more=st.integers(0, 2**30),
    rate=st.floats(1.0, 1e11),
    factor=st.floats(1.0, 100.0),
)
def test_expected_downtime_grows_with_remaining_and_falls_with_rate(
    remaining: int, more: int, rate: float, factor: float
) -> None:
    pause = expected_downtime_ms(remaining, rate)
    assert pause is not None
    assert pause >= remaining * 1000 / rate
    assert pause <= (expected_downtime_ms(remaining + more, rate) or 0)
    assert (expected_downtime_ms(remaining, rate * factor) or 0) <= pause


# --- Stall detection ---------------------------------------------------------------------------


def sample(
    at: float,
    remaining: int,
    transferred: int,
    passes: int | None = None,
    *,
    total: int = 512 * MiB,
    throttle: int | None = None,
) -> ProgressSample:
    return ProgressSample(
        at=at,
        remaining=remaining,
        transferred=transferred,
        total=total,
        passes=passes,
        throttle_percent=throttle,
    )


def fold(samples: Iterable[ProgressSample], rule: StallRule) -> ProgressWindow:
    window = ProgressWindow()
    for s in samples:
        window = window.add(s, rule)
    return window


RULES = st.builds(
    StallRule,
    seconds=st.integers(1, 50).map(lambda tenths: tenths / 10),
    passes=st.integers(0, 5),
    tolerance=st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.5]),
)


#: Steps of a sampled migration: (ms since the last sample, passes added, bytes sent, a free
#: number each test turns into ``remaining``). Drawn as one list: it keeps the tests fast.
STEPS = st.lists(
    st.tuples(
        st.integers(1, 1500), st.integers(0, 2), st.integers(0, 2**30), st.integers(0, 2**40)
    ),
    min_size=1,
    max_size=20,
)


def walk(steps: Sequence[tuple[int, int, int, int]]) -> list[tuple[float, int, int, int]]:
    """(time s, passes, bytes sent so far, free number) per step: time strictly grows, passes and
    bytes sent never fall."""
    out, at_ms, passes, sent = [], 0, 0, 0
    for gap, more_passes, more_sent, free in steps:
        out.append((at_ms / 1000, passes, sent, free))
        at_ms, passes, sent = at_ms + gap, passes + more_passes, sent + more_sent
    return out


@EXAMPLES
@given(rule=RULES, steps=STEPS, first=st.integers(1, 2**40), known_passes=st.booleans())
def test_never_stalls_while_remaining_shrinks_steadily(
    rule: StallRule, steps: list[tuple[int, int, int, int]], first: int, known_passes: bool
) -> None:
    """Each sample's remaining is below (1 - tolerance) x the one before, and bytes flow."""
    remaining, window = first, ProgressWindow()
    for at, passes, sent, free in walk(steps):
        each = sample(at, remaining, sent + round(at * 1000), passes if known_passes else None)
        window = window.add(each, rule)
        assert find_stall(window, rule) is None
        below = max(0, math.ceil(remaining * (1 - rule.tolerance)) - 1)
        remaining = free % (below + 1)


@EXAMPLES
@given(
    rule=RULES,
    history=STEPS,
    window_steps=STEPS,
    floor=st.integers(1, 2**40),
    known_passes=st.booleans(),
)
def test_always_stalls_when_remaining_is_flat_or_grows_over_a_full_window(
    rule: StallRule,
    history: list[tuple[int, int, int, int]],
    window_steps: list[tuple[int, int, int, int]],
    floor: int,
    known_passes: bool,
) -> None:
    """Any history, then a full window whose remaining never drops below its first sample's."""
    samples = [sample(at, free, sent, passes) for at, passes, sent, free in walk(history)]
    start = samples[-1] = attrs.evolve(samples[-1], remaining=floor)
    assert start.passes is not None
    for at, passes, sent, free in walk(window_steps)[1:]:
        more = start.transferred + sent
        samples.append(sample(start.at + at, floor + free, more, start.passes + passes))
    last = samples[-1]
    assert last.passes is not None
    samples.append(  # the sample that completes the window (a ms over it: float rounding)
        attrs.evolve(
            last,
            at=max(last.at, start.at + rule.seconds) + 0.001,
            passes=max(last.passes, start.passes + rule.passes),
        )
    )
    if not known_passes:
        samples = [attrs.evolve(s, passes=None) for s in samples]
    assert find_stall(fold(samples, rule), rule) is not None


@EXAMPLES
@given(rule=RULES, steps=STEPS)
def test_needs_a_full_window_of_samples(
    rule: StallRule, steps: list[tuple[int, int, int, int]]
) -> None:
    span = rule.seconds - 0.001
    samples = [
        sample(at, free, sent, passes)
        for at, passes, sent, free in walk(steps)
        if at <= span  # all within less than one window
    ]
    assert find_stall(fold(samples, rule), rule) is None


@EXAMPLES
@given(rule=RULES, steps=STEPS)
def test_needs_enough_passes_while_bytes_flow(
    rule: StallRule, steps: list[tuple[int, int, int, int]]
) -> None:
    """Flat remaining, bytes flowing, but fewer passes than the rule asks: the pass in flight
    may still be draining (a slow link sends a big guest's first pass for minutes)."""
    samples = [
        sample(at, 100 * MiB, sent + round(at * 1000), min(passes, rule.passes - 1))
        for at, passes, sent, _ in walk(steps)
    ]
    samples.append(attrs.evolve(samples[-1], at=samples[-1].at + 3600, transferred=2**50))
    if rule.passes > 0:
        assert find_stall(fold(samples, rule), rule) is None


@EXAMPLES
@given(rule=RULES, steps=STEPS, sent=st.integers(0, 2**40))
def test_nothing_sent_over_a_window_is_a_stall_of_its_own_kind(
    rule: StallRule, steps: list[tuple[int, int, int, int]], sent: int
) -> None:
    samples = [sample(at, free + 1, sent, passes) for at, passes, _, free in walk(steps)]
    # A millisecond more than the window, so float rounding cannot make the span fall short.
    samples.append(attrs.evolve(samples[-1], at=samples[-1].at + rule.seconds + 0.001))
    stall = find_stall(fold(samples, rule), rule)
    assert stall is not None
    assert stall.kind is StallKind.NO_TRANSFER


@EXAMPLES
@given(rule=RULES, steps=STEPS)
def test_the_bounded_window_judges_like_the_whole_history(
    rule: StallRule, steps: list[tuple[int, int, int, int]]
) -> None:
    """Dropping old samples (keeping only their lowest remaining) never changes a verdict."""
    samples: list[ProgressSample] = []
    window = ProgressWindow()
    for at, passes, sent, free in walk(steps):
        samples.append(sample(at, free % 2**20, sent, passes))
        window = window.add(samples[-1], rule)
        assert find_stall(window, rule) == find_stall(ProgressWindow(tuple(samples)), rule)
        assert window.samples[-1] == samples[-1]


def test_stall_worked_example() -> None:
    """The table in :func:`find_stall`'s docstring."""
    rule = StallRule(seconds=3.0, passes=3, tolerance=0.05)
    rows = [(0, 1, 512), (1, 2, 200), (2, 3, 180), (3, 4, 190), (4, 5, 182), (5, 6, 185)]
    window, verdicts = ProgressWindow(), []
    for at, passes, remaining in rows:
        window = window.add(sample(at, remaining * MiB, (at + 1) * 600 * MiB, passes), rule)
        verdicts.append(find_stall(window, rule))
    assert verdicts[:5] == [None] * 5
    stall = verdicts[5]
    assert stall is not None
    assert stall.kind is StallKind.NOT_CONVERGING
    assert (stall.seconds, stall.passes, stall.remaining) == (3.0, 3, 182 * MiB)
    assert stall.bytes_per_s == 600 * MiB
    assert stall.expected_downtime_ms == math.ceil(182 / 600 * 1000)
    assert "182.0 MiB left" in stall.describe()


def test_a_sample_that_does_not_advance_time_is_ignored() -> None:
    rule = StallRule()
    window = ProgressWindow().add(sample(1.0, 10, 10), rule)
    assert window.add(sample(1.0, 5, 20), rule) is window
    assert window.add(sample(0.5, 5, 20), rule) is window


@pytest.mark.parametrize(
    ("status", "ram", "expected"),
    [
        (MigrationStatus.SETUP, None, None),
        (MigrationStatus.ACTIVE, None, None),
        (MigrationStatus.PRE_SWITCHOVER, RamStats(transferred=5, remaining=1, total=9), None),
        (
            MigrationStatus.ACTIVE,
            RamStats(
                transferred=5, remaining=1, total=9, dirty_pages_rate=10, dirty_sync_count=3
            ),
            ProgressSample(
                at=2.0, remaining=1, transferred=5, total=9, passes=3, dirty_bytes_per_s=40960,
                expected_downtime_ms=7, throttle_percent=20,
            ),
        ),
    ],
)  # fmt: skip
def test_sample_from_stats(
    status: MigrationStatus, ram: RamStats | None, expected: ProgressSample
) -> None:
    stats = MigrationStats(
        status=status, ram=ram, expected_downtime_ms=7, cpu_throttle_percentage=20
    )
    assert ProgressSample.from_stats(2.0, stats) == expected


# --- The ladder --------------------------------------------------------------------------------

CLIMBABLE = [Rung.RAISE_DOWNTIME, Rung.THROTTLE, Rung.POSTCOPY]


@st.composite
def ladders(draw: st.DrawFn) -> Ladder:
    initial, maximum, steps = draw(downtime_ranges())
    order = draw(st.permutations(CLIMBABLE))[: draw(st.integers(0, len(CLIMBABLE)))]
    return Ladder(
        downtimes_ms=downtime_schedule(initial, maximum, min(steps, 8)),
        rungs=(*order, Rung.ABORT),
    )


def stall(kind: StallKind = StallKind.NOT_CONVERGING, expected_ms: int | None = None) -> Stall:
    return Stall(
        kind=kind,
        seconds=3.0,
        passes=3,
        remaining=100 * MiB,
        bytes_per_s=500e6,
        expected_downtime_ms=expected_ms,
    )


#: Enough stalls to climb any ladder drawn by `ladders` (at most 9 downtimes and 4 rungs); one in
#: four with nothing sent.
STALLS = st.lists(
    st.builds(
        stall,
        kind=st.sampled_from([StallKind.NOT_CONVERGING] * 3 + [StallKind.NO_TRANSFER]),
        expected_ms=st.none() | st.integers(1, 100_000),
    ),
    min_size=13,
    max_size=13,
)
CAPABILITIES = st.builds(Capabilities, st.booleans(), st.booleans(), st.booleans(), st.booleans())


def climb(ladder: Ladder, capabilities: Capabilities, stalls: Sequence[Stall]) -> list[Action]:
    """Take the next action on each stall until abort."""
    position, actions = LadderPosition(), []
    for each in stalls:
        action, position = next_action(ladder, position, capabilities, each)
        actions.append(action)
        if isinstance(action, Abort):
            return actions
    pytest.fail(f"no abort after {len(stalls)} stalls: {actions}")


@EXAMPLES
@given(ladder=ladders(), capabilities=CAPABILITIES, stalls=STALLS)
def test_ladder_uses_each_remedy_at_most_as_configured_and_aborts_last(
    ladder: Ladder, capabilities: Capabilities, stalls: list[Stall]
) -> None:
    actions = climb(ladder, capabilities, stalls)

    assert isinstance(actions[-1], Abort)
    assert not any(isinstance(a, Abort) for a in actions[:-1])
    raises = [a.limit_ms for a in actions if isinstance(a, SetDowntime)]
    assert raises == sorted(set(raises))
    assert set(raises) <= set(ladder.downtimes_ms[1:])
    if Rung.RAISE_DOWNTIME not in ladder.rungs:
        assert not raises
    throttles = [a for a in actions if isinstance(a, Throttle)]
    assert len(throttles) <= (Rung.THROTTLE in ladder.rungs and capabilities.auto_converge)
    postcopies = [a for a in actions if isinstance(a, StartPostcopy)]
    assert len(postcopies) <= (Rung.POSTCOPY in ladder.rungs and capabilities.postcopy)
    # Remedies come in the configured order.
    kinds = {SetDowntime: Rung.RAISE_DOWNTIME, Throttle: Rung.THROTTLE,
             StartPostcopy: Rung.POSTCOPY, Abort: Rung.ABORT}  # fmt: skip
    order = [ladder.rungs.index(kinds[type(a)]) for a in actions]
    assert order == sorted(order)


@EXAMPLES
@given(ladder=ladders(), capabilities=CAPABILITIES)
def test_postcopy_only_when_allowed_and_supported_on_both_sides(
    ladder: Ladder, capabilities: Capabilities
) -> None:
    actions = climb(ladder, capabilities, [stall()] * (len(ladder.downtimes_ms) + 4))
    used = any(isinstance(a, StartPostcopy) for a in actions)
    allowed = (
        capabilities.postcopy_allowed
        and capabilities.postcopy_on_source
        and capabilities.postcopy_on_target
    )
    assert used == (allowed and Rung.POSTCOPY in ladder.rungs)


@EXAMPLES
@given(ladder=ladders(), capabilities=CAPABILITIES, data=st.data())
def test_nothing_sent_aborts_at_once(
    ladder: Ladder, capabilities: Capabilities, data: st.DataObject
) -> None:
    position = LadderPosition(
        rung=data.draw(st.integers(0, len(ladder.rungs) - 1)),
        downtime=data.draw(st.integers(0, len(ladder.downtimes_ms) - 1)),
    )
    action, _ = next_action(ladder, position, capabilities, stall(StallKind.NO_TRANSFER))
    assert isinstance(action, Abort)


@EXAMPLES
@given(ladder=ladders())
def test_without_an_estimate_every_downtime_step_is_used(ladder: Ladder) -> None:
    actions = climb(ladder, ALL, [stall()] * (len(ladder.downtimes_ms) + 4))
    raises = tuple(a.limit_ms for a in actions if isinstance(a, SetDowntime))
    if Rung.RAISE_DOWNTIME in ladder.rungs:
        assert raises == ladder.downtimes_ms[1:]


def test_ladder_worked_example() -> None:
    """The table in :func:`next_action`'s docstring."""
    estimates = [500, 900, 1200, None, None]
    actions = climb(Ladder(), ALL, [stall(expected_ms=e) for e in estimates])
    assert actions[:4] == [SetDowntime(548), SetDowntime(1000), Throttle(40, 20), StartPostcopy()]
    assert isinstance(actions[4], Abort)
    assert actions[4].reason.startswith("did not converge: 100.0 MiB left")


def test_ladder_skips_what_cannot_act() -> None:
    actions = climb(Ladder(), Capabilities(), [stall(expected_ms=5000)] * 3)
    assert actions[0] == SetDowntime(1000)
    assert isinstance(actions[1], Abort)  # no auto-converge, no post-copy


@pytest.mark.parametrize(
    "rungs",
    [
        ("throttle",),
        ("abort", "throttle"),
        ("throttle", "throttle", "abort"),
        ("warp-speed", "abort"),
        (),
    ],
)
def test_ladder_rejects_bad_rungs(rungs: tuple[str, ...]) -> None:
    with pytest.raises(UsageError):
        Ladder.create(rungs=rungs)


def test_ladder_create() -> None:
    ladder = Ladder.create(
        initial_downtime_ms=100, max_downtime_ms=400, downtime_steps=2, rungs=("postcopy", "abort")
    )
    assert ladder == Ladder(downtimes_ms=(100, 200, 400), rungs=(Rung.POSTCOPY, Rung.ABORT))
    assert Ladder.create() == Ladder()
    assert SetDowntime(200).parameters() == {"downtime-limit": 200}
    assert Throttle().parameters() == {"cpu-throttle-initial": 40, "cpu-throttle-increment": 20}
    with pytest.raises(UsageError):
        Throttle(initial_percent=0)
    with pytest.raises(UsageError):
        Ladder(downtimes_ms=(300, 300))


# --- The RAM phase's deadline (Deadlines.ram_phase; the tracker keeps none) -------------------


@pytest.mark.parametrize(
    ("ram", "bandwidth", "expected"),
    [
        (512 * MiB, None, 67.5),
        (4 * GiB, None, 120.0),
        (64 * GiB, None, 1020.0),
        (16 * GiB, 125 * 10**6, 60 + 16 * 4 * GiB / (125 * 10**6)),
        (0, 1, 60.0),
    ],
)
def test_deadline_table(ram: int, bandwidth: int | None, expected: float) -> None:
    assert Deadlines().ram_phase(ram, bandwidth) == pytest.approx(expected)


def test_deadline_with_nothing_per_gib_is_fixed() -> None:
    fixed = Deadlines(switchover=300.0, switchover_per_gib=0.0)
    assert fixed.ram_phase(64 * GiB) == fixed.ram_phase(0, 1) == 300.0


@EXAMPLES
@given(
    ram=st.integers(0, 2**42),
    more=st.integers(0, 2**40),
    base=st.floats(1.0, 1000.0),
    per_gib=st.floats(0.0, 1000.0),
    bandwidth=st.integers(1, 10**11),
    faster=st.integers(0, 10**11),
)
def test_deadline_is_at_least_base_and_grows_with_ram_and_shrinks_with_bandwidth(
    ram: int, more: int, base: float, per_gib: float, bandwidth: int, faster: int
) -> None:
    deadlines = Deadlines(switchover=base, switchover_per_gib=per_gib)

    def deadline(ram: int, bandwidth: int | None) -> float:
        return deadlines.ram_phase(ram, bandwidth)

    assert deadline(ram, bandwidth) >= base
    assert deadline(ram, bandwidth) <= deadline(ram + more, bandwidth)
    assert deadline(ram, None) <= deadline(ram, bandwidth + faster) <= deadline(ram, bandwidth)


def test_deadline_rejects_bad_input() -> None:
    with pytest.raises(UsageError):
        Deadlines().ram_phase(-1)
    with pytest.raises(UsageError):
        Deadlines().ram_phase(GiB, bandwidth=0)
    with pytest.raises(UsageError):
        Deadlines(switchover_per_gib=-1.0)


# --- The tracker -------------------------------------------------------------------------------


def run(
    tracker: ConvergenceTracker, samples: Iterable[ProgressSample]
) -> tuple[ConvergenceTracker, list[tuple[float, Decision]]]:
    decisions = []
    for each in samples:
        tracker, decision = tracker.observe(each)
        if decision is not None:
            decisions.append((each.at, decision))
    return tracker, decisions


def busy_guest(
    seconds: float, *, rate: int = 600 * MiB, low: int = 450 * MiB, throttle_from: float = 1e9
) -> list[ProgressSample]:
    """A guest that never converges, polled every 100 ms: one pass a second whose remaining
    drains from ``low`` + 10 % to ``low``; auto-converge's throttle rises 10 points every 2 s from
    ``throttle_from`` on."""
    out = []
    for tick in range(round(seconds / PROGRESS_INTERVAL_S) + 1):
        at = tick * PROGRESS_INTERVAL_S
        throttle = min(99, 20 + 10 * int((at - throttle_from) // 2)) if at >= throttle_from else 0
        remaining = low + (low // 10) * (9 - tick % 10) // 9
        out.append(
            ProgressSample(
                at=at,
                remaining=remaining,
                transferred=round(rate * at),
                total=512 * MiB,
                passes=1 + tick // 10,
                throttle_percent=throttle,
            )
        )
    return out


def test_tracker_worked_example() -> None:
    """The table in :meth:`ConvergenceTracker.observe`'s docstring: a busy 512 MiB guest on the
    default policy, every capability."""
    tracker = ConvergenceTracker(ConvergencePolicy(), ALL)
    tracker, decisions = run(tracker, busy_guest(120.0, throttle_from=6.0))
    got = [(round(at, 1), d.action) for at, d in decisions]
    assert got == [(3.5, SetDowntime(1000)), (6.6, Throttle(40, 20)), (25.0, StartPostcopy())]
    assert tracker.finished
    assert tracker.downtime_ms == 1000
    assert decisions[0][1].reason == (
        "450.0 MiB left, not shrinking over 3.0 s / 3 passes; sending 629.1 MB/s, "
        "would need a 750 ms pause"
    )


def test_tracker_without_postcopy_aborts_after_the_ladder() -> None:
    tracker = ConvergenceTracker(ConvergencePolicy(), Capabilities(auto_converge=True))
    _, decisions = run(tracker, busy_guest(120.0, throttle_from=6.0))
    assert [round(at, 1) for at, _ in decisions] == [3.5, 6.6, 25.0]
    action = decisions[-1][1].action
    assert isinstance(action, Abort)
    assert action.reason.startswith("did not converge")


def test_tracker_keeps_no_deadline() -> None:
    """The RAM phase has one deadline, the runner's (``Deadlines.ram_phase``; the fake run in
    ``test_faults_fake`` shows it fire): a tracker that sees no stall never aborts, however long
    the migration takes."""
    policy = ConvergencePolicy(stall=StallRule(seconds=3600.0))  # no stall in these 2000 s
    tracker, decisions = run(ConvergenceTracker(policy, ALL), busy_guest(2000.0))
    assert decisions == []
    assert not tracker.finished


@EXAMPLES
@given(
    capabilities=CAPABILITIES,
    rule=RULES,
    interval_ms=st.integers(50, 1000),
    flat=st.integers(1, 2**40),
)
def test_tracker_on_a_flat_migration_ends_in_abort_or_postcopy_and_then_is_silent(
    capabilities: Capabilities, rule: StallRule, interval_ms: int, flat: int
) -> None:
    # The ladder alone ends it: the tracker keeps no deadline.
    tracker = ConvergenceTracker(ConvergencePolicy(stall=rule), capabilities)
    samples = [
        sample(i * interval_ms / 1000, flat, i * MiB, i, total=GiB)
        for i in range(90_000 // interval_ms + 1)
    ]
    tracker, decisions = run(tracker, samples)
    actions = [d.action for _, d in decisions]
    assert tracker.finished
    assert isinstance(actions[-1], StartPostcopy | Abort)
    assert not any(isinstance(a, StartPostcopy | Abort) for a in actions[:-1])
    if not capabilities.postcopy:
        assert not any(isinstance(a, StartPostcopy) for a in actions)
    assert tracker.observe(sample(1e6, flat, 0, total=GiB)) == (tracker, None)


@EXAMPLES
@given(rule=RULES, steps=STEPS, first=st.integers(1, 2**40))
def test_tracker_stays_quiet_while_remaining_shrinks_steadily(
    rule: StallRule, steps: list[tuple[int, int, int, int]], first: int
) -> None:
    tracker = ConvergenceTracker(ConvergencePolicy(stall=rule), ALL)
    remaining = first
    for at, passes, sent, _ in walk(steps):
        tracker, decision = tracker.observe(sample(at, remaining, sent + round(at * 1000), passes))
        assert decision is None
        remaining = max(0, math.ceil(remaining * (1 - rule.tolerance)) - 1)
