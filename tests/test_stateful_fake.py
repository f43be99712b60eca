"""Stateful stop on the fake QEMUs: forced and by fallback, each storage mode, and property-based
fault plans over its route — the guest keeps running on one side with every write, nothing left
behind. (The real runs are in ``test_stateful_real.py``.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from livemig._display import summary_lines
from livemig.fsm.events import Outcome
from livemig.fsm.machine import State, StorageMode
from livemig.fsm.undo import Side
from livemig.testing.cases import QMP_KINDS, STORAGES
from livemig.testing.faults import AtState, Fault, FaultKind, FaultPlan
from livemig.testing.model.runs import FaultRun, migrate_with_faults
from livemig.testing.model.world import fake_world

NON_SHARED_PATH = (
    "idle", "connected", "capabilities-set", "snapshotted", "mirroring", "state-saved",
    "switched-over", "finalized",
)  # fmt: skip
SHARED_PATH = tuple(s for s in NON_SHARED_PATH if s not in ("snapshotted", "mirroring"))
BLOCKER = "The vdi format used by node 'root' does not support live migration"


async def run(
    tmp_path: Path,
    storage: StorageMode,
    faults: FaultPlan | tuple[Fault, ...] = (),
    *,
    transfer: str = "stateful-stop",
    blocked: bool = False,
) -> FaultRun:
    with trio.fail_after(600):
        async with fake_world(tmp_path, storage=storage) as world:
            if blocked:
                world.source.blocked_reasons.append(BLOCKER)
            return await migrate_with_faults(world, faults, transfer=transfer)


@pytest.mark.parametrize("storage", STORAGES)
async def test_a_forced_stateful_stop_finalizes_with_every_write(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: StorageMode
) -> None:
    done = await run(tmp_path, storage)
    assert done.result.outcome is Outcome.FINALIZED, done.explain()
    assert done.verdict.ok, done.explain()
    assert done.verdict.survivor == "target"
    path = SHARED_PATH if storage is StorageMode.SHARED else NON_SHARED_PATH
    assert done.result.states == path
    assert done.result.transfer == "stateful-stop"
    assert done.result.fallback is None
    # The guest's downtime: from the source's stop to the target's cont (save and load: two
    # fake saves of 20 ms each, at least).
    assert done.result.downtime_ms is not None
    assert done.result.downtime_ms >= 40
    whats = [what for _, what in done.result.switchover]
    assert whats[0] == "source stop answered"
    assert "source saved the state" in whats
    assert "target loaded the state" in whats
    assert whats[-1] == "window closed"


@pytest.mark.parametrize("storage", STORAGES)
async def test_a_migration_blocker_falls_back_to_a_stateful_stop_and_says_why(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: StorageMode
) -> None:
    done = await run(tmp_path, storage, transfer="auto", blocked=True)
    assert done.result.outcome is Outcome.FINALIZED, done.explain()
    assert done.verdict.ok, done.explain()
    assert "state-saved" in done.result.states
    assert done.result.transfer == "stateful-stop"
    assert done.result.fallback == f"the source QEMU cannot migrate this guest: {BLOCKER}"
    assert any("live transfer is impossible" in w for w in done.result.warnings)


async def test_without_a_blocker_auto_stays_live(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    done = await run(tmp_path, StorageMode.NON_SHARED, transfer="auto")
    assert done.result.outcome is Outcome.FINALIZED, done.explain()
    assert "state-transfer" in done.result.states
    assert "state-saved" not in done.result.states
    assert done.result.transfer == "live"


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("side", [Side.SOURCE, Side.TARGET])
@pytest.mark.parametrize("kind", [FaultKind.QMP_ERROR, FaultKind.DISCONNECT, FaultKind.HANG])
async def test_a_fault_while_the_state_is_saved_or_restored_resumes_the_source(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    storage: StorageMode,
    side: Side,
    kind: FaultKind,
) -> None:
    """The source's first command in the save (``stop``), or the target's in the restore
    (``migrate-incoming``): the guest runs on the source with every write."""
    state = State.CAPABILITIES_SET if storage is StorageMode.SHARED else State.MIRRORING
    if side is Side.TARGET:
        state = State.STATE_SAVED
    done = await run(tmp_path, storage, (Fault(kind, AtState(state, side)),))
    assert done.fired, done.explain()
    assert done.result.outcome is Outcome.REVERTED, done.explain()
    assert done.verdict.ok, done.explain()
    assert done.verdict.survivor == "source"


STATEFUL_STATES = [
    State.IDLE,
    State.CONNECTED,
    State.CAPABILITIES_SET,
    State.SNAPSHOTTED,
    State.MIRRORING,
    State.STATE_SAVED,
    State.SWITCHED_OVER,
]
KINDS = [*QMP_KINDS, FaultKind.CANCEL, FaultKind.KILL_TARGET, FaultKind.KILL_SOURCE]


@st.composite
def stateful_plans(draw: st.DrawFn) -> tuple[StorageMode, FaultPlan]:
    storage = draw(st.sampled_from(STORAGES))
    faults = draw(
        st.lists(
            st.builds(
                lambda kind, state, side: Fault(
                    kind, AtState(state, side if kind in QMP_KINDS else None)
                ),
                st.sampled_from(KINDS),
                st.sampled_from(STATEFUL_STATES),
                st.sampled_from([Side.SOURCE, Side.TARGET]),
            ),
            min_size=1,
            max_size=3,
        )
    )
    return storage, FaultPlan(tuple(faults), draw(st.integers(0, 2**16)))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=stateful_plans())
def test_no_fault_plan_loses_a_stateful_stop(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[StorageMode, FaultPlan]
) -> None:
    storage, plan = case

    async def main() -> FaultRun:
        return await run(tmp_path_factory.mktemp("plan"), storage, plan)

    done = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    for fired in done.fired:
        event(f"fired: {storage} {fired.fault.kind.value} in {fired.state.value}")
    event(f"outcome: {done.result.outcome.value}")
    assert done.verdict.ok, done.explain()


async def test_the_summary_says_a_stateful_stop_and_what_its_downtime_measures(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    done = await run(tmp_path, StorageMode.SHARED, transfer="auto", blocked=True)
    lines = summary_lines(done.result)
    assert "transfer: stateful stop (live was impossible)" in lines
    assert f"downtime (stop to cont): {done.result.downtime_ms} ms" in lines
    assert any(line.startswith("warning: live transfer is impossible") for line in lines)
