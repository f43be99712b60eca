"""Fault campaigns on the fake QEMUs (:mod:`livemig.testing.model`): fast, deterministic,
replayable.

A campaign is first the systematic table (:mod:`livemig.testing.cases`: every fault kind at every
state where it applies, on each side, and livemig itself crashing then ``livemig recover``, once
per storage mode), then ``runs`` random fault plans of one to three faults drawn from
``random.Random(seed)``: a first fault where it applies (so every pair gets its turn), then up to
two more anywhere (at commands, during the revert, on either side). Every plan runs on fresh fake
QEMUs in a trio run of its own on a mock clock, the safety invariants
(:mod:`livemig.testing.model.invariants`) are checked after it. A run does no real I/O and starts
no thread while its mock clock runs (the journal is a :class:`~livemig.fsm.journal.MemoryJournal`),
and the fake's timings (:class:`~livemig.testing.model.world.Knobs`) keep independent things off
the same instant, so a run does not depend on the machine's load nor on the order trio runs tasks
woken together: a plan replays exactly (:func:`run_plan`), and a seed gives the same campaign.

What a systematic run must do besides: its fault strikes, in its state, and the outcome is the
one a correct livemig ends in. A random plan may not reach every fault's point (it is reported
as unfired); only the invariants judge it.
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import attrs
import trio
import trio.testing

from livemig.fsm.events import Outcome
from livemig.fsm.machine import State, StorageMode
from livemig.fsm.undo import Side
from livemig.testing.cases import FAULT_STATES, OPERATIONS, Case, cases, expected, outcome_names
from livemig.testing.faults import AtCommand, AtState, Fault, FaultKind, FaultPlan, Where
from livemig.testing.model.runs import FaultRun, migrate_with_faults
from livemig.testing.model.world import fake_world

__all__ = [
    "FakeCampaignResult",
    "PlanReport",
    "run_fake_campaign",
    "run_plan",
    "systematic_cases",
]

#: Trio seconds (mock clock) a run must end within, its deadlines and revert included.
GUARD = 120.0
#: A progress line every this many plans.
PROGRESS_EVERY = 50
#: Stands for each run's temporary directory in the report, so that runs compare and replay.
WORK = "<work>"

Source = Literal["table", "random"]


def systematic_cases(storages: Sequence[StorageMode]) -> list[Case]:
    """The whole table of :mod:`livemig.testing.cases` for these storage modes: every
    applicable (state, fault kind) pair on each side it can strike, then livemig crashing at
    each of its crash points."""
    return cases(storages)


@attrs.frozen
class PlanReport:
    """One plan's run: what struck, how it ended, and whether every invariant held."""

    number: int
    source: Source
    storage: StorageMode
    plan: FaultPlan
    #: Outcomes a correct livemig may end in (systematic runs); empty: the invariants decide.
    expected: tuple[str, ...]
    #: ``finalized``, ``reverted``, ``failed``, or ``error`` when the run itself broke.
    outcome: str
    #: Everything that makes this run fail: violations, and for a systematic run a fault that
    #: never struck or an outcome it must not end in.
    problems: tuple[str, ...]
    states: tuple[str, ...] = ()
    fired: tuple[str, ...] = ()
    #: ``(kind, state)`` of each fault that struck.
    struck: tuple[tuple[str, str], ...] = ()
    unfired: tuple[str, ...] = ()
    recovered: bool = False
    #: The invariants' findings: ``safety`` and ``unexplained`` are violations.
    safety: tuple[str, ...] = ()
    unexplained: tuple[str, ...] = ()
    leftovers: tuple[str, ...] = ()
    #: Why the migration did not finalize (its result's ``error``), or why the run broke.
    error: str | None = None
    #: Wall-clock seconds (the only field that differs between two runs of one plan).
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def invariants_held(self) -> bool:
        """Checked, and no violation (a run that broke was not checked)."""
        return self.outcome != "error" and not (self.safety or self.unexplained)

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "source": self.source,
            "storage": self.storage.value,
            "plan": self.plan.to_json(),
            "expected": list(self.expected),
            "outcome": self.outcome,
            "states": list(self.states),
            "fired": list(self.fired),
            "unfired": list(self.unfired),
            "recovered": self.recovered,
            "invariants": {
                "held": self.invariants_held,
                "safety": list(self.safety),
                "unexplained": list(self.unexplained),
                "leftovers": list(self.leftovers),
            },
            "problems": list(self.problems),
            "ok": self.ok,
            "error": self.error,
            "seconds": round(self.seconds, 4),
        }


@attrs.frozen
class FakeCampaignResult:
    seed: int
    storages: tuple[StorageMode, ...]
    #: Random plans asked for (the systematic table comes on top).
    random_runs: int
    reports: tuple[PlanReport, ...]
    #: ``storage/state/kind`` of every systematic case (what "covered" is measured against).
    applicable: frozenset[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports)

    @property
    def violations(self) -> tuple[PlanReport, ...]:
        return tuple(r for r in self.reports if not r.ok)

    def covered(self) -> Counter[str]:
        """How often a fault struck at each ``storage/state/kind``."""
        return Counter(
            f"{r.storage.value}/{state}/{kind}" for r in self.reports for kind, state in r.struck
        )

    def to_json(self) -> dict[str, Any]:
        covered = self.covered()
        fired = sum(len(r.fired) for r in self.reports)
        unfired = sum(len(r.unfired) for r in self.reports)
        return {
            "kind": "fake",
            "seed": self.seed,
            "storages": [s.value for s in self.storages],
            "ok": self.ok,
            "counts": {
                "plans": len(self.reports),
                "table_plans": sum(r.source == "table" for r in self.reports),
                "random_plans": sum(r.source == "random" for r in self.reports),
                "pairs_applicable": len(self.applicable),
                "pairs_covered": len(self.applicable & covered.keys()),
                "pairs_struck": len(covered),
                "faults_fired": fired,
                "faults_unfired": unfired,
                "violations": len(self.violations),
            },
            "outcomes": dict(sorted(Counter(r.outcome for r in self.reports).items())),
            "uncovered": sorted(self.applicable - covered.keys()),
            "pairs": dict(sorted(covered.items())),
            "violations": [
                {
                    "number": r.number,
                    "storage": r.storage.value,
                    "plan": r.plan.to_json(),
                    "outcome": r.outcome,
                    "problems": list(r.problems),
                }
                for r in self.violations
            ],
            "runs": [r.to_json() for r in self.reports],
            "seconds": round(self.seconds, 3),
        }

    def table(self) -> str:
        """Fault kind by state: the outcomes of every run in which such a fault struck, and
        whether the invariants held in all of them; one markdown table per storage mode."""
        out: list[str] = []
        for storage in self.storages:
            cells: dict[tuple[str, str], list[PlanReport]] = {}
            for r in self.reports:
                if r.storage is storage:
                    for kind, state in dict.fromkeys(r.struck):
                        cells.setdefault((kind, state), []).append(r)
            states = [s.value for s in State if any(st == s.value for _, st in cells)]
            out.append(f"\n{storage.value} storage\n")
            out.append("| fault | " + " | ".join(states) + " |")
            out.append("|---|" + "---|" * len(states))
            for kind in FaultKind:
                row = [_cell(cells.get((kind.value, state), [])) for state in states]
                if any(c != "·" for c in row):
                    out.append(f"| {kind.value} | " + " | ".join(row) + " |")
        return "\n".join(out)

    def summary(self) -> str:
        counts = self.to_json()["counts"]
        verdict = "held in every run" if self.ok else f"VIOLATED in {counts['violations']} runs"
        return (
            f"{counts['plans']} plans ({counts['table_plans']} table, {counts['random_plans']}"
            f" random, seed {self.seed}); {counts['pairs_covered']}/{counts['pairs_applicable']}"
            f" (storage, state, kind) pairs struck; {counts['faults_fired']} faults fired,"
            f" {counts['faults_unfired']} unfired; invariants {verdict}"
            f" ({self.seconds:.1f} s)"
        )


def _cell(reports: list[PlanReport]) -> str:
    if not reports:
        return "·"
    outcomes = Counter(r.outcome for r in reports)
    text = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
    failed = sum(not r.ok for r in reports)
    return f"{text} {'ok' if not failed else f'{failed} FAIL'}"


def run_fake_campaign(
    storages: Sequence[StorageMode],
    runs: int,
    seed: int,
    *,
    progress: Callable[[str], None] | None = None,
) -> FakeCampaignResult:
    """Run the systematic table, then ``runs`` random plans drawn from ``seed``.

    Call it outside trio: each plan is a trio run of its own on a mock clock.

    :param progress: gets a line every :data:`PROGRESS_EVERY` plans (default: to stderr).
    """
    say = progress if progress is not None else _to_stderr
    started = time.perf_counter()
    rng = random.Random(seed)
    modes = tuple(storages)
    table = systematic_cases(modes)
    todo: list[tuple[Source, StorageMode, FaultPlan, frozenset[Outcome]]] = [
        ("table", c.storage, FaultPlan((c.fault,), rng.randrange(2**32)), expected(c))
        for c in table
    ]
    for _ in range(runs):
        storage, plan = _random_plan(rng, table)
        todo.append(("random", storage, plan, frozenset()))
    reports: list[PlanReport] = []
    with _quiet_logs():
        for number, (source, storage, plan, outcomes) in enumerate(todo, 1):
            reports.append(run_plan(storage, plan, outcomes, number=number, source=source))
            if number % PROGRESS_EVERY == 0 or number == len(todo):
                bad = sum(not r.ok for r in reports)
                say(
                    f"[{number}/{len(todo)}] plans run, {bad} with violations"
                    f" ({time.perf_counter() - started:.1f} s)"
                )
    applicable = frozenset(
        f"{c.storage.value}/{c.state.value}/{c.kind.value}" for c in table if c.state is not None
    )
    return FakeCampaignResult(
        seed=seed,
        storages=modes,
        random_runs=runs,
        reports=tuple(reports),
        applicable=applicable,
        seconds=time.perf_counter() - started,
    )


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _random_plan(rng: random.Random, cases: Sequence[Case]) -> tuple[StorageMode, FaultPlan]:
    """A first fault where it applies, then up to two more anywhere."""
    first = rng.choice(cases)
    more = [_random_fault(rng) for _ in range(rng.randint(0, 2))]
    return first.storage, FaultPlan((first.fault, *more), rng.randrange(2**32))


def _random_fault(rng: random.Random) -> Fault:
    kind = rng.choice(list(FaultKind))
    side = rng.choice((None, Side.SOURCE, Side.TARGET))
    where: Where
    if rng.random() < 0.5:
        where = AtState(rng.choice(FAULT_STATES), side)
    else:
        where = AtCommand(rng.choice(OPERATIONS), rng.randint(1, 8), side)
    return Fault(kind, where)


def run_plan(
    storage: StorageMode,
    plan: FaultPlan,
    expected: frozenset[Outcome] = frozenset(),
    *,
    number: int = 0,
    source: Source = "random",
) -> PlanReport:
    """Run one plan on fresh fake QEMUs (outside trio) and check the invariants; a plan from a
    report (``FaultPlan.from_json``) replays to the same report but for ``seconds``.

    :param expected: outcomes it may end in (a systematic case); empty: any.
    """
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="livemig-fake-") as tmp:
        work = Path(tmp).absolute()
        run: FaultRun | None = None
        error: str | None = None
        try:
            run = trio.run(
                _migrate,
                work,
                storage,
                plan,
                clock=trio.testing.MockClock(autojump_threshold=0),
            )
        except trio.TooSlowError:
            error = f"the run did not end within {GUARD:g} trio seconds"
        except Exception as err:  # a broken run is a finding, not the campaign's end
            error = f"the run raised {_describe(err)}"
        report = _report(
            number=number,
            source=source,
            storage=storage,
            plan=plan,
            expected=expected,
            run=run,
            error=error,
            work=str(work),
        )
    return attrs.evolve(report, seconds=time.perf_counter() - started)


async def _migrate(work: Path, storage: StorageMode, plan: FaultPlan) -> FaultRun:
    with trio.fail_after(GUARD):
        async with fake_world(work, storage=storage) as world:
            return await migrate_with_faults(world, plan)


def _report(
    *,
    number: int,
    source: Source,
    storage: StorageMode,
    plan: FaultPlan,
    expected: frozenset[Outcome],
    run: FaultRun | None,
    error: str | None,
    work: str,
) -> PlanReport:
    def scrub(texts: Sequence[str]) -> tuple[str, ...]:
        return tuple(t.replace(work, WORK) for t in texts)

    wanted = outcome_names(expected)
    if run is None:
        assert error is not None
        (text,) = scrub([error])
        return PlanReport(number, source, storage, plan, wanted, "error", (text,), error=text)
    problems = list(run.verdict.problems)
    if source == "table":
        fault = plan.faults[0]
        if not run.fired:
            problems.append(f"the fault never struck ({fault.describe()})")
        elif isinstance(fault.where, AtState) and run.fired[0].state is not fault.where.state:
            problems.append(f"the fault struck in {run.fired[0].state.value}, not its state")
        if run.result.outcome not in expected:
            problems.append(f"ended {run.result.outcome.value}, expected {' or '.join(wanted)}")
    return PlanReport(
        number=number,
        source=source,
        storage=storage,
        plan=plan,
        expected=wanted,
        outcome=run.result.outcome.value,
        states=run.states,
        fired=tuple(f.describe() for f in run.fired),
        struck=tuple((f.fault.kind.value, f.state.value) for f in run.fired),
        unfired=tuple(f.describe() for f in run.unfired),
        recovered=run.recovered,
        safety=scrub(run.verdict.safety),
        unexplained=scrub(run.verdict.unexplained),
        leftovers=scrub(run.verdict.leftovers),
        problems=scrub(problems),
        error=None if run.result.error is None else scrub([run.result.error])[0],
    )


def _describe(err: BaseException) -> str:
    """An error, out of the exception groups that trio nurseries wrap it in."""
    if isinstance(err, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in err.exceptions)
    return f"{type(err).__name__}: {err}"


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """The runner's warnings (an undo step retried, …) are expected by the hundred here; the
    reports say what matters."""
    logger = logging.getLogger("livemig")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.propagate = propagate
        logger.removeHandler(handler)
