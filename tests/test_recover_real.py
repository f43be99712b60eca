"""livemig itself killed (SIGKILL) in each state: ``livemig recover`` reads the journal and
brings the guest to safety — reverted to the source before the point of no return, finalized on
the target after it — with every invariant holding."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import trio
from support.guest_fixtures import guest_image_fixture  # noqa: F401 - provides "guest_image"
from support.qmp_fixtures import aio_loop_fixture  # noqa: F401 - provides "aio_loop"

from livemig.cli import EXIT_OK, EXIT_REVERTED
from livemig.guest import GuestImage
from livemig.guest._lab import migration_lab
from livemig.testing.campaign_real import kill_on_state

pytestmark = pytest.mark.qemu

LIVEMIG = [sys.executable, "-m", "livemig"]


@pytest.mark.parametrize(
    ("storage", "state", "extra"),
    [
        ("non-shared", "connected", []),
        ("non-shared", "capabilities-set", []),
        ("non-shared", "snapshotted", []),
        ("non-shared", "mirroring", []),
        ("non-shared", "state-transfer", ["--max-bandwidth", "1"]),
        ("non-shared", "pre-switchover", []),
        ("shared", "state-transfer", ["--max-bandwidth", "1"]),
    ],
)
async def test_recover_after_livemig_was_killed(
    guest_image: GuestImage,
    aio_loop: object,
    tmp_path: Path,
    storage: Literal["shared", "non-shared"],
    state: str,
    extra: list[str],
) -> None:
    with trio.fail_after(120):
        async with migration_lab(guest_image, tmp_path, storage=storage, dirty_mib_s=20) as lab:
            argv = [
                *LIVEMIG, "migrate", "--json", "--source-qmp", str(lab.source_qmp),
                "--target-qmp", str(lab.target_qmp), "--storage", storage,
                "--work-dir", str(tmp_path), *extra,
            ]  # fmt: skip
            process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
            assert await kill_on_state(process, state), "never saw the state"
            assert await process.wait() == -signal.SIGKILL
            assert list(tmp_path.glob("lm-*-journal.json")), "the run left no journal"

            recovered = await trio.run_process(
                [*LIVEMIG, "recover", "--json", "--work-dir", str(tmp_path)],
                capture_stdout=True,
                check=False,
            )
            results = [json.loads(x) for x in recovered.stdout.splitlines()]
            assert len(results) == 1, results
            outcome = results[0]["outcome"]
            assert outcome in ("reverted", "finalized"), results
            assert recovered.returncode == (EXIT_OK if outcome == "finalized" else EXIT_REVERTED)
            if state != "pre-switchover":
                assert outcome == "reverted"
            survivor: Literal["source", "target"] = "target" if outcome == "finalized" else "source"
            verdict = await lab.verify(expect=survivor)
    assert verdict.ok, verdict.problems
    assert not list(tmp_path.glob("lm-*")), "recovery left files behind"


def test_recover_with_nothing_to_do(tmp_path: Path) -> None:
    done = subprocess.run(
        [*LIVEMIG, "recover", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == EXIT_OK
    assert "nothing to recover" in done.stderr
