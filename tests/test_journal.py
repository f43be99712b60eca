"""The journal sinks, and when the runner writes to them (on fake QEMUs)."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from livemig.fsm.journal import FileJournal, Journal, MemoryJournal, journal_path
from livemig.fsm.machine import State
from livemig.fsm.recovery import recover
from livemig.fsm.runner import migrate
from livemig.fsm.undo import Side, UndoKind, UndoStep
from livemig.testing.faults import AtState, Fault, FaultKind
from livemig.testing.model.runs import migrate_with_faults, plan_for
from livemig.testing.model.world import Knobs, Storage, fake_world

pytestmark = pytest.mark.filterwarnings("error")


def a_journal(run_id: str = "r1", state: str = "snapshotted") -> Journal:
    return Journal(
        run_id=run_id,
        source_qmp="s.qmp",
        target_qmp="t.qmp",
        storage="non-shared",
        state=state,
        undo=(UndoStep(UndoKind.QUIT, Side.TARGET),),
        files=("overlay.qcow2",),
    )


async def test_a_file_journal_is_written_read_and_removed(tmp_path: Path) -> None:
    sink = FileJournal(tmp_path)
    await sink.write(a_journal("r1"))
    await sink.write(a_journal("r1", state="mirroring"))
    path = journal_path(tmp_path, "r1")
    assert path.exists()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert await sink.read() == [a_journal("r1", state="mirroring")]
    await sink.remove("r1")
    await sink.remove("r1")  # twice: nothing left is no error
    assert await sink.read() == []
    assert list(tmp_path.iterdir()) == []


async def test_a_memory_journal_keeps_one_journal_per_run() -> None:
    sink = MemoryJournal()
    await sink.write(a_journal("r1"))
    await sink.write(a_journal("r2"))
    await sink.write(a_journal("r1", state="mirroring"))
    assert [(j.run_id, j.state) for j in await sink.read()] == [
        ("r1", "mirroring"),
        ("r2", "snapshotted"),
    ]
    await sink.remove("r1")
    assert [j.run_id for j in await sink.read()] == ["r2"]


@attrs.define
class Recording(MemoryJournal):
    """Every write, in order."""

    written: list[Journal] = attrs.field(factory=list)
    durable: list[bool] = attrs.field(factory=list)

    async def write(self, journal: Journal, *, durable: bool = True) -> None:
        self.written.append(journal)
        self.durable.append(durable)
        await super().write(journal, durable=durable)


@pytest.mark.parametrize("storage", ["non-shared", "shared"])
async def test_a_run_journals_every_state_once_touched_but_the_paused_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: Storage
) -> None:
    sink = Recording()
    async with fake_world(tmp_path, storage=storage) as world:
        result = await migrate(
            plan_for(world), connector=world.connect, host=world.host, journal=sink
        )
    assert result.outcome.value == "finalized", result.error
    states = [j.state for j in sink.written]
    entered = [s for s in result.states if s not in ("idle", "connected")]
    # Every state entered after the first undo push (in connect) is journalled on entry but
    # pre-switchover (the guest is paused there) and the terminal one.
    for state in entered:
        if state in (State.PRE_SWITCHOVER.value, State.FINALIZED.value):
            assert state not in states
        else:
            assert state in states, (state, states)
    assert "connected" in states
    # Undo pushes are durable, state entries only atomic but at the point of no return.
    entries = {j.state: d for j, d in zip(sink.written, sink.durable, strict=True)}
    assert entries[State.SWITCHED_OVER.value]
    assert not entries[State.STATE_TRANSFER.value]
    # Nothing of the run is left in the sink, or on disk.
    assert await sink.read() == []
    assert not list(tmp_path.glob("lm-*-journal.json*"))


async def test_a_reverted_run_removes_its_journal(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sink = Recording()
    async with fake_world(tmp_path, knobs=Knobs(mirror_ready_after=None)) as world:
        result = await migrate(
            plan_for(world), connector=world.connect, host=world.host, journal=sink
        )
    assert result.outcome.value == "reverted", result.error
    # The stack as it stood when the mirror was started is what a crash then would recover.
    last = sink.written[-1]
    assert last.state == "snapshotted"
    assert UndoKind.CANCEL_JOB in {step.kind for step in last.undo}
    assert await sink.read() == []


async def test_a_refused_run_never_journals(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sink = Recording()
    async with fake_world(tmp_path) as world:
        await world.kill(Side.TARGET)
        result = await migrate(
            plan_for(world), connector=world.connect, host=world.host, journal=sink
        )
    assert result.outcome.value == "refused", result.error
    assert sink.written == []


@pytest.mark.parametrize("crash_in", [State.MIRRORING, State.STATE_TRANSFER])
async def test_a_fake_run_starts_no_thread_even_through_a_crash_and_recovery(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    crash_in: State,
) -> None:
    """A worker thread under the autojump clock lets virtual time leap past every deadline
    while it runs (a busy machine then makes a seeded run end otherwise): fake runs must not
    start one (the journal is in memory)."""

    def no_thread(*args: object, **kwargs: object) -> object:
        raise AssertionError(f"a fake run started a worker thread: {args}")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
    async with fake_world(tmp_path) as world:
        run = await migrate_with_faults(world, (Fault(FaultKind.CRASH, AtState(crash_in)),))
    assert run.recovered
    assert run.verdict.ok, run.explain()
    assert run.result.outcome.value == "reverted"
    assert not list(tmp_path.glob("lm-*-journal.json*"))


async def test_recover_keeps_the_source_when_the_target_that_took_over_is_gone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Journalled past the point of no return, but the target no longer runs: rolling forward
    would quit the source, the last copy of the guest. Recovery ends failed and keeps it."""
    async with fake_world(tmp_path) as world:
        sink = MemoryJournal()
        await sink.write(
            attrs.evolve(
                a_journal("r1", state=State.SWITCHED_OVER.value),
                source_qmp=str(world.source.qmp),
                target_qmp=str(world.target.qmp),
                target_resumed=True,
            )
        )
        await world.kill(Side.TARGET)
        (result,) = await recover(
            world.work_dir, connector=world.connect, host=world.host, journal=sink
        )
        assert result.outcome.value == "failed"
        assert result.error is not None
        assert "no longer does" in result.error
        assert world.source.exit_reason is None  # not quit
        assert [j.run_id for j in await sink.read()] == ["r1"]  # kept for another try
