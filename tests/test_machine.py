"""The migration machine table, edge by edge: pure, no I/O, no clock."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.drivers.status import MigrationStatus
from livemig.fsm.machine import (
    FORWARD,
    NO_RETURN,
    TERMINAL,
    TRANSITIONS,
    Edge,
    Facts,
    MigrationMachine,
    State,
    StorageMode,
    Transfer,
    Trigger,
    allows,
    forward_trigger,
    machine_kwargs,
)
from livemig.transports.errors import GuardFailed

# What each forward action records in the facts once it has done its work.
EFFECTS: dict[Trigger, dict[str, object]] = {
    Trigger.CONNECT: {"prechecks_passed": True},
    Trigger.SET_CAPABILITIES: {"capabilities_set": True},
    Trigger.SNAPSHOT: {"overlay_active": True},
    Trigger.MIRROR: {"mirror_ready": True},
    Trigger.TRANSFER_STATE: {"migration_status": MigrationStatus.ACTIVE},
    Trigger.AWAIT_SWITCHOVER: {"migration_status": MigrationStatus.PRE_SWITCHOVER},
    Trigger.SWITCH_OVER: {"migration_status": MigrationStatus.COMPLETED, "target_resumed": True},
    Trigger.FINALIZE: {"migration_status": MigrationStatus.COMPLETED, "source_released": True},
    Trigger.SWITCH_OVER_POSTCOPY: {
        "postcopy_committed": True,
        "migration_status": MigrationStatus.POSTCOPY_ACTIVE,
        "target_resumed": True,
    },
    Trigger.SAVE_STATE: {"state_saved": True},
    Trigger.RESTORE_STATE: {"migration_status": MigrationStatus.COMPLETED, "target_resumed": True},
}

NON_SHARED_PATH = [
    State.IDLE,
    State.CONNECTED,
    State.CAPABILITIES_SET,
    State.SNAPSHOTTED,
    State.MIRRORING,
    State.STATE_TRANSFER,
    State.PRE_SWITCHOVER,
    State.SWITCHED_OVER,
    State.FINALIZED,
]
SHARED_PATH = [
    State.IDLE,
    State.CONNECTED,
    State.CAPABILITIES_SET,
    State.STATE_TRANSFER,
    State.PRE_SWITCHOVER,
    State.SWITCHED_OVER,
    State.FINALIZED,
]
NON_TERMINAL = [s for s in State if s not in TERMINAL]
REVERTIBLE = [s for s in NON_TERMINAL if s not in NO_RETURN]

LIVE, STATEFUL = Transfer.LIVE, Transfer.STATEFUL_STOP
# A route is a storage mode, whether post-copy was started while RAM streamed, and how the
# guest's state moves.
Route = tuple[StorageMode, bool, Transfer]


def postcopy_path(path: list[State]) -> list[State]:
    return [*path[:-2], State.POSTCOPY, State.FINALIZED]


def stateful_path(path: list[State]) -> list[State]:
    """The live path with the RAM stream replaced by a saved state."""
    i = path.index(State.STATE_TRANSFER)
    return [*path[:i], State.STATE_SAVED, State.SWITCHED_OVER, State.FINALIZED]


def act(facts: Facts, trigger: Trigger) -> None:
    """Record in ``facts`` what the action of ``trigger`` would have observed."""
    for name, value in EFFECTS[trigger].items():
        setattr(facts, name, value)


def walk(storage: StorageMode, postcopy: bool = False, transfer: Transfer = LIVE) -> list[State]:
    """Fire the table's forward trigger from ``idle`` until it has none, acting before each."""
    machine, facts = MigrationMachine(), Facts(storage, postcopy=postcopy, transfer=transfer)
    states = [machine.current]
    for _ in State:  # at most one step per state: a loop in the table cannot hang the test
        trigger = machine.forward(facts)
        if trigger is None:
            break
        act(facts, trigger)
        states.append(machine.fire(trigger, facts))
    return states


def machine_at(
    state: State,
    storage: StorageMode = StorageMode.NON_SHARED,
    postcopy: bool | None = None,
    transfer: Transfer | None = None,
) -> tuple[MigrationMachine, Facts]:
    """A machine driven to ``state`` the way the runner would, and the facts it left.

    The non-shared path (the default) passes through every forward state; ``post-copy`` is
    reached on the post-copy route, ``state-saved`` on the stateful one (the defaults for them).
    """
    postcopy = state is State.POSTCOPY if postcopy is None else postcopy
    if transfer is None:
        transfer = STATEFUL if state is State.STATE_SAVED else LIVE
    machine, facts = MigrationMachine(), Facts(storage, postcopy=postcopy, transfer=transfer)
    if state in (State.REVERTED, State.FAILED):
        machine.fire(Trigger.REVERT if state is State.REVERTED else Trigger.FAIL, facts)
    for _ in State:  # bounded, like walk()
        if machine.current is state:
            return machine, facts
        trigger = machine.forward(facts)
        assert trigger is not None, f"{state} is not on the {storage} path"
        act(facts, trigger)
        machine.fire(trigger, facts)
    raise AssertionError(f"{state} is not on the {storage} path")


PATHS: dict[Route, list[State]] = {
    (StorageMode.NON_SHARED, False, LIVE): NON_SHARED_PATH,
    (StorageMode.SHARED, False, LIVE): SHARED_PATH,
    (StorageMode.NON_SHARED, True, LIVE): postcopy_path(NON_SHARED_PATH),
    (StorageMode.SHARED, True, LIVE): postcopy_path(SHARED_PATH),
    (StorageMode.NON_SHARED, False, STATEFUL): stateful_path(NON_SHARED_PATH),
    (StorageMode.SHARED, False, STATEFUL): stateful_path(SHARED_PATH),
}
# Each forward edge with each route whose path takes it.
FORWARD_CASES = [
    pytest.param(edge, route, id=f"{edge.source}-{edge.trigger}->{edge.dest}-{route}")
    for edge in FORWARD
    for route, path in PATHS.items()
    if edge.source in path
    and forward_trigger(edge.source, Facts(route[0], postcopy=route[1], transfer=route[2]))
    is edge.trigger
    and path[path.index(edge.source) + 1] is edge.dest
]


def test_every_forward_edge_is_on_a_path() -> None:
    assert {case.values[0] for case in FORWARD_CASES} == set(FORWARD)


@pytest.mark.parametrize(("edge", "route"), FORWARD_CASES)
def test_forward_edge_moves_when_its_guard_holds(edge: Edge, route: Route) -> None:
    machine, facts = machine_at(edge.source, *route)
    act(facts, edge.trigger)
    assert edge.guard(facts)
    assert machine.allows(edge.trigger, facts)
    assert machine.fire(edge.trigger, facts) is edge.dest
    assert machine.current is edge.dest


@pytest.mark.parametrize(("edge", "route"), FORWARD_CASES)
def test_forward_edge_is_refused_until_its_action_has_run(edge: Edge, route: Route) -> None:
    machine, facts = machine_at(edge.source, *route)
    assert not edge.guard(facts)
    assert not machine.allows(edge.trigger, facts)
    with pytest.raises(GuardFailed, match="guard") as err:
        machine.fire(edge.trigger, facts)
    assert err.value.state == edge.source.value
    assert machine.current is edge.source


@pytest.mark.parametrize(
    ("state", "trigger", "storage"),
    [
        # The storage mode picks the branch at capabilities-set; each guard checks it again.
        (State.CAPABILITIES_SET, Trigger.SNAPSHOT, StorageMode.SHARED),
        (State.CAPABILITIES_SET, Trigger.TRANSFER_STATE, StorageMode.NON_SHARED),
    ],
)
def test_branch_guard_checks_storage_mode(
    state: State, trigger: Trigger, storage: StorageMode
) -> None:
    machine, facts = machine_at(state)
    facts = attrs.evolve(facts, storage=storage)
    act(facts, trigger)
    with pytest.raises(GuardFailed):
        machine.fire(trigger, facts)
    assert machine.current is state


@pytest.mark.parametrize(
    "status",
    [
        None,
        MigrationStatus.NONE,
        MigrationStatus.FAILED,
        MigrationStatus.CANCELLED,
        MigrationStatus.CANCELLING,
    ],
)
def test_transfer_state_needs_a_started_migration(status: MigrationStatus | None) -> None:
    machine, facts = machine_at(State.MIRRORING)
    facts.migration_status = status
    assert not machine.allows(Trigger.TRANSFER_STATE, facts)


NOT_IN_TABLE = [
    (state, trigger)
    for state in State
    for trigger in Trigger
    if not any(e.source is state and e.trigger is trigger for e in TRANSITIONS)
]


@pytest.mark.parametrize(("state", "trigger"), NOT_IN_TABLE, ids=str)
def test_trigger_not_in_table_is_refused(state: State, trigger: Trigger) -> None:
    machine, facts = machine_at(state)
    with pytest.raises(GuardFailed, match="not an edge") as err:
        machine.fire(trigger, facts)
    assert err.value.state == state.value
    assert machine.current is state
    assert not allows(state, trigger, facts)


@pytest.mark.parametrize("state", REVERTIBLE, ids=str)
def test_revert_is_reachable_from_every_state_before_post_copy(state: State) -> None:
    machine, facts = machine_at(state)
    assert machine.fire(Trigger.REVERT, facts) is State.REVERTED


def test_post_copy_cannot_revert_only_fail() -> None:
    machine, facts = machine_at(State.POSTCOPY)
    with pytest.raises(GuardFailed, match="not an edge"):
        machine.fire(Trigger.REVERT, facts)
    assert machine.fire(Trigger.FAIL, facts) is State.FAILED


def test_committing_to_post_copy_ends_revertibility_at_pre_switchover() -> None:
    machine, facts = machine_at(State.PRE_SWITCHOVER, postcopy=True)
    assert machine.allows(Trigger.REVERT, facts)
    facts.postcopy_committed = True
    assert not machine.allows(Trigger.REVERT, facts)
    assert machine.allows(Trigger.FAIL, facts)


@pytest.mark.parametrize("state", NON_TERMINAL, ids=str)
def test_revert_with_a_failed_undo_step_is_refused_and_fail_is_taken(state: State) -> None:
    machine, facts = machine_at(state)
    facts.undo_clean = False
    with pytest.raises(GuardFailed):
        machine.fire(Trigger.REVERT, facts)
    assert machine.fire(Trigger.FAIL, facts) is State.FAILED


def test_revert_is_refused_at_pre_switchover_once_the_target_resumed() -> None:
    machine, facts = machine_at(State.PRE_SWITCHOVER)
    assert machine.allows(Trigger.REVERT, facts)
    facts.target_resumed = True
    with pytest.raises(GuardFailed):
        machine.fire(Trigger.REVERT, facts)
    assert machine.current is State.PRE_SWITCHOVER
    # Past the point of no return the machine only rolls forward (or records a failure).
    facts.migration_status = MigrationStatus.COMPLETED
    assert machine.allows(Trigger.SWITCH_OVER, facts)
    assert machine.allows(Trigger.FAIL, facts)


def test_revert_edges_from_every_state_before_post_copy_fail_edges_from_all() -> None:
    for trigger, dest, states in (
        (Trigger.REVERT, State.REVERTED, REVERTIBLE),
        (Trigger.FAIL, State.FAILED, NON_TERMINAL),
    ):
        sources = [e.source for e in TRANSITIONS if e.trigger is trigger]
        assert sorted(sources) == sorted(states)
        assert {e.dest for e in TRANSITIONS if e.trigger is trigger} == {dest}


def test_terminal_states_have_no_outgoing_edges() -> None:
    assert [e for e in TRANSITIONS if e.source in TERMINAL] == []
    for state in TERMINAL:
        for storage, postcopy, transfer in PATHS:
            facts = Facts(storage, postcopy=postcopy, transfer=transfer)
            assert forward_trigger(state, facts) is None


@pytest.mark.parametrize(
    ("route", "path"),
    list(PATHS.items()),
    ids=str,
)
def test_the_table_walks_to_finalized(route: Route, path: list[State]) -> None:
    assert walk(*route) == path


def test_auto_transitions_are_off() -> None:
    assert machine_kwargs()["auto_transitions"] is False
    machine = MigrationMachine()
    assert [s for s in State if hasattr(machine, f"to_{s.value}")] == []


# Property: whatever the runner observes and fires, the order of the table holds.
#
# A run starts in any state the runner can drive the machine to (either outcome of a revert
# included), with any facts at all. Each step is one observation or none, then one trigger. An
# observation is the effects of some action, in or out of order (``("act", trigger)``), or one raw
# fact: a fault, a stale status, a failed undo step. The trigger is any trigger, or ``None`` for
# the runner's next step done right (act, then fire the table's forward trigger). Before every
# step and at the end, every trigger the trivial model forbids from the current state is fired
# as well and must be refused: each step probes every forbidden move under the facts of the moment.

STATUSES = [None, *MigrationStatus]
FLAGS = [
    "prechecks_passed",
    "capabilities_set",
    "overlay_active",
    "mirror_ready",
    "target_resumed",
    "postcopy",
    "postcopy_committed",
    "state_saved",
    "undo_clean",
    "source_released",
]
STARTS = st.sampled_from(
    [
        (route, state)
        for route, path in PATHS.items()
        for state in [*path, State.REVERTED, State.FAILED]
    ]
)
FACTS = st.fixed_dictionaries(
    {name: st.booleans() for name in FLAGS} | {"migration_status": st.sampled_from(STATUSES)}
)
OBSERVATIONS = (
    st.tuples(st.just("act"), st.sampled_from(list(EFFECTS)))
    | st.tuples(st.sampled_from(FLAGS), st.booleans())
    | st.tuples(st.just("migration_status"), st.sampled_from(STATUSES))
)
Step = tuple[tuple[str, object] | None, Trigger | None]
STEPS = st.lists(
    st.tuples(st.none() | OBSERVATIONS, st.none() | st.sampled_from(Trigger)), max_size=20
)


def forbidden(state: State, storage: StorageMode, transfer: Transfer) -> list[Trigger]:
    """What the trivial model says cannot move the machine out of ``state``.

    In a terminal state, every trigger; elsewhere, all but fail, revert (not from post-copy) and
    the next trigger of the storage mode's path on either of the transfer's routes.
    """
    if state in TERMINAL:
        return list(Trigger)
    moves = {
        forward_trigger(state, Facts(storage, postcopy=p, transfer=transfer)) for p in (False, True)
    }
    moves.add(Trigger.FAIL)
    if state not in NO_RETURN:
        moves.add(Trigger.REVERT)
    return [t for t in Trigger if t not in moves]


def take(machine: MigrationMachine, facts: Facts, step: Step) -> None:
    """Apply one step; a refused trigger must leave the state as it was."""
    observation, chosen = step
    if observation is not None:
        name, value = observation
        if name == "act":
            act(facts, Trigger(str(value)))
        else:
            setattr(facts, name, value)
    trigger = chosen or machine.forward(facts)
    if trigger is None:
        return
    if chosen is None:
        act(facts, trigger)
    before = machine.current
    expected = allows(before, trigger, facts)
    try:
        machine.fire(trigger, facts)
    except GuardFailed:
        assert not expected
        assert machine.current is before
    else:
        assert expected


@settings(derandomize=True, max_examples=100)
@given(start=STARTS, facts=FACTS, steps=STEPS)
def test_random_runs_keep_the_order_of_the_table(
    start: tuple[Route, State], facts: dict[str, Any], steps: list[Step]
) -> None:
    (storage, postcopy, transfer), state = start
    machine, _ = machine_at(state, storage, postcopy, transfer)
    observed = Facts(storage, transfer=transfer, **facts)
    paths = [p for (s, _, t), p in PATHS.items() if (s, t) == (storage, transfer)]
    path = PATHS[storage, postcopy, transfer]
    history = path[: path.index(state) + 1] if state in path else [State.IDLE, state]
    for step in [*steps, None]:
        for trigger in forbidden(machine.current, storage, transfer):
            with pytest.raises(GuardFailed):
                machine.fire(trigger, observed)
        if step is None:
            break
        take(machine, observed, step)
        if machine.current is not history[-1]:
            assert history[-1] not in TERMINAL, "left a terminal state"
            history.append(machine.current)
    if State.FINALIZED in history:
        assert history[-2] in (State.SWITCHED_OVER, State.POSTCOPY)
    if State.SWITCHED_OVER in history:
        before = history[history.index(State.SWITCHED_OVER) - 1]
        assert before is (State.STATE_SAVED if transfer is STATEFUL else State.PRE_SWITCHOVER)
    if State.POSTCOPY in history:
        assert history[history.index(State.POSTCOPY) - 1] is State.PRE_SWITCHOVER
    # The trivial model: forward moves only ever follow the storage mode's path on one of its
    # routes, one state at a time (so shared storage never snapshots or mirrors).
    forward = [s for s in history if s not in (State.REVERTED, State.FAILED)]
    assert any(forward == p[: len(forward)] for p in paths), (forward, path)
