"""The switchover window in the result: what livemig did while the guest was paused (fake QEMUs;
the real migrations in ``test_migrate_real.py`` check it on QEMU 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from livemig.fsm.events import Outcome
from livemig.fsm.journal import MemoryJournal
from livemig.fsm.runner import migrate
from livemig.fsm.undo import Side
from livemig.testing.model.runs import plan_for
from livemig.testing.model.world import Storage, fake_world


@pytest.mark.parametrize("storage", ["non-shared", "shared"])
async def test_the_result_gives_the_switchover_window_command_by_command(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: Storage
) -> None:
    async with fake_world(tmp_path, storage=storage) as world:
        result = await migrate(
            plan_for(world), connector=world.connect, host=world.host, journal=MemoryJournal()
        )
    assert result.outcome is Outcome.FINALIZED, result.error
    window = result.switchover
    times = [ms for ms, _ in window]
    assert times == sorted(times)
    whats = [what for _, what in window]
    assert whats[0] == "source pre-switchover event received"
    assert times[0] == 0.0
    assert whats[-1] == "window closed"
    # Each command sent in the window is answered in it (two at once, to the two QEMUs, may be
    # answered in either order), and the target's cont is last.
    sent = [w.removeprefix("→ ") for w in whats if w.startswith("→ ")]
    answered = [w.removeprefix("← ") for w in whats if w.startswith("← ")]
    assert sorted(sent) == sorted(answered)
    assert all(whats.index(f"→ {c}") < whats.index(f"← {c}") for c in sent)
    assert sent[-1] == "target cont"
    assert "source migrate-continue" in sent
    assert ("source block-job-cancel" in sent) is (storage == "non-shared")
    assert ("mirror gone" in whats) is (storage == "non-shared")
    assert whats.index("target completed event received") < whats.index("→ target cont")
    assert result.to_json()["switchover"][0] == [0.0, "source pre-switchover event received"]


async def test_a_run_that_never_reached_the_switchover_has_no_window(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake_world(tmp_path) as world:
        await world.kill(Side.TARGET)
        result = await migrate(
            plan_for(world), connector=world.connect, host=world.host, journal=MemoryJournal()
        )
    assert result.switchover == ()
    assert result.to_json()["switchover"] == []
