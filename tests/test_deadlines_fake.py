"""Every wait takes its one deadline from `Deadlines`: each field, shown to bound its wait on the
fake QEMUs (trio's autojump clock, so a deadline of minutes costs milliseconds)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from livemig.cli import build_parser, policy_from
from livemig.drivers.qmp import EventStream, Monitor
from livemig.fsm.events import MigrationResult, Outcome
from livemig.fsm.journal import MemoryJournal
from livemig.fsm.plan import Deadlines, Policy
from livemig.fsm.runner import migrate
from livemig.fsm.undo import Side
from livemig.testing.faults import AtCommand, Fault, FaultKind
from livemig.testing.model.runs import FAST_DEADLINES, FaultRun, migrate_with_faults, plan_for
from livemig.testing.model.world import Knobs, World, fake_world
from livemig.transports.errors import UsageError

#: Trio seconds any run here must end within.
GUARD = 600
#: The fake guest's RAM (``query-memory-size-summary``).
FAKE_RAM = 512 * 2**20
GiB = 2**30
#: No stall is ever seen within these tests: only the RAM phase's deadline can end the phase.
NO_STALL = Policy(progress_interval=0.1, stall_seconds=3600.0)


def test_every_deadline_must_be_positive() -> None:
    fields = [f.name for f in attrs.fields(Deadlines)]
    assert {"close", "recover_step", "liveness", "switchover_per_gib"} <= set(fields)
    for name in fields:
        with pytest.raises(UsageError, match=name):
            Deadlines(**{name: -1.0})
        with pytest.raises(UsageError, match=name):
            Deadlines(**{name: float("nan")})
        if name != "switchover_per_gib":  # 0 there: a fixed RAM-phase deadline
            with pytest.raises(UsageError, match=name):
                Deadlines(**{name: 0.0})
    assert Deadlines(switchover_per_gib=0.0).ram_phase(64 * GiB) == Deadlines().switchover


def test_the_defaults_are_documented_values() -> None:
    d = Deadlines()
    assert (d.close, d.recover_step, d.liveness) == (5.0, 60.0, 60.0)
    assert (d.switchover, d.switchover_per_gib) == (60.0, 15.0)
    # A 64 GiB guest is not cut off by a small fixed default.
    assert d.ram_phase(64 * GiB) == 1020.0


MIGRATE = ["migrate", "--source-qmp", "s.sock", "--target-qmp", "t.sock", "--storage", "shared"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], Deadlines()),  # scaled: 60 s + 15 s per GiB
        (["--switchover-timeout", "300"], Deadlines(switchover=300.0, switchover_per_gib=0.0)),
        (["--switchover-per-gib", "30"], Deadlines(switchover=60.0, switchover_per_gib=30.0)),
        (
            ["--switchover-timeout", "120", "--switchover-per-gib", "20"],
            Deadlines(switchover=120.0, switchover_per_gib=20.0),
        ),
    ],
)
def test_the_cli_sets_the_ram_phase_deadline(flags: list[str], expected: Deadlines) -> None:
    _, deadlines = policy_from(build_parser().parse_args([*MIGRATE, *flags]))
    assert deadlines == expected


def test_the_cli_sets_the_recovery_step_deadline() -> None:
    args = build_parser().parse_args(["recover", "--step-timeout", "7"])
    assert args.step_timeout == 7
    assert build_parser().parse_args(["recover"]).step_timeout == Deadlines().recover_step


async def _migrate(
    world: World, deadlines: Deadlines, policy: Policy = NO_STALL
) -> MigrationResult:
    plan = attrs.evolve(plan_for(world, deadlines=deadlines), policy=policy)
    return await migrate(plan, connector=world.connect, host=world.host, journal=MemoryJournal())


# -- the RAM phase: one deadline, scaled by the guest's RAM and the bandwidth cap --------------


@pytest.mark.parametrize(
    ("deadlines", "policy", "expected"),
    [
        # 0.5 s + 0.5 GiB x 2 s
        (attrs.evolve(FAST_DEADLINES, switchover=0.5, switchover_per_gib=2.0), NO_STALL, 1.5),
        # 0.5 s + 0.5 GiB x 3 s: the RAM size from connect scales it
        (attrs.evolve(FAST_DEADLINES, switchover=0.5, switchover_per_gib=3.0), NO_STALL, 2.0),
        # 0.5 s + 0.5 GiB x 4 sends at 256 MiB/s (16 s per GiB): the cap gives more time
        (
            attrs.evolve(FAST_DEADLINES, switchover=0.5, switchover_per_gib=2.0),
            attrs.evolve(NO_STALL, max_bandwidth=256 * 2**20),
            8.5,
        ),
        # nothing per GiB: the fixed switchover deadline
        (attrs.evolve(FAST_DEADLINES, switchover=2.5, switchover_per_gib=0.0), NO_STALL, 2.5),
    ],
)
async def test_the_ram_phase_has_one_deadline(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    deadlines: Deadlines,
    policy: Policy,
    expected: float,
) -> None:
    assert deadlines.ram_phase(FAKE_RAM, policy.max_bandwidth) == pytest.approx(expected)
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path, knobs=Knobs(converge_after=None)) as world:
            result = await _migrate(world, deadlines, policy)
    assert result.outcome is Outcome.REVERTED, result
    assert result.error_type == "DeadlineExceeded", result
    assert result.failed_in == "state-transfer"
    assert f"took longer than {expected:g} s" in (result.error or "")
    in_transfer = dict(result.phases_ms)["state-transfer"] / 1000
    assert expected <= in_transfer < expected + deadlines.undo_step


# -- closing a monitor -------------------------------------------------------------------------


@attrs.define
class _SlowToClose:
    """A monitor whose ``aclose`` never returns once the connection is closed."""

    inner: Monitor

    @property
    def name(self) -> str:
        return self.inner.name

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        return await self.inner.execute(command, arguments)

    def listen(self, *names: str) -> AbstractAsyncContextManager[EventStream]:
        return self.inner.listen(*names)

    async def aclose(self) -> None:
        await self.inner.aclose()
        await trio.sleep_forever()


@pytest.mark.parametrize("close", [0.25, 3.0])
async def test_closing_a_monitor_takes_at_most_the_close_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, close: float
) -> None:
    deadlines = attrs.evolve(FAST_DEADLINES, close=close)
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path) as world:

            async def connect(path: Path, name: str) -> Monitor:
                return _SlowToClose(await world.connect(path, name))

            plan = plan_for(world, deadlines=deadlines)
            started = trio.current_time()
            result = await migrate(
                plan, connector=connect, host=world.host, journal=MemoryJournal()
            )
            elapsed = trio.current_time() - started
    assert result.outcome is Outcome.FINALIZED, result
    # The result is made before the monitors are closed: both closes come after it.
    closing = elapsed - result.total_ms / 1000
    assert 2 * close <= closing < 2 * close + 0.1


# -- recovery: each connect, command and undo step; each liveness question -----------------------


async def _crash_after_cont(
    tmp_path: Path, deadlines: Deadlines, recovery_fault: Fault
) -> FaultRun:
    """livemig dies once the target runs the guest; the recovery meets ``recovery_fault``."""
    crash = Fault(FaultKind.CRASH, AtCommand("quit", side=Side.SOURCE))
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path) as world:
            return await migrate_with_faults(
                world, (crash,), deadlines=deadlines, recovery_faults=(recovery_fault,)
            )


@pytest.mark.parametrize("step", [1.5, 4.0])
async def test_a_recovery_command_that_never_answers_takes_the_recover_step_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, step: float
) -> None:
    hang = Fault(FaultKind.HANG, AtCommand("quit", side=Side.SOURCE))
    run = await _crash_after_cont(tmp_path, attrs.evolve(FAST_DEADLINES, recover_step=step), hang)
    assert run.recovered, run.explain()
    result = run.result
    assert result.outcome is Outcome.FINALIZED, run.explain()
    assert "could not quit the source" in (result.error or ""), run.explain()
    assert step <= result.total_ms / 1000 < step + 0.5, run.explain()


@pytest.mark.parametrize("liveness", [1.5, 4.0])
async def test_a_liveness_question_that_never_answers_takes_the_liveness_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, liveness: float
) -> None:
    hang = Fault(FaultKind.HANG, AtCommand("query-status", side=Side.TARGET))
    deadlines = attrs.evolve(FAST_DEADLINES, liveness=liveness)
    run = await _crash_after_cont(tmp_path, deadlines, hang)
    assert run.recovered, run.explain()
    result = run.result
    assert result.outcome is Outcome.FAILED, run.explain()
    assert "cannot tell whether the target runs the guest" in (result.error or "")
    assert liveness <= result.total_ms / 1000 < liveness + 0.5, run.explain()
