"""Named regression tests: the field bugs livemig is designed against, and every failure the
fault campaign (``test_faults_fake.py``) found, shrunk to its plan. All on the fake QEMUs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from livemig.drivers import block, jobs, migration, nbd, runstate
from livemig.drivers.status import JobStatus, MigrationStatus
from livemig.fsm.events import MigrationResult, Outcome
from livemig.fsm.machine import State
from livemig.fsm.plan import Deadlines
from livemig.fsm.session import JOB_EVENTS, wait_job, wait_migration
from livemig.fsm.undo import Side
from livemig.testing.faults import AtCommand, AtState, Fault, FaultKind
from livemig.testing.model.block import Job
from livemig.testing.model.invariants import check_invariants, reads_only
from livemig.testing.model.runs import FaultRun, migrate_with_faults
from livemig.testing.model.world import Knobs, Storage, World, fake_world
from livemig.transports.endpoints import UnixEndpoint

GUARD = 120
STORAGES: tuple[Storage, ...] = ("non-shared", "shared")


async def run_once(
    tmp_path: Path,
    faults: tuple[Fault, ...] = (),
    *,
    storage: Storage = "non-shared",
    knobs: Knobs | None = None,
) -> FaultRun:
    tmp_path.mkdir(exist_ok=True)
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path, storage=storage, knobs=knobs) as world:
            return await migrate_with_faults(world, faults)


# -- the mirror cancelled before pre-switchover -------------------------------------------------


async def _hand_migrate(world: World, *, cancel_mirror: str) -> MigrationResult:
    """A non-shared migration scripted by hand with the drivers, cancelling the mirror either
    ``early`` (before RAM transfer, the field bug) or at ``pre-switchover`` (livemig's order)."""
    src = await world.connect(world.source.qmp, "source")
    dst = await world.connect(world.target.qmp, "target")
    work = world.work_dir
    overlay, nbd_sock, uri = work / "ov.qcow2", work / "nbd.sock", f"unix:{work / 'ram.sock'}"
    await migration.set_capabilities(src, {"events": True, "pause-before-switchover": True})
    await migration.set_capabilities(dst, {"events": True})
    await world.host.create_image(overlay, "qcow2", 64 << 20)
    await block.blockdev_add(
        src,
        {"driver": "qcow2", "node-name": "ov", "backing": None,
         "file": {"driver": "file", "filename": str(overlay)}},
    )  # fmt: skip
    await block.blockdev_snapshot(src, "root", "ov")
    await nbd.nbd_server_start(dst, nbd_sock)
    await nbd.block_export_add(dst, export_id="e", node_name="root", name="root", writable=True)
    await world.host.copy_to_nbd(
        world.work_dir / "source.raw", "raw", UnixEndpoint(nbd_sock), "root", target_is_zero=True
    )
    await block.blockdev_add(
        src,
        {"driver": "nbd", "node-name": "nbd", "export": "root",
         "server": {"type": "unix", "path": str(nbd_sock)}},
    )  # fmt: skip
    async with src.listen(*JOB_EVENTS) as job_events:
        await block.blockdev_mirror(src, job_id="m", device="ov", target="nbd", sync="top")
        await wait_job(job_events, src, "m", until="ready", state=State.SNAPSHOTTED)

    async def cancel() -> None:
        async with src.listen(*JOB_EVENTS) as stream:
            await jobs.block_job_cancel(src, "m")
            await wait_job(stream, src, "m", until="gone", state=State.PRE_SWITCHOVER)

    async with src.listen("MIGRATION") as src_events, dst.listen("MIGRATION") as dst_events:
        if cancel_mirror == "early":
            await cancel()
        await migration.migrate_incoming(dst, uri)
        await migration.migrate(src, uri)
        await wait_migration(
            src_events, {MigrationStatus.PRE_SWITCHOVER}, state=State.STATE_TRANSFER, side="s"
        )
        if cancel_mirror == "at pre-switchover":
            await cancel()
        await migration.migrate_continue(src)
        done = {MigrationStatus.COMPLETED}
        await wait_migration(src_events, done, state=State.PRE_SWITCHOVER, side="s")
        await wait_migration(dst_events, done, state=State.PRE_SWITCHOVER, side="t")
    await nbd.nbd_server_stop(dst)
    await runstate.cont(dst)
    await runstate.quit(src)
    return MigrationResult(outcome=Outcome.FINALIZED, states=(), total_ms=0.0)


@pytest.mark.parametrize(
    ("cancel_mirror", "loses_writes"), [("early", True), ("at pre-switchover", False)]
)
async def test_the_model_catches_a_mirror_cancelled_before_pre_switchover(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, cancel_mirror: str, loses_writes: bool
) -> None:
    """Field bug (measured on QEMU 7.2: 139 acknowledged records missing): the mirror cancelled
    during RAM transfer stops forwarding writes, the migration still completes and the guest
    runs on a disk without them. A hand-written migration in the wrong order shows the model
    catches it; the same sequence in livemig's order keeps every write."""
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path) as world:
            result = await _hand_migrate(world, cancel_mirror=cancel_mirror)
            await trio.sleep(0.2)
            verdict = check_invariants(world, result)
    missing = [p for p in verdict.safety if "acknowledged writes are missing" in p]
    assert bool(missing) is loses_writes, verdict
    assert verdict.survivor == "target"


async def test_livemig_cancels_the_mirror_only_at_pre_switchover(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path) as world:
            run = await migrate_with_faults(world)
            cancels = [c for c in world.source.log if c.name == "block-job-cancel"]
    assert run.result.outcome is Outcome.FINALIZED, run.explain()
    assert run.verdict.ok, run.explain()
    # Sent once, while the migration held the guest paused before switchover.
    assert [c.runstate for c in cancels] == ["finish-migrate"]


# -- split brain: the target left running after a failure ---------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
async def test_cancel_just_before_the_target_cont_reverts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: Storage
) -> None:
    """Campaign find: the operator's cancel landed on the target's ``cont``, which never ran;
    livemig took it for "maybe resumed" and ended ``failed`` with the guest paused on both
    sides. It must ask the target, find it paused, and revert."""
    run = await run_once(
        tmp_path, (Fault(FaultKind.CANCEL, AtCommand("cont", side=Side.TARGET)),), storage=storage
    )
    assert run.result.outcome is Outcome.REVERTED, run.explain()
    assert run.verdict.ok, run.explain()


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("kind", [FaultKind.HANG, FaultKind.MALFORMED])
async def test_a_cont_whose_answer_is_lost_rolls_forward(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: Storage, kind: FaultKind
) -> None:
    """Campaign find: the target ran ``cont`` but its answer never came (or was garbage);
    livemig ended ``failed``, leaving the source QEMU and the run's files behind. The target
    runs the guest, so the migration has happened: finish it."""
    run = await run_once(
        tmp_path, (Fault(kind, AtCommand("cont", side=Side.TARGET)),), storage=storage
    )
    assert run.result.outcome is Outcome.FINALIZED, run.explain()
    assert run.verdict.ok, run.explain()
    assert run.verdict.leftovers == ()


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("then", [FaultKind.QMP_ERROR, FaultKind.DISCONNECT, FaultKind.HANG])
async def test_one_failed_question_does_not_decide_whether_the_target_runs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: Storage, then: FaultKind
) -> None:
    """Campaign find (shrunk): the link dropped under the target's ``cont``, and the question
    livemig then asked the target ("do you run?") failed once; livemig took "cannot tell" for
    an answer and ended ``failed`` with the guest paused on both sides. Ask until answered."""
    faults = (
        Fault(FaultKind.DISCONNECT, AtCommand("cont", side=Side.TARGET)),
        Fault(then, AtCommand("query-status", nth=2, side=Side.TARGET)),
    )
    run = await run_once(tmp_path, faults, storage=storage)
    assert len(run.fired) == 2, run.explain()
    assert run.result.outcome is Outcome.REVERTED, run.explain()
    assert run.verdict.ok, run.explain()


@pytest.mark.parametrize("storage", STORAGES)
async def test_a_dropped_link_is_not_taken_for_a_dead_target(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: Storage
) -> None:
    """The target ran ``cont`` but the answer was garbage, and the link dropped as livemig
    asked whether it runs. A dropped link is no proof the target is gone (only a refused
    reconnect is): taking it for one would revert beside a running target, a split brain."""
    faults = (
        Fault(FaultKind.MALFORMED, AtCommand("cont", side=Side.TARGET)),
        Fault(FaultKind.DISCONNECT, AtCommand("query-status", nth=2, side=Side.TARGET)),
    )
    run = await run_once(tmp_path, faults, storage=storage)
    assert len(run.fired) == 2, run.explain()
    assert run.result.outcome is Outcome.FINALIZED, run.explain()
    assert run.verdict.ok, run.explain()


@pytest.mark.parametrize("storage", STORAGES)
async def test_a_revert_never_quits_the_only_complete_copy(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: Storage
) -> None:
    """Campaign find (shrunk): after both sides completed, the target refused a command, so
    livemig reverted; the source had died meanwhile, and the revert went on to quit the target,
    which held the only complete copy of the guest. With the source gone for good, the
    target must run the guest instead (the run still ends ``failed``: it did not revert)."""
    # At the target's cont, once both sides completed: the source dies, and cont is refused.
    cont = AtCommand("cont", side=Side.TARGET)
    faults = (Fault(FaultKind.KILL_SOURCE, cont), Fault(FaultKind.QMP_ERROR, cont))
    run = await run_once(tmp_path, faults, storage=storage)
    assert len(run.fired) == 2, run.explain()
    assert run.result.outcome is Outcome.FAILED, run.explain()
    assert run.verdict.ok, run.explain()
    assert run.verdict.survivor == "target"


@pytest.mark.parametrize(
    "where", [AtCommand("quit", side=Side.SOURCE), AtCommand("remove")], ids=lambda w: w.command
)
async def test_a_cancel_after_the_point_of_no_return_finishes_the_migration(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, where: AtCommand
) -> None:
    """Campaign find: the operator's cancel (SIGINT) came while livemig cleaned up after the
    target's ``cont``. The guest ran on the target, but the run ended ``failed`` and left the
    source QEMU and the run's files behind. Past the point of no return, finish."""
    run = await run_once(tmp_path, (Fault(FaultKind.CANCEL, where),))
    assert run.result.outcome is Outcome.FINALIZED, run.explain()
    assert run.verdict.ok, run.explain()
    assert run.verdict.leftovers == ()


async def test_one_error_does_not_fail_an_undo_step(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Campaign find (shrunk): the operator cancelled while RAM streamed, and the revert's first
    ``query-migrate`` got an error reply. The step that
    cancels the migration gave up at once: the migration ran on into pre-switchover and the
    guest stayed paused. Every undo step is safe to run again, so a passing error must not
    decide it."""
    faults = (
        Fault(FaultKind.CANCEL, AtState(State.STATE_TRANSFER)),
        # The first is a precheck; the second, the progress poll the cancel stopped.
        Fault(FaultKind.QMP_ERROR, AtCommand("query-migrate", nth=3, side=Side.SOURCE)),
    )
    run = await run_once(tmp_path, faults)
    assert len(run.fired) == 2, run.explain()
    assert run.result.outcome is Outcome.REVERTED, run.explain()
    assert run.verdict.ok, run.explain()


# -- jobs that end on their own while livemig reverts --------------------------------------------


async def test_a_mirror_already_aborting_is_waited_out_not_cancelled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Campaign find (a migration that never converged, reverting): once the migration is
    cancelled the target exits, the mirror's NBD export goes with it and the mirror aborts on
    its own. The revert then sent ``block-job-cancel`` to a job in ``aborting``, which QEMU
    refuses; the NBD node stayed behind (busy) and the run ended ``failed``. Here the operator
    cancels while RAM streams (the third ``query-migrate``: the first is a precheck, the second
    finds the stream still in setup) and the abort is slow, so the revert always meets it."""
    cancel = Fault(FaultKind.CANCEL, AtCommand("query-migrate", nth=3, side=Side.SOURCE))
    run = await run_once(tmp_path, (cancel,), knobs=Knobs(job_abort_seconds=0.5))
    assert run.result.outcome is Outcome.REVERTED, run.explain()
    assert run.verdict.ok, run.explain()


# -- the overlay file: never removed while the guest writes to it --------------------------------


async def test_a_failed_merge_keeps_the_overlay_file(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Campaign find: a revert whose ``block-commit`` failed (here: refused every time) went on
    to delete the overlay file, although the overlay was still the guest's active layer: every
    write since the snapshot went to an unlinked file, lost when QEMU closes it. The file must
    stay (the run ends ``failed`` and says so) until the overlay node is gone."""
    commit_refused = [
        Fault(FaultKind.QMP_ERROR, AtCommand("block-commit", nth=n)) for n in range(1, 9)
    ]
    run = await run_once(
        tmp_path, (Fault(FaultKind.QMP_ERROR, AtState(State.SNAPSHOTTED)), *commit_refused)
    )
    assert run.result.outcome is Outcome.FAILED, run.explain()
    assert run.verdict.ok, run.explain()
    assert any("overlay" in f and "still" in f for f in run.result.undo_failures), run.explain()


# -- after both sides said "completed", the target holds the only whole guest --------------------


async def _calls_in_clean_run(tmp_path: Path, storage: Storage, command: str) -> int:
    """How many times a clean migration sends ``command`` to the source."""
    tmp_path.mkdir()
    async with fake_world(tmp_path, storage=storage) as world:
        run = await migrate_with_faults(world)
    assert run.result.outcome is Outcome.FINALIZED
    return [c.name for c in world.source.log].count(command)


@pytest.mark.parametrize("storage", STORAGES)
async def test_a_source_dying_after_completion_rolls_forward(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: Storage
) -> None:
    """Campaign find: the source died just after both sides reported ``completed``, as livemig
    read the migration's statistics from it. livemig reverted, and the revert quit the target:
    the one QEMU holding the whole guest. Once completed, the statistics are optional and going
    on is always at least as safe as going back."""
    with trio.fail_after(GUARD):
        last = await _calls_in_clean_run(tmp_path / "clean", storage, "query-migrate")
        kill = Fault(FaultKind.KILL_SOURCE, AtCommand("query-migrate", nth=last, side=Side.SOURCE))
        run = await run_once(tmp_path / "faulty", (kill,), storage=storage)
    assert run.fired, run.explain()
    assert run.result.outcome is Outcome.FINALIZED, run.explain()
    assert run.verdict.ok, run.explain()


# -- leftovers that make the next migration collide ----------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault(FaultKind.CUT_NBD, AtState(State.MIRRORING)),  # the mirror fails mid-way
        Fault(FaultKind.QMP_ERROR, AtCommand("blockdev-mirror")),  # it never starts
        Fault(FaultKind.KILL_TARGET, AtState(State.SNAPSHOTTED)),  # its target dies
    ],
    ids=lambda f: f.describe(),
)
async def test_a_failed_mirror_leaves_nothing_for_the_next_migration(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, fault: Fault
) -> None:
    """Field bug: an overlay or NBD node left behind by a failed mirror made ``block-commit``
    fail and the next migration collide on node names. Two migrations back to back on the same
    QEMUs, even under the same run id (so unique names cannot hide a leftover): the first
    fails and reverts, the second, to a fresh target, finalizes."""
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path) as world:
            first = await migrate_with_faults(world, (fault,))
            assert first.result.outcome is Outcome.REVERTED, first.explain()
            assert first.verdict.ok, first.explain()
            world.new_target()
            world.nbd_cut = False  # and the link mended
            second = await migrate_with_faults(world)
    assert second.result.outcome is Outcome.FINALIZED, second.explain()
    assert second.verdict.ok, second.explain()


# -- concluded jobs never dismissed ---------------------------------------------------------------


@pytest.mark.parametrize(
    "faults",
    [
        (),  # the mirror completes (soft cancel at pre-switchover)
        (Fault(FaultKind.CUT_NBD, AtState(State.MIRRORING)),),  # it fails with an I/O error
        (Fault(FaultKind.CANCEL, AtState(State.STATE_TRANSFER)),),  # it is cancelled
        (Fault(FaultKind.HANG, AtCommand("job-complete")),),  # the commit is left ready
    ],
    ids=["completed", "failed", "cancelled", "commit-left-ready"],
)
async def test_no_job_outlives_the_migration(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, faults: tuple[Fault, ...]
) -> None:
    """Field bug: concluded jobs were never dismissed and piled up. However livemig's jobs end
    (completed, failed, cancelled, or the revert's commit itself disturbed), none is left on
    the surviving QEMU once the migration is over — or the result says so."""
    run = await run_once(tmp_path, faults)
    assert run.verdict.ok, run.explain()
    left = [p for p in run.verdict.leftovers if "block jobs" in p]
    assert not left or run.result.undo_failures, run.explain()


async def test_a_job_left_by_someone_else_stops_livemig_before_it_touches_anything(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The other side of that bug: a concluded job nobody dismissed is found by the prechecks,
    and livemig touches nothing."""
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path) as world:
            root = world.source.nodes["root"]
            world.source.jobs["old"] = Job("old", "mirror", JobStatus.CONCLUDED, root, root)
            run = await migrate_with_faults(world)
            touched = [c.name for c in world.source.log if not reads_only(c.name)]
    assert run.result.error_type == "PrecheckError", run.explain()
    # Bad input before anything was touched is refused: no revert, no terminal state.
    assert run.result.outcome is Outcome.REFUSED
    assert run.result.states == ("idle",)
    assert touched == []


# -- split brain: two QEMUs running the guest ------------------------------------------------------

SWITCHOVER_POINTS = [
    AtCommand("migrate-continue", side=Side.SOURCE),
    AtCommand("nbd-server-stop", side=Side.TARGET),
    AtCommand("cont", side=Side.TARGET),
    AtCommand("quit", side=Side.SOURCE),
]


@pytest.mark.parametrize(
    ("storage", "where", "kind"),
    [
        pytest.param(storage, where, kind, id=f"{storage}-{kind.value}-{where.describe()}")
        for storage in STORAGES
        for where in SWITCHOVER_POINTS
        for kind in FaultKind
        if kind is not FaultKind.DISK_FULL
        and not (storage == "shared" and where.command == "nbd-server-stop")
    ],
)
async def test_no_fault_at_the_switchover_leaves_two_guests_running(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    storage: Storage,
    where: AtCommand,
    kind: FaultKind,
) -> None:
    """Field bug: after a failure the target was left running beside a resumed source (split
    brain, the disk written by two guests). Every fault, at every step of the switchover: at
    most one QEMU runs the guest, the right one, with every write."""
    run = await run_once(tmp_path, (Fault(kind, where),), storage=storage)
    assert run.fired, run.explain()
    assert run.verdict.ok, run.explain()


# -- migrations that never converge --------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
async def test_a_migration_that_never_converges_is_cancelled_and_reverted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: Storage
) -> None:
    """Field bug: migrations that never converged ran forever (no stall detection, no deadline,
    and LXD never sends ``migrate_cancel``). With livemig's default deadlines it gives up by
    the RAM phase's deadline at the latest, cancels the migration and the guest runs on."""
    deadlines = Deadlines()
    ram_phase = deadlines.ram_phase(512 * 2**20)  # the fake guest's RAM
    tmp_path.mkdir(exist_ok=True)
    with trio.fail_after(ram_phase * 2):
        async with fake_world(tmp_path, storage=storage, knobs=Knobs(converge_after=None)) as world:
            run = await migrate_with_faults(world, deadlines=deadlines)
            sent = [c.name for c in world.source.log]
    assert run.result.outcome is Outcome.REVERTED, run.explain()
    assert run.result.failed_in == "state-transfer"
    assert "migrate_cancel" in sent
    assert run.verdict.ok, run.explain()
    in_transfer = dict(run.result.phases_ms)["state-transfer"] / 1000
    assert in_transfer <= ram_phase + deadlines.undo_step


# -- gaps in code the lead owns: strict xfails until fixed there ---------------------------------


async def test_a_recovery_whose_merge_fails_keeps_the_overlay_file(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """livemig crashed while mirroring; ``livemig recover`` reverts, but its ``block-commit``
    fails every time it is tried. Removing the run's files then would take the overlay the
    guest still writes to: every write since the snapshot would be lost when QEMU closes it.
    Recovery must end ``failed`` and keep the file (and the journal)."""
    refusals = tuple(
        Fault(FaultKind.QMP_ERROR, AtCommand("block-commit", nth)) for nth in range(1, 9)
    )
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path) as world:
            run = await migrate_with_faults(
                world,
                (Fault(FaultKind.CRASH, AtState(State.MIRRORING)),),
                recovery_faults=refusals,
            )
    assert run.recovered
    assert run.result.outcome is Outcome.FAILED, run.explain()
    assert run.verdict.ok, run.explain()


@pytest.mark.parametrize("storage", STORAGES)
async def test_a_source_that_dies_during_the_prechecks_is_reported(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, storage: Storage
) -> None:
    """The source QEMU dies while livemig runs its prechecks. Nothing was touched, so the undo
    stack is empty and the run ends ``reverted`` (exit 3, "the guest is safe on the source")
    although livemig saw the source gone. It must end ``failed``."""
    run = await run_once(
        tmp_path, (Fault(FaultKind.KILL_SOURCE, AtState(State.IDLE)),), storage=storage
    )
    assert run.result.outcome is Outcome.FAILED, run.explain()
    assert run.verdict.ok, run.explain()


async def test_one_failed_question_does_not_crash_the_recovery(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Exploration find: livemig crashed, and the first ``query-status`` of ``livemig
    recover`` got an error reply. The error escaped ``recover()``: the recovery itself died
    instead of asking again or reporting."""
    with trio.fail_after(GUARD):
        async with fake_world(tmp_path) as world:
            run = await migrate_with_faults(
                world,
                (Fault(FaultKind.CRASH, AtState(State.CONNECTED)),),
                recovery_faults=(Fault(FaultKind.QMP_ERROR, AtCommand("query-status")),),
            )
    assert run.recovered
    assert run.verdict.ok, run.explain()
