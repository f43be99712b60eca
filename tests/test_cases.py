"""The one table of fault cases and its oracle: both campaigns draw their cases and their
verdicts from it, and the oracle's decisions where the fake's and the real campaign's used to
disagree."""

from __future__ import annotations

import pytest

from livemig.fsm.events import Outcome
from livemig.fsm.machine import State, StorageMode
from livemig.fsm.undo import Side
from livemig.testing import campaign_fake, campaign_real
from livemig.testing.cases import (
    FAULT_STATES,
    Case,
    applies,
    cases,
    crash_points,
    expected,
    outcome_names,
)
from livemig.testing.faults import AtCommand, AtState, FaultKind

NON_SHARED, SHARED = StorageMode.NON_SHARED, StorageMode.SHARED
FINALIZED, REVERTED, FAILED = Outcome.FINALIZED, Outcome.REVERTED, Outcome.FAILED
EITHER = frozenset({FINALIZED, REVERTED})


def test_every_case_is_named_once() -> None:
    table = cases()
    assert len({c.name for c in table}) == len(table) == len(set(table))


def test_the_campaign_on_fake_qemus_runs_the_table_and_judges_by_the_oracle() -> None:
    result = campaign_fake.run_fake_campaign(list(StorageMode), 0, 3, progress=lambda _: None)
    ran = []
    for report in result.reports:
        (fault,) = report.plan.faults
        case = Case(report.storage, fault.kind, fault.where)
        ran.append(case)
        assert report.expected == outcome_names(expected(case)), case.name
    assert ran == cases(list(StorageMode))
    assert result.ok, [r.problems for r in result.violations]


def test_the_real_campaign_runs_cases_of_the_table_and_judges_by_the_oracle() -> None:
    real = campaign_real.cases()
    assert real == [c for c in cases() if campaign_real.aims_at(c)]
    assert {c.state for c in real} == set(FAULT_STATES) - {State.IDLE}
    for case in real:
        report = campaign_real.CaseReport(
            case=case, outcome="reverted", fired=True, problems=(), seconds=0.0
        )
        assert report.expected == outcome_names(expected(case)), case.name
        assert report.ok is (Outcome.REVERTED in expected(case))


def test_what_the_real_campaign_cannot_aim_at() -> None:
    left_out = [c for c in cases() if not campaign_real.aims_at(c)]
    assert left_out
    for case in left_out:
        cut_without_export = case.kind is FaultKind.CUT_NBD and case.state not in (
            State.MIRRORING,
            State.STATE_TRANSFER,
            State.PRE_SWITCHOVER,
        )
        assert case.state in (State.IDLE, None) or cut_without_export, case.name
    # A crash only as livemig announces a state: the real one is a SIGKILL from outside.
    assert all(isinstance(c.where, AtState) for c in campaign_real.cases())


def test_the_point_of_no_return_is_in_both_campaigns() -> None:
    real = {c.name for c in campaign_real.cases()}
    for storage in StorageMode:
        for kind in (FaultKind.KILL_SOURCE, FaultKind.KILL_TARGET, FaultKind.CRASH):
            assert f"{storage.value}/switched-over/{kind.value}" in real


def case(storage: StorageMode, state: State, kind: FaultKind, side: Side | None = None) -> Case:
    return Case(storage, kind, AtState(state, side))


@pytest.mark.parametrize(
    ("c", "outcomes"),
    [
        # A hung progress poll: the pause and the command deadline race (fake: always the pause;
        # the real guest under load need not keep that order). Both ends are safe.
        (case(NON_SHARED, State.STATE_TRANSFER, FaultKind.HANG, Side.SOURCE), EITHER),
        (case(SHARED, State.STATE_TRANSFER, FaultKind.HANG, Side.SOURCE), EITHER),
        # The NBD link cut with the guest paused and the mirror in sync: the cancel completing
        # and the source noticing the cut race. Both ends are safe.
        (case(NON_SHARED, State.PRE_SWITCHOVER, FaultKind.CUT_NBD), EITHER),
        # A crash entering pre-switchover: the target does not hold the guest yet.
        (case(NON_SHARED, State.PRE_SWITCHOVER, FaultKind.CRASH), {REVERTED}),
        (case(SHARED, State.PRE_SWITCHOVER, FaultKind.CRASH), {REVERTED}),
        # Past the point of no return (new in the real campaign).
        (case(NON_SHARED, State.SWITCHED_OVER, FaultKind.KILL_SOURCE), {FINALIZED}),
        (case(SHARED, State.SWITCHED_OVER, FaultKind.KILL_TARGET), {FAILED}),
        (case(NON_SHARED, State.SWITCHED_OVER, FaultKind.CRASH), {FINALIZED}),
        (case(SHARED, State.SWITCHED_OVER, FaultKind.HANG, Side.SOURCE), {FINALIZED}),
        (case(NON_SHARED, State.SWITCHED_OVER, FaultKind.CANCEL), {FINALIZED}),
        # The target's cont (shared): carried out with its reply lost, forward; else back.
        (case(SHARED, State.PRE_SWITCHOVER, FaultKind.HANG, Side.TARGET), {FINALIZED}),
        (case(SHARED, State.PRE_SWITCHOVER, FaultKind.MALFORMED, Side.TARGET), {FINALIZED}),
        (case(SHARED, State.PRE_SWITCHOVER, FaultKind.QMP_ERROR, Side.TARGET), {REVERTED}),
        (case(SHARED, State.PRE_SWITCHOVER, FaultKind.HANG, Side.SOURCE), {REVERTED}),
        # Killing the source before the switchover kills the guest.
        (case(NON_SHARED, State.PRE_SWITCHOVER, FaultKind.KILL_SOURCE), {FAILED}),
        (case(SHARED, State.CONNECTED, FaultKind.KILL_SOURCE), {FAILED}),
        # Crashes around the target's cont.
        (Case(NON_SHARED, FaultKind.CRASH, AtCommand("cont", side=Side.TARGET)), {REVERTED}),
        (Case(SHARED, FaultKind.CRASH, AtCommand("quit", side=Side.SOURCE)), {FINALIZED}),
    ],
    ids=lambda v: v.name if isinstance(v, Case) else "",
)
def test_the_oracle_decides(c: Case, outcomes: set[Outcome]) -> None:
    assert c in cases()
    assert expected(c) == outcomes


def test_where_a_fault_applies() -> None:
    # The fake's partition bites once NBD is used; the real campaign only runs it where the
    # export exists (above), but the table and the oracle are the same.
    assert applies(NON_SHARED, State.CONNECTED, FaultKind.CUT_NBD)
    assert expected(case(NON_SHARED, State.CONNECTED, FaultKind.CUT_NBD)) == {REVERTED}
    assert not applies(SHARED, State.MIRRORING, FaultKind.CUT_NBD)
    assert not applies(SHARED, State.SNAPSHOTTED, FaultKind.HANG)
    assert [s for s in FAULT_STATES if applies(NON_SHARED, s, FaultKind.DISK_FULL)] == [
        State.CAPABILITIES_SET
    ]
    assert not any(applies(NON_SHARED, s, FaultKind.CRASH) for s in FAULT_STATES)
    assert AtState(State.SWITCHED_OVER) in crash_points(SHARED)
    assert AtState(State.MIRRORING) not in crash_points(SHARED)
