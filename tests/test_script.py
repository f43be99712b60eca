"""The forward scripts driven by hand: no QEMU, no engine, no trio, no clock.

Each test plays the engine: it answers every effect a script yields (or throws a fault into it)
and reads back the exact sequence of effects — which commands go to which QEMU, in which order,
and which undo step is pushed before the thing it undoes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from support.views import DST, SRC, view

from livemig.drivers import jobs, migration
from livemig.drivers.jobs import BlockJobInfo
from livemig.drivers.migration import MigrationStats, RamStats
from livemig.drivers.status import JobStatus, MigrationStatus
from livemig.fsm import engine, script
from livemig.fsm.effects import (
    AskRuns,
    AwaitJob,
    AwaitMigration,
    Call,
    ClearUndo,
    Clock,
    CloseWindow,
    DropUndo,
    Effect,
    Emit,
    Gather,
    JobGone,
    Listen,
    Mark,
    MigrationEvent,
    Observe,
    OnHost,
    OpenWindow,
    PushUndo,
    Script,
    Shielded,
    Sleep,
    Spawn,
    WriteJournal,
    call,
)
from livemig.fsm.events import Progress
from livemig.fsm.machine import State
from livemig.fsm.observations import OverlayActive, TargetResumed
from livemig.fsm.plan import Plan
from livemig.fsm.prechecks import Disk, Verdict
from livemig.fsm.script import Context
from livemig.fsm.undo import Side
from livemig.transports.endpoints import TcpEndpoint
from livemig.transports.errors import (
    CommandFailed,
    ConnectionLost,
    PrecheckError,
    StepFailed,
)

Answer = Callable[[Effect], Any]


def plan(storage: str = "non-shared", *, stop_source: bool = True) -> Plan:
    p = Plan.create(
        source_qmp="/s.qmp",
        target_qmp="/t.qmp",
        storage=storage,
        work_dir=Path("/w"),
        run_id="r1",
    )
    return attrs.evolve(p, policy=attrs.evolve(p.policy, stop_source=stop_source))


def context(storage: str = "non-shared", state: State = State.IDLE, **kw: Any) -> Context:
    ctx = Context(plan(storage, **kw), state=state)
    copied = ctx.plan.storage != "shared"
    ctx.verdict = Verdict(
        (
            Disk(
                name="vda",
                source_node="root",
                target_node="root-t",
                copied=copied,
                base_image=("/src.raw", "raw"),
                base_size=64 << 20,
                target_image="/dst.raw" if copied else "/src.raw",
                base_allocated=1 << 20,
                target_allocated=0,
                names=ctx.plan.names(0) if copied else None,
            ),
        )
    )
    return ctx


def ready_mirror(ctx: Context, **changes: Any) -> BlockJobInfo:
    job = BlockJobInfo(
        device=ctx.plan.mirror_job,
        type="mirror",
        status=JobStatus.READY,
        ready=True,
        offset=4096,
        len=4096,
        busy=False,
        paused=False,
        speed=0,
        error=None,
    )
    return attrs.evolve(job, **changes)


def answers(replies: Mapping[str, Any] | None = None) -> Answer:
    """The engine's part: a driver call gets ``replies[name]`` (a callable is called, an error
    raised), every other effect what the engine would send back in a quiet run."""
    table = dict(replies or {})

    def answer(effect: Effect) -> Any:
        match effect:
            case Call():
                reply = table.get(effect.name)
                if isinstance(reply, BaseException):
                    raise reply
                return reply() if callable(reply) else reply
            case Gather(calls=calls):
                return tuple(answer(c) for c in calls)
            case AwaitMigration(until=until):
                # A quiet run: the status a migration goes on to (completed, of several).
                (status,) = until & {MigrationStatus.COMPLETED} or until
                return MigrationEvent(status, 0.0)
            case AwaitJob(until="gone", jobs=job_ids):
                return tuple(JobGone(completed=True, offset=4096) for _ in job_ids)
            case AwaitJob(until="ready", jobs=job_ids):
                return tuple(None for _ in job_ids)
            case AskRuns():
                return True
            case Shielded(effect=inner):
                return answer(inner)
            case Clock():
                return 100.0
        return None

    return answer


def drive(body: Script, answer: Answer, seen: list[Effect] | None = None) -> list[Effect]:
    """Run ``body`` to its end as the engine would; every effect it yields goes to ``seen``."""
    seen = [] if seen is None else seen
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = body.send(reply) if error is None else body.throw(error)
        except StopIteration:
            return seen
        seen.append(effect)
        try:
            reply, error = answer(effect), None
        except BaseException as err:
            reply, error = None, err


def words(effects: list[Effect]) -> list[str]:
    """Each effect in a word or two, so a sequence reads (and diffs) as a list."""
    out = []
    for e in effects:
        match e:
            case Call(side=side):
                out.append(f"{side}:{e.name}")
            case Gather(calls=calls):
                out.append("gather:" + ",".join(f"{c.side}:{c.name}" for c in calls))
            case OnHost(op=op):
                out.append(f"host:{op}")
            case PushUndo(steps=steps):
                out.append("push:" + ",".join(f"{s.kind}/{s.side}" for s in steps))
            case DropUndo(kind=kind, side=side):
                out.append(f"drop:{kind}/{side}")
            case Observe(observation=o):
                out.append(f"observe:{type(o).__name__}")
            case Listen(side=side, stream=stream):
                out.append(f"listen:{side}:{stream}")
            case AwaitJob(side=side, until=until, look_first=look):
                out.append(f"await-job:{side}:{until}" + ("" if look else ":no-look"))
            case AwaitMigration(side=side, until=until):
                out.append(f"await-migration:{side}:" + ",".join(sorted(until)))
            case AskRuns(side=side):
                out.append(f"ask-runs:{side}")
            case Shielded(effect=inner):
                out.append("shielded:" + words([inner])[0])
            case _:
                out.append(type(e).__name__.lower())
    return out


def test_the_core_imports_no_io() -> None:
    """The scripts, their effects and the table import neither trio, asyncio, qemu.qmp nor
    transitions: the decisions can be read and run without an event loop."""
    code = (
        "import sys\n"
        "import livemig.fsm.script, livemig.fsm.effects, livemig.fsm.machine\n"
        "print(sorted(m for m in ('trio', 'asyncio', 'qemu', 'trio_asyncio', 'transitions')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_connect_reads_both_qemus_at_once_and_pushes_only_once_the_prechecks_pass() -> None:
    ctx = context()
    view_of = {Side.SOURCE: SRC, Side.TARGET: DST}

    def answer(effect: Effect) -> Any:
        assert isinstance(effect, Gather | Observe | PushUndo)
        if isinstance(effect, Gather):
            fields = [f.name for f in attrs.fields(type(SRC))]
            per_side = [c for c in effect.calls if c.side is Side.SOURCE]
            assert len(per_side) == len(fields)
            return tuple(
                getattr(view_of[c.side], fields[i % len(fields)])
                for i, c in enumerate(effect.calls)
            )
        return None

    effects = drive(script.connect(ctx), answer)
    queries = [
        "query_status",
        "query_memory_size_summary",
        "query_version",
        "query_machine",
        "query_migrate",
        "query_jobs",
        "query_named_block_nodes",
        "query_block",
        "query_capabilities",
        "query_devices",
        "query_parameters",
    ]
    gather = ",".join([f"source:{q}" for q in queries] + [f"target:{q}" for q in queries])
    assert words(effects) == [
        f"gather:{gather}",
        "observe:PrechecksPassed",
        "push:resume-guest/source,quit/target",
    ]
    assert [d.source_node for d in ctx.disks()] == ["root"]
    assert ctx.guest_ram == SRC.ram_bytes


def test_a_failed_precheck_leaves_nothing_to_undo() -> None:
    running_target = view("/dst.raw")  # a target that already runs a guest

    def answer(effect: Effect) -> Any:
        assert isinstance(effect, Gather)
        fields = [f.name for f in attrs.fields(type(SRC))]
        sides = {Side.SOURCE: SRC, Side.TARGET: running_target}
        return tuple(
            getattr(sides[c.side], fields[i % len(fields)]) for i, c in enumerate(effect.calls)
        )

    seen: list[Effect] = []
    with pytest.raises(PrecheckError):
        drive(script.connect(context()), answer, seen)
    assert [type(e) for e in seen] == [Gather]


def test_capabilities_push_the_sources_old_values_then_set_both_sides_at_once() -> None:
    ctx = context(state=State.CONNECTED)
    caps = {"events": False, "pause-before-switchover": False, "postcopy-ram": False}
    ctx.offered = {Side.SOURCE: caps, Side.TARGET: caps}
    effects = drive(
        script.set_capabilities(ctx),
        answers({"query_parameters": {"downtime-limit": 300}}),
    )
    assert words(effects) == [
        "gather:source:query_parameters,target:query_parameters",
        "push:restore-capabilities/source,restore-parameters/source",
        "gather:target:set_capabilities,source:set_capabilities,source:set_parameters",
        "observe:CapabilitiesSet",
    ]
    push = effects[1]
    assert isinstance(push, PushUndo)
    restore, params = push.steps
    assert restore.args["capabilities"]["events"] is False
    assert params.args["parameters"] == {"downtime-limit": 300}
    sets = effects[2]
    assert isinstance(sets, Gather)
    assert sets.calls[0].args[0]["events"] is True  # the target's, chosen from what it offers
    assert ctx.convergence is not None


def test_capabilities_come_from_what_each_side_offered_at_connect() -> None:
    ctx = context(state=State.CONNECTED)
    ctx.offered = {
        Side.SOURCE: {"events": False, "pause-before-switchover": False, "postcopy-ram": False},
        Side.TARGET: {"events": False, "pause-before-switchover": False},
    }
    effects = drive(script.set_capabilities(ctx), answers({"query_parameters": {}}))
    sets = effects[2]
    assert isinstance(sets, Gather)
    target_caps, source_caps = sets.calls[0].args[0], sets.calls[1].args[0]
    assert "postcopy-ram" not in target_caps  # never asked of a side that did not offer it
    assert source_caps["pause-before-switchover"] is True


def test_snapshot_pushes_each_undo_before_what_it_undoes() -> None:
    ctx = context(state=State.CAPABILITIES_SET)
    effects = drive(script.snapshot(ctx), answers())
    assert words(effects) == [
        "host:make_dir",
        "push:delete-file/source,delete-node/source,merge-overlay/source",
        "host:create_image",
        "source:blockdev_add",
        "source:blockdev_snapshot",
        "observe:OverlayActive",
    ]
    snap = effects[4]
    assert isinstance(snap, Call)
    assert snap.kwargs == {"node": "root", "overlay": ctx.plan.overlay_node}


def test_mirror_exports_copies_then_listens_before_it_starts_the_mirror() -> None:
    ctx = context(state=State.SNAPSHOTTED)
    effects = drive(script.mirror(ctx), answers())
    assert words(effects) == [
        "push:delete-file/target,stop-nbd-server/target,delete-export/target,"
        "delete-node/source,cancel-job/source",
        "target:nbd_server_start",
        "target:block_export_add",
        "host:copy_to_nbd",
        "listen:source:jobs",
        "source:blockdev_add",
        "source:blockdev_mirror",
        "spawn",
        "await-job:source:ready",
        "observe:MirrorReady",
    ]
    copy = effects[3]
    assert isinstance(copy, OnHost)
    assert copy.kwargs == {"target_is_zero": True}  # the target's image was unallocated
    assert ctx.disk_bytes == 1 << 20
    export = effects[2]
    assert isinstance(export, Call)
    assert export.kwargs["node_name"] == "root-t"


def test_the_mirror_reporter_emits_disk_progress() -> None:
    ctx = context(state=State.SNAPSHOTTED)
    spawned = next(e for e in drive(script.mirror(ctx), answers()) if isinstance(e, Spawn)).script()
    assert next(spawned) == call(Side.SOURCE, jobs.query_block_jobs)
    emitted = spawned.send((ready_mirror(ctx, offset=10, len=40),))
    assert isinstance(emitted, Emit)
    assert isinstance(emitted.event, Progress)
    assert (emitted.event.disk_done, emitted.event.disk_total) == (10, 40)
    assert isinstance(spawned.send(None), Sleep)


def test_transfer_listens_on_both_sides_before_either_command() -> None:
    effects = drive(script.transfer_state(context(state=State.MIRRORING)), answers())
    assert words(effects) == [
        "listen:target:migration",
        "listen:source:migration",
        "push:delete-file/target,cancel-migration/source",
        "target:migrate_incoming",
        "source:migrate",
        "observe:MigrationStatusChanged",
    ]


def test_the_pause_opens_the_window_when_qemu_emitted_it() -> None:
    effects = drive(
        script.await_switchover(context(state=State.STATE_TRANSFER)),
        lambda e: (
            MigrationEvent(MigrationStatus.PRE_SWITCHOVER, 1234.5)
            if isinstance(e, AwaitMigration)
            else None
        ),
    )
    assert effects[1] == OpenWindow(1234.5)


def test_the_precopy_switchover_sends_only_what_must_happen_in_the_window() -> None:
    ctx = context(state=State.PRE_SWITCHOVER)
    effects = drive(script.switch_over(ctx), answers({"query_block_jobs": (ready_mirror(ctx),)}))
    assert words(effects) == [
        # No look at the mirror first: how its cancel ends tells whether the copy is consistent.
        "listen:source:jobs",
        "source:block_job_cancel",
        "await-job:source:gone:no-look",
        "mark",
        "drop:cancel-job/source",
        # The NBD server stops at once with the continue, before the target may run.
        "gather:source:migrate_continue,target:nbd_server_stop",
        "drop:delete-export/target",
        "drop:stop-nbd-server/target",
        "await-migration:target:completed",
        "mark",
        "observe:MigrationStatusChanged",
        "target:cont",
        "observe:TargetResumed",
        "drop:quit/target",
        "closewindow",
    ]
    assert ctx.disk_bytes == 4096


def test_the_shared_switchover_has_no_mirror_and_no_nbd() -> None:
    effects = drive(script.switch_over(context("shared", State.PRE_SWITCHOVER)), answers())
    assert words(effects) == [
        "source:migrate_continue",
        "await-migration:target:completed",
        "mark",
        "observe:MigrationStatusChanged",
        "target:cont",
        "observe:TargetResumed",
        "drop:quit/target",
        "closewindow",
    ]


def test_a_mirror_no_longer_in_sync_fails_the_switchover_before_the_continue() -> None:
    """A mirror that was no longer READY is cancelled (not completed) by the soft cancel: the
    target's copy is not consistent, and the source must not go on."""
    ctx = context(state=State.PRE_SWITCHOVER)
    base = answers()

    def answer(effect: Effect) -> Any:
        if isinstance(effect, AwaitJob):
            return (JobGone(completed=False, offset=10),)
        return base(effect)

    seen: list[Effect] = []
    with pytest.raises(StepFailed, match="no longer in sync"):
        drive(script.switch_over(ctx), answer, seen)
    assert words(seen) == [
        "listen:source:jobs",
        "source:block_job_cancel",
        "await-job:source:gone:no-look",
    ]


@pytest.mark.parametrize(
    ("runs", "goes_on", "resumed"),
    [(False, False, False), (None, False, True), (True, True, True)],
    ids=["target-paused", "cannot-tell", "target-runs"],
)
def test_a_lost_cont_reply_asks_the_target_before_deciding(
    runs: bool | None, goes_on: bool, resumed: bool
) -> None:
    ctx = context("shared", State.PRE_SWITCHOVER)
    base = answers({"cont": ConnectionLost("dropped", monitor="target")})

    def answer(effect: Effect) -> Any:
        return runs if isinstance(effect, AskRuns) else base(effect)

    seen: list[Effect] = []
    if goes_on:
        drive(script.switch_over(ctx), answer, seen)
    else:
        with pytest.raises(ConnectionLost):
            drive(script.switch_over(ctx), answer, seen)
    after_cont = words(seen)[words(seen).index("target:cont") + 1 :]
    assert after_cont[0] == "ask-runs:target"
    assert (Observe(TargetResumed()) in seen) is resumed
    assert seen.count(Observe(TargetResumed())) <= 1
    assert ("drop:quit/target" in after_cont) is goes_on


def test_a_refused_cont_reverts_without_asking() -> None:
    refused = CommandFailed(
        monitor="target", command="cont", arguments=None, error_class="GenericError", desc="no"
    )
    seen: list[Effect] = []
    with pytest.raises(CommandFailed):
        drive(
            script.switch_over(context("shared", State.PRE_SWITCHOVER)),
            answers({"cont": refused}),
            seen,
        )
    assert words(seen)[-1] == "target:cont"  # raised at once: no asking, nothing observed


def test_finalize_keeps_the_source_when_the_target_no_longer_runs() -> None:
    ctx = context(state=State.SWITCHED_OVER)
    base = answers({"query_migrate": MigrationStats(MigrationStatus.COMPLETED, downtime_ms=42)})
    seen: list[Effect] = []
    with pytest.raises(StepFailed, match="source QEMU is kept"):
        drive(
            script.finalize(ctx),
            lambda e: False if isinstance(e, AskRuns) else base(e),
            seen,
        )
    assert "source:quit" not in " ".join(words(seen))
    assert ctx.downtime_ms == 42


def test_finalize_cleans_up_shielded_and_a_failed_step_is_a_warning() -> None:
    ctx = context(state=State.SWITCHED_OVER)
    stats = MigrationStats(
        MigrationStatus.COMPLETED, downtime_ms=42, ram=RamStats(transferred=7, remaining=0, total=7)
    )
    effects = drive(
        script.finalize(ctx),
        answers({"query_migrate": stats, "quit": ConnectionLost("gone", monitor="source")}),
    )
    assert words(effects) == [
        "await-migration:source:completed",
        "source:query_migrate",
        "ask-runs:target",
        "shielded:source:quit",
        *["shielded:host:remove"] * len(ctx.run_files()),
        "clearundo",
        "observe:SourceReleased",
    ]
    assert (ctx.downtime_ms, ctx.ram_bytes) == (42, 7)
    assert any("could not quit the source" in w for w in ctx.warnings)


def test_finalize_from_postcopy_waits_for_both_sides() -> None:
    ctx = context("shared", State.POSTCOPY, stop_source=False)
    effects = drive(
        script.finalize(ctx),
        answers({"query_migrate": MigrationStats(MigrationStatus.COMPLETED)}),
    )
    assert words(effects)[:4] == [
        "await-migration:source:completed,postcopy-paused",
        "await-migration:target:completed",
        "observe:MigrationStatusChanged",
        "source:query_migrate",
    ]
    assert "shielded:source:quit" not in words(effects)


def _stats(status: MigrationStatus, remaining: int | None = None) -> MigrationStats:
    ram = RamStats(transferred=0, remaining=remaining, total=0) if remaining is not None else None
    return MigrationStats(status, ram=ram)


def test_a_paused_postcopy_is_resumed_target_first() -> None:
    """The link broke in post-copy: the target is told to see it (migrate-pause), to listen
    again (migrate-recover) and the source to reconnect (migrate resume) — the target is never
    asked anything (its main loop may wait on a page); once both complete, the run goes on."""
    ctx = context("shared", State.POSTCOPY, stop_source=False)
    ctx.plan = attrs.evolve(ctx.plan, migrate_uri=TcpEndpoint("10.0.0.2", 4001))
    pauses = iter(
        [
            ConnectionLost("ssh is down", monitor="target"),  # the link is still down
            CommandFailed(  # back, and it had seen the break
                monitor="target",
                command="migrate-pause",
                arguments=None,
                error_class="GenericError",
                desc="not in postcopy-active",
            ),
        ]
    )
    source = iter(
        [
            _stats(MigrationStatus.POSTCOPY_PAUSED),
            _stats(MigrationStatus.POSTCOPY_ACTIVE),
            _stats(MigrationStatus.COMPLETED),  # the statistics, afterwards
        ]
    )
    paused = iter([MigrationStatus.POSTCOPY_PAUSED, MigrationStatus.COMPLETED])
    quiet = answers()

    def answer(effect: Effect) -> Any:
        if isinstance(effect, Call) and effect.name == "migrate_pause":
            raise next(pauses)
        if isinstance(effect, Call) and effect.name == "query_migrate":
            if effect.side is Side.TARGET:
                return _stats(MigrationStatus.COMPLETED)
            return next(source)
        if isinstance(effect, AwaitMigration) and effect.side is Side.SOURCE:
            return MigrationEvent(next(paused), 0.0)
        return quiet(effect)

    effects = drive(script.finalize(ctx), answer)
    said = [w for w in words(effects) if w not in ("clock", "sleep")]
    start = said.index("await-migration:source:completed,postcopy-paused")
    assert said[start : start + 13] == [
        "await-migration:source:completed,postcopy-paused",
        "emit",  # paused
        "target:migrate_pause",  # ConnectionLost: tried again
        "source:query_migrate",
        "target:migrate_pause",  # CommandFailed: it is paused already
        "target:migrate_recover",
        "source:migrate_resume",
        "source:query_migrate",
        "emit",  # resumed
        "await-migration:source:completed,postcopy-paused",
        "target:query_migrate",  # polled: its event stream may be gone
        "observe:MigrationStatusChanged",
        "source:query_migrate",
    ]
    resume = next(e for e in effects if isinstance(e, Call) and e.name == "migrate_resume")
    assert resume.args == ("tcp:10.0.0.2:4001",)
    # Until the source resumed, the target was told, never asked.
    before = effects[
        : next(i for i, e in enumerate(effects) if getattr(e, "name", "") == "migrate_resume")
    ]
    assert not [
        e
        for e in before
        if isinstance(e, Call) and e.side is Side.TARGET and e.name == "query_migrate"
    ]


def test_a_postcopy_not_resumed_in_time_fails_saying_where_the_guest_is() -> None:
    ctx = context("shared", State.POSTCOPY, stop_source=False)
    ctx.plan = attrs.evolve(
        ctx.plan, deadlines=attrs.evolve(ctx.plan.deadlines, postcopy_recover=5.0)
    )
    clock = iter(float(t) for t in range(100))
    quiet = answers()

    def answer(effect: Effect) -> Any:
        if isinstance(effect, Clock):
            return next(clock)
        if isinstance(effect, Call) and effect.name == "query_migrate":
            return _stats(MigrationStatus.POSTCOPY_PAUSED, remaining=300 << 20)
        if isinstance(effect, Call) and effect.side is Side.TARGET:
            raise ConnectionLost("ssh is down", monitor="target")
        if isinstance(effect, AwaitMigration) and effect.side is Side.SOURCE:
            return MigrationEvent(MigrationStatus.POSTCOPY_PAUSED, 0.0)
        return quiet(effect)

    with pytest.raises(StepFailed) as failed:
        drive(script.finalize(ctx), answer)
    message = str(failed.value)
    assert "not resumed in 5 s" in message
    assert "300.0 MiB not yet sent" in message
    assert "Both are kept" in message
    assert "migrate-recover unix:/w/lm-r1-ram.sock" in message


def test_postcopy_journals_before_the_point_of_no_return() -> None:
    effects = drive(script.switch_over_postcopy(context("shared", State.PRE_SWITCHOVER)), answers())
    said = words(effects)
    assert said[:3] == ["observe:PostcopyCommitted", "writejournal", "source:migrate_continue"]
    assert isinstance(effects[1], WriteJournal)
    assert said.index("await-migration:target:postcopy-active") < said.index("target:cont")


def test_steering_reports_each_poll_and_sleeps_on_the_engines_clock() -> None:
    ctx = context(state=State.STATE_TRANSFER)
    ctx.convergence = None
    steer = script.steer(ctx)
    assert next(steer) == call(Side.SOURCE, migration.query_migrate)
    stats = MigrationStats(
        MigrationStatus.ACTIVE, ram=RamStats(transferred=5, remaining=3, total=8)
    )
    emitted = steer.send(stats)
    assert isinstance(emitted, Emit)
    assert isinstance(emitted.event, Progress)
    assert emitted.event.ram_remaining == 3
    assert emitted.event.state == "state-transfer"
    assert isinstance(steer.send(None), Clock)
    assert steer.send(100.0) == Sleep(min(ctx.plan.policy.progress_interval, 0.5))


def test_every_effect_kind_is_performed_by_the_engine() -> None:
    """The engine's ``match`` has a case for every effect kind (a kind added to the effects
    without a case would be silently ignored)."""
    import inspect

    source = inspect.getsource(engine._perform)
    for kind in (
        Call, Gather, OnHost, PushUndo, DropUndo, ClearUndo, Observe, Listen, AwaitJob,
        AwaitMigration, AskRuns, Shielded, Spawn, Emit, Clock, Sleep, Mark, OpenWindow,
        CloseWindow, WriteJournal,
    ):  # fmt: skip
        assert f"case {kind.__name__}(" in source, kind.__name__


async def test_a_gather_raises_the_first_failure_in_its_own_order() -> None:
    """Whichever reply comes first, the error raised is the first failed call's in ``calls``
    order: a run does not depend on timing."""

    class Slow:
        name = "source"

        async def execute(self, *_: object) -> Any:
            await trio.sleep(0.01)
            raise ConnectionLost("slow failure", monitor="source")

    class Fast:
        name = "target"

        async def execute(self, *_: object) -> Any:
            raise ConnectionLost("fast failure", monitor="target")

    class _Session:
        def monitor(self, side: Side) -> Any:
            return Slow() if side is Side.SOURCE else Fast()

    async def op(monitor: Any) -> Any:
        return await monitor.execute()

    gather = (call(Side.SOURCE, op), call(Side.TARGET, op))
    with pytest.raises(ConnectionLost, match="slow failure"):
        await engine._gather(_Session(), gather)  # type: ignore[arg-type]


async def test_a_gather_stops_a_side_at_its_first_failure_and_lets_the_other_finish() -> None:
    sent: list[str] = []

    class Monitor:
        def __init__(self, name: str) -> None:
            self.name = name

        async def execute(self, command: str) -> Any:
            sent.append(f"{self.name}:{command}")
            if command == "fails":
                raise ConnectionLost("refused", monitor=self.name)
            return command

    class _Session:
        def monitor(self, side: Side) -> Any:
            return Monitor(side.value)

    async def op(monitor: Any, command: str) -> Any:
        return await monitor.execute(command)

    gather = (
        call(Side.SOURCE, op, "fails"),
        call(Side.SOURCE, op, "after"),
        call(Side.TARGET, op, "one"),
        call(Side.TARGET, op, "two"),
    )
    with pytest.raises(ConnectionLost, match="refused"):
        await engine._gather(_Session(), gather)  # type: ignore[arg-type]
    assert sorted(sent) == ["source:fails", "target:one", "target:two"]


def two_disk_context(state: State) -> Context:
    """Two copied disks (a root and a data disk) and a shared one, as the prechecks decided."""
    ctx = context(state=state)
    assert ctx.verdict is not None
    (root,) = ctx.verdict.disks
    data = attrs.evolve(
        root, name="vdb", source_node="data", target_node="data-t", names=ctx.plan.names(1)
    )
    shared = attrs.evolve(root, name="vdc", source_node="db", copied=False, names=None)
    ctx.verdict = Verdict((root, data, shared))
    return ctx


def test_every_copied_disk_gets_its_overlay_in_one_transaction() -> None:
    ctx = two_disk_context(State.CAPABILITIES_SET)
    effects = drive(script.snapshot(ctx), answers())
    assert words(effects) == [
        "host:make_dir",
        "push:" + ",".join(["delete-file/source,delete-node/source,merge-overlay/source"] * 2),
        "host:create_image",
        "source:blockdev_add",
        "host:create_image",
        "source:blockdev_add",
        "source:snapshot_all",
        "observe:OverlayActive",
    ]
    snap = effects[6]
    assert isinstance(snap, Call)
    assert snap.args == ([("root", "lm-r1-d0-overlay"), ("data", "lm-r1-d1-overlay")],)
    observed = effects[7]
    assert isinstance(observed, Observe)
    assert observed.observation == OverlayActive(("lm-r1-d0-overlay", "lm-r1-d1-overlay"))


def test_every_copied_disk_is_exported_copied_and_mirrored_and_all_must_get_ready() -> None:
    ctx = two_disk_context(State.SNAPSHOTTED)
    effects = drive(script.mirror(ctx), answers())
    assert words(effects) == [
        "push:delete-file/target,stop-nbd-server/target,"
        + ",".join(["delete-export/target,delete-node/source,cancel-job/source"] * 2),
        "target:nbd_server_start",
        "target:block_export_add",
        "target:block_export_add",
        "onhostall",
        "listen:source:jobs",
        "source:blockdev_add",
        "source:blockdev_mirror",
        "source:blockdev_add",
        "source:blockdev_mirror",
        "spawn",
        "await-job:source:ready",
        "observe:MirrorReady",
    ]
    exports = [
        e.kwargs["node_name"] for e in effects if isinstance(e, Call) and e.kwargs.get("node_name")
    ]
    assert exports == ["root-t", "data-t"]
    (wait,) = [e for e in effects if isinstance(e, AwaitJob)]
    assert wait.jobs == ("lm-r1-d0-mirror", "lm-r1-d1-mirror")
    assert ctx.disk_bytes == 2 << 20  # each base's allocated bytes


def test_the_switchover_cancels_every_mirror_at_once_and_fails_on_any_out_of_sync() -> None:
    ctx = two_disk_context(State.PRE_SWITCHOVER)
    effects = drive(script.switch_over(ctx), answers())
    assert words(effects)[:3] == [
        "listen:source:jobs",
        "gather:source:block_job_cancel,source:block_job_cancel",
        "await-job:source:gone:no-look",
    ]
    assert ctx.disk_bytes == 2 * 4096
    base = answers()

    def second_out_of_sync(effect: Effect) -> Any:
        if isinstance(effect, AwaitJob):
            return (JobGone(completed=True, offset=1), JobGone(completed=False, offset=1))
        return base(effect)

    seen: list[Effect] = []
    ctx = two_disk_context(State.PRE_SWITCHOVER)
    with pytest.raises(StepFailed, match="the mirror of disk 'vdb' was no longer in sync"):
        drive(script.switch_over(ctx), second_out_of_sync, seen)
    assert "source:migrate_continue" not in ",".join(words(seen))


def test_a_target_image_livemig_made_counts_as_empty() -> None:
    """A qcow2 always has metadata allocated; one that --to local just created is known empty,
    so the base copy skips its zeros (``--target-is-zero``)."""
    ctx = context(state=State.SNAPSHOTTED)
    assert ctx.verdict is not None
    (root,) = ctx.verdict.disks
    ctx.verdict = Verdict((attrs.evolve(root, target_allocated=196608),))
    copies = [e for e in drive(script.mirror(ctx), answers()) if isinstance(e, OnHost)]
    assert copies[0].kwargs == {"target_is_zero": False}
    ctx = context(state=State.SNAPSHOTTED)
    ctx.plan = attrs.evolve(ctx.plan, target_files=(Path("/dst.raw"),))
    ctx.verdict = Verdict((attrs.evolve(root, target_allocated=196608),))
    copies = [e for e in drive(script.mirror(ctx), answers()) if isinstance(e, OnHost)]
    assert copies[0].kwargs == {"target_is_zero": True}
