"""Bad input refused before anything is touched, on the fake QEMUs: outcome ``refused`` (exit 2),
one clear message, nothing journalled, both QEMUs exactly as they were. (The real-QEMU side of
the input contract is in ``test_cli.py``.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from livemig.cli import exit_code
from livemig.fsm.events import Outcome
from livemig.fsm.journal import MemoryJournal
from livemig.fsm.runner import migrate
from livemig.testing.model.runs import plan_for
from livemig.testing.model.world import Storage, fake_world


@pytest.mark.parametrize("storage", ["non-shared", "shared"])
@pytest.mark.parametrize(
    ("side", "capability"),
    [("source", "events"), ("target", "events")],
)
async def test_a_missing_capability_is_refused_and_touches_nothing(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    storage: Storage,
    side: str,
    capability: str,
) -> None:
    journal = MemoryJournal()
    async with fake_world(tmp_path, storage=storage) as world:
        qemu = world.source if side == "source" else world.target
        del qemu.capabilities[capability]  # an older QEMU that does not have it
        before = {q: dict(q.capabilities) for q in (world.source, world.target)}
        result = await migrate(
            plan_for(world), connector=world.connect, host=world.host, journal=journal
        )
        assert result.outcome is Outcome.REFUSED
        assert exit_code(result) == 2
        assert result.states == ("idle",)
        assert result.error is not None
        assert f"the {side} QEMU lacks migration capabilities ['{capability}']" in result.error
        # Untouched: the target was not quit, nothing was set, nothing is journalled.
        assert world.target.exit_reason is None
        assert world.target.runstate == "inmigrate"
        assert world.source.runstate == "running"
        for q in (world.source, world.target):
            assert q.capabilities == before[q]
        assert journal.journals == {}


async def test_a_migration_blocker_is_refused_in_qemus_words_when_the_plan_asks_for_live(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    journal = MemoryJournal()
    reason = "The vvfat (rw) format used by node 'vv0' does not support live migration"
    async with fake_world(tmp_path) as world:
        world.source.blocked_reasons.append(reason)
        result = await migrate(
            plan_for(world, transfer="live"),
            connector=world.connect,
            host=world.host,
            journal=journal,
        )
        assert result.outcome is Outcome.REFUSED
        assert result.error is not None
        assert f"the source QEMU cannot migrate this guest: {reason}" in result.error
        assert "--mode stateful-stop" in result.error
        assert world.target.exit_reason is None
        assert world.target.runstate == "inmigrate"
        assert not world.source.capabilities["events"]
        assert journal.journals == {}


async def test_without_pause_before_switchover_live_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake_world(tmp_path) as world:
        del world.source.capabilities["pause-before-switchover"]  # an older QEMU
        result = await migrate(
            plan_for(world, transfer="live"), connector=world.connect, host=world.host
        )
        assert result.outcome is Outcome.REFUSED
        assert exit_code(result) == 2
        assert result.error is not None
        assert "lacks migration capabilities ['pause-before-switchover']" in result.error
        assert world.target.runstate == "inmigrate"
