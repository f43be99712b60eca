"""Fault injection on the fake QEMUs: every fault at every point it applies, and a property-based
campaign over fault plans; the safety invariants (`livemig.testing.model.invariants`) after every
run."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from livemig.fsm.events import Outcome
from livemig.fsm.journal import MemoryJournal
from livemig.fsm.machine import State, StorageMode
from livemig.fsm.plan import Deadlines
from livemig.fsm.runner import migrate
from livemig.fsm.settings import UNLIMITED_BANDWIDTH
from livemig.fsm.undo import Side
from livemig.testing.cases import FAULT_STATES, OPERATIONS, STORAGES, Case, cases, expected
from livemig.testing.faults import (
    AtCommand,
    AtState,
    Fault,
    FaultInjector,
    FaultKind,
    FaultPlan,
)
from livemig.testing.model.runs import FaultRun, migrate_with_faults, plan_for
from livemig.testing.model.world import Knobs, Storage, fake_world
from livemig.transports.errors import CommandFailed, ConnectionLost, ProtocolError, UsageError

#: The table's faults in a state, and its crashes (followed by ``livemig recover``).
TABLE = [c for c in cases() if c.kind is not FaultKind.CRASH]
CRASHES = [c for c in cases() if c.kind is FaultKind.CRASH]
#: Trio seconds any fake run must end within (deadlines included).
GUARD = 120


async def run_once(
    tmp_path: Path,
    faults: tuple[Fault, ...] | FaultPlan = (),
    *,
    storage: Storage | StorageMode = "non-shared",
    knobs: Knobs | None = None,
    deadlines: Deadlines | None = None,
    guard: float = GUARD,
) -> FaultRun:
    with trio.fail_after(guard):
        async with fake_world(tmp_path, storage=storage, knobs=knobs) as world:
            if deadlines is None:
                return await migrate_with_faults(world, faults)
            return await migrate_with_faults(world, faults, deadlines=deadlines)


# -- the fault values ----------------------------------------------------------------------------


def test_plan_round_trips_through_json() -> None:
    plan = FaultPlan(
        (
            Fault(FaultKind.HANG, AtState(State.MIRRORING, Side.TARGET)),
            Fault(FaultKind.KILL_SOURCE, AtCommand("migrate", nth=2)),
            Fault(FaultKind.DISK_FULL, AtCommand("create-image")),
        ),
        seed=7,
    )
    text = json.dumps(plan.to_json())
    assert FaultPlan.from_json(json.loads(text)) == plan
    assert plan.describe() == (
        "hang in mirroring on target; kill-source at migrate #2; disk-full at create-image #1"
    )


def test_fault_values_are_checked() -> None:
    assert Fault("cut-nbd", AtState("snapshotted", "source")) == Fault(
        FaultKind.CUT_NBD, AtState(State.SNAPSHOTTED, Side.SOURCE)
    )
    with pytest.raises(UsageError):
        AtState(State.FINALIZED)
    with pytest.raises(ValueError, match="nth"):
        AtCommand("migrate", nth=0)
    with pytest.raises(UsageError):
        FaultPlan.from_json({"faults": [{"kind": "hang"}], "seed": 0})
    with pytest.raises(UsageError, match="kill"):
        FaultInjector(FaultPlan((Fault(FaultKind.KILL_TARGET, AtState(State.IDLE)),)))
    with pytest.raises(UsageError, match="cut_nbd"):
        FaultInjector(FaultPlan((Fault(FaultKind.CUT_NBD, AtState(State.IDLE)),)))


# -- the injector's mechanics, on one fake QEMU --------------------------------------------------


async def test_a_hang_carries_the_command_out_and_never_answers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    injector = FaultInjector(FaultPlan((Fault(FaultKind.HANG, AtCommand("stop")),)))
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path) as world:
            monitor = await injector.connector(world.connect)(world.source.qmp, "source")
            with trio.move_on_after(30) as waited:
                await monitor.execute("stop")
            assert waited.cancelled_caught
            assert world.source.runstate == "paused"  # QEMU did it; the answer never came
            assert (await monitor.execute("query-status"))["status"] == "paused"
            await monitor.aclose()


async def test_a_disconnect_drops_the_link_for_good_but_qemu_lives(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    plan = FaultPlan((Fault(FaultKind.DISCONNECT, AtCommand("query-jobs", side=Side.SOURCE)),))
    injector = FaultInjector(plan)
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path) as world:
            monitor = await injector.connector(world.connect)(world.source.qmp, "source")
            async with monitor.listen("STOP") as events:
                with pytest.raises(ConnectionLost):
                    await monitor.execute("query-jobs")
                with pytest.raises(ConnectionLost):
                    await events.receive()
            with pytest.raises(ConnectionLost):
                await monitor.execute("query-status")
            assert world.source.alive
            assert [c.name for c in world.source.log] == []  # it never reached QEMU
            await monitor.aclose()


async def test_faults_count_calls_per_side_and_report_what_never_struck(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    plan = FaultPlan(
        (
            Fault(FaultKind.QMP_ERROR, AtCommand("query-status", nth=2, side=Side.TARGET)),
            Fault(FaultKind.MALFORMED, AtCommand("query-status", nth=3)),
            Fault(FaultKind.QMP_ERROR, AtState(State.MIRRORING)),
        )
    )
    injector = FaultInjector(plan)
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path) as world:
            connect = injector.connector(world.connect)
            source = await connect(world.source.qmp, "source")
            target = await connect(world.target.qmp, "target")
            await source.execute("query-status")  # 1st overall
            await target.execute("query-status")  # 2nd overall, 1st on the target
            with pytest.raises(ProtocolError):
                await source.execute("query-status")  # 3rd overall
            with pytest.raises(CommandFailed):
                await target.execute("query-status")  # 2nd on the target
            for monitor in (source, target):
                await monitor.aclose()
    assert [f.describe() for f in injector.fired] == [
        "malformed in idle at query-status on source",
        "qmp-error in idle at query-status on target",
    ]
    assert injector.unfired() == (plan.faults[2],)
    assert injector.report()["unfired"] == ["qmp-error in mirroring"]


# -- (a) the happy paths -------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
async def test_happy_path_finalizes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: StorageMode
) -> None:
    run = await run_once(tmp_path, storage=storage)
    assert run.result.outcome is Outcome.FINALIZED, run.explain()
    assert run.verdict.ok, run.explain()
    assert run.verdict.survivor == "target"
    skipped = ("snapshotted", "mirroring") if storage == "shared" else ()
    assert run.result.states == tuple(
        s.value for s in (*FAULT_STATES, State.FINALIZED) if s.value not in skipped
    )


@pytest.mark.parametrize(("cap", "sent"), [(None, UNLIMITED_BANDWIDTH), (16 << 20, 16 << 20)])
async def test_the_operators_bandwidth_cap_is_the_one_qemu_gets(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, cap: int | None, sent: int
) -> None:
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path) as world:
            plan = plan_for(world)
            plan = attrs.evolve(plan, policy=attrs.evolve(plan.policy, max_bandwidth=cap))
            result = await migrate(
                plan, connector=world.connect, host=world.host, journal=MemoryJournal()
            )
    assert result.outcome is Outcome.FINALIZED, result.to_json()
    caps = [
        c.arguments["max-bandwidth"]
        for c in world.source.log
        if c.name == "migrate-set-parameters" and "max-bandwidth" in c.arguments
    ]
    assert caps[0] == sent  # set before ``migrate``; nothing else changes it on a clean run


# -- (b) every fault where it applies ------------------------------------------------------------


@pytest.mark.parametrize("case", TABLE, ids=lambda c: c.name)
async def test_fault_in_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, case: Case
) -> None:
    run = await run_once(tmp_path, (case.fault,), storage=case.storage)
    assert run.fired, f"the fault never struck: {run.explain()}"
    assert run.fired[0].state is case.state
    assert run.result.outcome in expected(case), run.explain()
    assert run.verdict.ok, run.explain()


# -- (c) a property-based campaign over fault plans ----------------------------------------------

SIDES = st.sampled_from((None, Side.SOURCE, Side.TARGET))
WHERE = st.one_of(
    st.builds(AtState, st.sampled_from(FAULT_STATES), SIDES),
    st.builds(AtCommand, st.sampled_from(OPERATIONS), st.integers(1, 8), SIDES),
)
FAULT = st.builds(Fault, st.sampled_from(list(FaultKind)), WHERE)


@st.composite
def storages_and_plans(draw: st.DrawFn) -> tuple[StorageMode, FaultPlan]:
    """A first fault at a (state, kind) where it applies, so every pair gets its turn, then up
    to two more anywhere: at commands, during the revert, on either side; a crash among them
    is followed by ``livemig recover``."""
    first = draw(st.sampled_from(TABLE))
    more = draw(st.lists(FAULT, max_size=2))
    seed = draw(st.integers(0, 2**16))
    return first.storage, FaultPlan((first.fault, *more), seed)


def campaign_run(work_dir: Path, plan: FaultPlan, storage: StorageMode) -> FaultRun:
    """One example, in a trio run of its own on the mock clock."""

    async def main() -> FaultRun:
        return await run_once(work_dir, plan, storage=storage)

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@settings(
    max_examples=800,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)
@given(case=storages_and_plans())
def test_no_fault_plan_loses_the_vm(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[StorageMode, FaultPlan]
) -> None:
    storage, plan = case
    run = campaign_run(tmp_path_factory.mktemp("plan"), plan, storage)
    for fired in run.fired:
        event(f"fired: {storage} {fired.fault.kind.value} in {fired.state.value}")
    event(f"outcome: {run.result.outcome.value}")
    assert run.verdict.ok, run.explain()


# -- (d) waits that never end, ended by their deadlines -------------------------------------------

#: livemig's own default deadlines: these tests prove they bound every wait.
DEFAULTS = Deadlines()
#: Trio seconds a run under the default deadlines must end within.
LONG_GUARD = 3600
#: The fake guest's RAM (``query-memory-size-summary``): the RAM phase's deadline scales by it.
FAKE_RAM = 512 * 2**20


def phase_seconds(run: FaultRun, state: str) -> float:
    """How long the run stayed in ``state``, its revert included."""
    return dict(run.result.phases_ms)[state] / 1000


async def test_a_command_that_never_answers_reverts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    hang = Fault(FaultKind.HANG, AtCommand("blockdev-mirror"))
    run = await run_once(tmp_path, (hang,), deadlines=DEFAULTS, guard=LONG_GUARD)
    assert run.result.outcome is Outcome.REVERTED, run.explain()
    assert run.result.error_type == "DeadlineExceeded"
    assert run.result.failed_in == "snapshotted"
    assert run.verdict.ok, run.explain()
    assert phase_seconds(run, "snapshotted") < DEFAULTS.command + DEFAULTS.undo_step


async def test_a_mirror_that_never_gets_ready_reverts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The guest writes once a second here: twenty minutes of 19 ms ticks take real seconds.
    knobs = Knobs(mirror_ready_after=None, tick=1.0)
    run = await run_once(tmp_path, knobs=knobs, deadlines=DEFAULTS, guard=LONG_GUARD)
    assert run.result.outcome is Outcome.REVERTED, run.explain()
    assert run.result.error_type == "DeadlineExceeded"
    assert run.result.failed_in == "snapshotted"
    assert run.verdict.ok, run.explain()
    assert phase_seconds(run, "snapshotted") < (
        DEFAULTS.base_copy + DEFAULTS.mirror_ready + DEFAULTS.undo_step
    )


@pytest.mark.parametrize("storage", STORAGES)
async def test_a_migration_that_never_converges_reverts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: StorageMode
) -> None:
    run = await run_once(
        tmp_path,
        storage=storage,
        knobs=Knobs(converge_after=None),
        deadlines=DEFAULTS,
        guard=LONG_GUARD,
    )
    assert run.result.outcome is Outcome.REVERTED, run.explain()
    # The convergence policy gives up on a stall before the RAM phase's deadline would.
    assert run.result.error_type in ("ConvergenceFailed", "DeadlineExceeded")
    assert run.result.failed_in == "state-transfer"
    assert run.verdict.ok, run.explain()
    assert phase_seconds(run, "state-transfer") < (
        DEFAULTS.ram_phase(FAKE_RAM) + DEFAULTS.undo_step
    )


# -- crash: livemig itself dies; `livemig recover` brings the guest to safety ----------------------


@pytest.mark.parametrize("case", CRASHES, ids=lambda c: c.name)
async def test_crash_then_recover(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, case: Case
) -> None:
    run = await run_once(tmp_path, (case.fault,), storage=case.storage)
    assert run.recovered, run.explain()
    assert run.result.outcome in expected(case), run.explain()
    assert run.verdict.ok, run.explain()
