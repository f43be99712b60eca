"""One migration on the fake world under a fault plan, and its verdict.

    async with fake_world(work_dir) as world:
        run = await migrate_with_faults(world, (Fault("hang", AtState("mirroring")),))
    assert run.verdict.ok, run.explain()

A ``crash`` fault is followed by ``livemig recover`` (:func:`livemig.fsm.recovery.recover`) on the
same world, with the journal exactly as the "killed" livemig left it; the run's result is then
the recovery's. The journal is a :class:`~livemig.fsm.journal.MemoryJournal`: a fake run does no
real I/O.
"""

from __future__ import annotations

import json

import attrs
import trio

from livemig.fsm.events import Event, MigrationResult, Outcome, StateEntered
from livemig.fsm.journal import Journal, MemoryJournal
from livemig.fsm.machine import TransferChoice
from livemig.fsm.plan import Deadlines, Plan, Policy
from livemig.fsm.recovery import recover
from livemig.fsm.runner import migrate
from livemig.fsm.undo import Side
from livemig.testing.faults import Fault, FaultInjector, FaultPlan, Fired
from livemig.testing.model.invariants import Verdict, check_invariants
from livemig.testing.model.world import World

__all__ = [
    "FAST_DEADLINES",
    "FaultRun",
    "migrate_with_faults",
    "plan_for",
]

#: Deadlines scaled to the fake, whose every step takes milliseconds. (The RAM phase's is a
#: fixed 5 s; the recovery's and the close deadlines are livemig's defaults.)
FAST_DEADLINES = Deadlines(
    connect=1.0,
    command=1.0,
    base_copy=2.0,
    mirror_ready=2.0,
    switchover=5.0,
    switchover_per_gib=0.0,
    completion=2.0,
    undo_step=3.0,
    liveness=2.0,
)
#: Trio seconds the world keeps running after the migration ended, before the checks: late
#: effects (a target that starts by itself, a job that still ends) show by then.
SETTLE = 0.2


@attrs.frozen
class FaultRun:
    faults: FaultPlan
    #: The migration's result; after a crash, the recovery's.
    result: MigrationResult
    verdict: Verdict
    fired: tuple[Fired, ...]
    unfired: tuple[Fault, ...]
    states: tuple[str, ...]
    #: livemig "crashed" and ``recover`` ran.
    recovered: bool = False

    def explain(self) -> str:
        """Everything needed to understand (and replay) a failing run."""
        return json.dumps(
            {
                "faults": self.faults.to_json(),
                "fired": [f.describe() for f in self.fired],
                "unfired": [f.describe() for f in self.unfired],
                "recovered": self.recovered,
                "result": self.result.to_json(),
                "safety": list(self.verdict.safety),
                "unexplained": list(self.verdict.unexplained),
            },
            indent=1,
        )


def plan_for(
    world: World,
    *,
    run_id: str = "run1",
    deadlines: Deadlines = FAST_DEADLINES,
    transfer: TransferChoice | str = TransferChoice.AUTO,
) -> Plan:
    return Plan.create(
        source_qmp=world.source.qmp,
        target_qmp=world.target.qmp,
        storage=world.storage,
        work_dir=world.work_dir,
        run_id=run_id,
        deadlines=deadlines,
        policy=Policy(progress_interval=0.1),
        transfer=transfer,
    )


def _untouched(died: MigrationResult) -> MigrationResult:
    return MigrationResult(
        outcome=Outcome.REVERTED,
        states=died.states[:1],
        total_ms=died.total_ms,
        error="livemig died before it touched anything: nothing to recover",
    )


@attrs.define
class _Journal:
    """The journal as it was when livemig "died"; put back once the dead run has returned."""

    sink: MemoryJournal
    kept: dict[str, Journal] = attrs.field(factory=dict)

    def keep(self) -> None:
        self.kept = dict(self.sink.journals)

    def put_back(self) -> None:
        self.sink.journals = dict(self.kept)


async def migrate_with_faults(
    world: World,
    faults: FaultPlan | tuple[Fault, ...] = (),
    *,
    run_id: str = "run1",
    deadlines: Deadlines = FAST_DEADLINES,
    recovery_faults: tuple[Fault, ...] = (),
    transfer: TransferChoice | str = TransferChoice.AUTO,
) -> FaultRun:
    """Migrate on ``world`` with ``faults`` injected; let the world settle; check invariants.

    :param recovery_faults: injected into ``recover`` after a crash (at commands only: the
        recovery announces no states).
    """
    plan_of_faults = faults if isinstance(faults, FaultPlan) else FaultPlan(faults)
    plan = plan_for(world, run_id=run_id, deadlines=deadlines, transfer=transfer)
    journal = _Journal(MemoryJournal())
    transit = {Side.SOURCE: world.knobs.source_transit, Side.TARGET: world.knobs.target_transit}
    injector = FaultInjector(
        plan_of_faults,
        kill=world.kill,
        cut_nbd=world.cut_nbd,
        on_crash=journal.keep,
        transit=transit,
    )
    states: list[str] = []

    def on_event(event: Event) -> None:
        if isinstance(event, StateEntered) and not injector.crashed:
            states.append(event.state)
        injector.on_event(event)

    result = await migrate(
        plan,
        on_event=on_event,
        connector=injector.connector(world.connect),
        host=injector.host(world.host),
        interrupt=injector.interrupt,
        journal=journal.sink,
    )
    if injector.crashed:
        journal.put_back()
        during = FaultInjector(
            FaultPlan(recovery_faults), kill=world.kill, cut_nbd=world.cut_nbd, transit=transit
        )
        recovered = await recover(
            world.work_dir,
            deadlines=deadlines,
            connector=during.connector(world.connect),
            host=during.host(world.host),
            journal=journal.sink,
        )
        # No journal: livemig died before it touched anything, and there is nothing to do.
        result = recovered[0] if recovered else _untouched(result)
    await trio.sleep(SETTLE)
    return FaultRun(
        faults=plan_of_faults,
        result=result,
        verdict=check_invariants(world, result),
        fired=tuple(injector.fired),
        unfired=injector.unfired(),
        states=tuple(states),
        recovered=injector.crashed,
    )
