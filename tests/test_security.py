"""What a run leaves reachable, and to whom: the work dir is the user's own, the NBD export's name
cannot be guessed, the NBD server lets one client in at a time."""

from __future__ import annotations

import stat
from pathlib import Path

import trio
import trio.testing

from livemig.drivers.host import LocalHost
from livemig.fsm.journal import MemoryJournal
from livemig.fsm.plan import Plan
from livemig.fsm.runner import migrate
from livemig.testing.model.runs import plan_for
from livemig.testing.model.world import fake_world


def test_the_nbd_export_name_is_random_per_plan(tmp_path: Path) -> None:
    def plan() -> Plan:
        return Plan.create(
            source_qmp=tmp_path / "s.qmp",
            target_qmp=tmp_path / "t.qmp",
            storage="non-shared",
            work_dir=tmp_path,
            run_id="r1",
        )

    names = {plan().export_name for _ in range(20)}
    assert len(names) == 20
    prefix = "lm-r1-d0-"
    assert all(name.startswith(prefix) and len(name) == len(prefix) + 16 for name in names)


async def test_the_work_dir_is_created_for_its_owner_only(tmp_path: Path) -> None:
    work = tmp_path / "a" / "work"
    await LocalHost().make_dir(work)
    assert stat.S_IMODE(work.stat().st_mode) == 0o700


async def test_images_livemig_creates_are_its_owners_only(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    await LocalHost().create_image(overlay, "qcow2", 1 << 20)
    assert stat.S_IMODE(overlay.stat().st_mode) == 0o600


async def test_the_nbd_server_takes_one_client_at_a_time_and_the_secret_name(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake_world(tmp_path) as world:
        plan = plan_for(world)
        result = await migrate(
            plan, connector=world.connect, host=world.host, journal=MemoryJournal()
        )
        assert result.outcome.value == "finalized", result.error
        (start,) = [c for c in world.target.log if c.name == "nbd-server-start"]
        assert start.arguments["max-connections"] == 1
        (export,) = [c for c in world.target.log if c.name == "block-export-add"]
        assert export.arguments["name"] == plan.export_name
