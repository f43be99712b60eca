"""The pure core driven by observation sequences: what the engine reports folds into the facts,
the table picks the next edge, the guard checks the fold; out-of-order observations are refused.
No I/O, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.drivers.status import MigrationStatus
from livemig.fsm.machine import (
    NO_RETURN,
    TERMINAL,
    Facts,
    MigrationMachine,
    State,
    StorageMode,
    Transfer,
    Trigger,
)
from livemig.fsm.observations import (
    CapabilitiesSet,
    MigrationStatusChanged,
    MirrorReady,
    Observation,
    OverlayActive,
    PostcopyCommitted,
    PostcopyStarted,
    PrechecksPassed,
    SourceReleased,
    StateSaved,
    TargetResumed,
    UndoFinished,
    legal_states,
    observe,
)
from livemig.transports.errors import GuardFailed

#: What the engine observes during the action of each trigger, in order (pre-copy route).
SEEN: dict[Trigger, tuple[Observation, ...]] = {
    Trigger.CONNECT: (PrechecksPassed(),),
    Trigger.SET_CAPABILITIES: (CapabilitiesSet(),),
    Trigger.SNAPSHOT: (OverlayActive("lm-overlay"),),
    Trigger.MIRROR: (MirrorReady("lm-mirror"),),
    Trigger.TRANSFER_STATE: (MigrationStatusChanged(MigrationStatus.SETUP),),
    Trigger.AWAIT_SWITCHOVER: (MigrationStatusChanged(MigrationStatus.PRE_SWITCHOVER),),
    Trigger.SWITCH_OVER: (MigrationStatusChanged(MigrationStatus.COMPLETED), TargetResumed()),
    Trigger.SWITCH_OVER_POSTCOPY: (
        PostcopyCommitted(),
        MigrationStatusChanged(MigrationStatus.POSTCOPY_ACTIVE),
        TargetResumed(),
    ),
    Trigger.FINALIZE: (SourceReleased(),),
}
#: The same, on a migration whose RAM did not converge and went to post-copy.
SEEN_POSTCOPY = {
    **SEEN,
    Trigger.AWAIT_SWITCHOVER: (
        PostcopyStarted(),
        MigrationStatusChanged(MigrationStatus.PRE_SWITCHOVER),
    ),
    Trigger.FINALIZE: (MigrationStatusChanged(MigrationStatus.COMPLETED), SourceReleased()),
}

#: The same, on a stateful stop: the state is saved to a file and restored on the target.
SEEN_STATEFUL = {
    **SEEN,
    Trigger.CONNECT: (PrechecksPassed(transfer=Transfer.STATEFUL_STOP, why="blocked"),),
    Trigger.SAVE_STATE: (StateSaved(),),
    Trigger.RESTORE_STATE: (MigrationStatusChanged(MigrationStatus.COMPLETED), TargetResumed()),
}
SEEN_BY_ROUTE = {False: SEEN, True: SEEN_POSTCOPY, "stateful": SEEN_STATEFUL}

PATHS: dict[tuple[StorageMode, bool | str], list[str]] = {
    (StorageMode.NON_SHARED, False): [
        "idle", "connected", "capabilities-set", "snapshotted", "mirroring", "state-transfer",
        "pre-switchover", "switched-over", "finalized",
    ],
    (StorageMode.SHARED, False): [
        "idle", "connected", "capabilities-set", "state-transfer", "pre-switchover",
        "switched-over", "finalized",
    ],
    (StorageMode.NON_SHARED, True): [
        "idle", "connected", "capabilities-set", "snapshotted", "mirroring", "state-transfer",
        "pre-switchover", "post-copy", "finalized",
    ],
    (StorageMode.SHARED, True): [
        "idle", "connected", "capabilities-set", "state-transfer", "pre-switchover",
        "post-copy", "finalized",
    ],
    (StorageMode.NON_SHARED, "stateful"): [
        "idle", "connected", "capabilities-set", "snapshotted", "mirroring", "state-saved",
        "switched-over", "finalized",
    ],
    (StorageMode.SHARED, "stateful"): [
        "idle", "connected", "capabilities-set", "state-saved", "switched-over", "finalized",
    ],
}  # fmt: skip


def drive(storage: StorageMode, route: bool | str) -> list[str]:
    """The engine's loop without the engine: the table picks, observations fold, fire."""
    seen = SEEN_BY_ROUTE[route]
    machine, facts = MigrationMachine(), Facts(storage)
    states = [machine.current.value]
    while (trigger := machine.forward(facts)) is not None:
        for observation in seen[trigger]:
            facts = observe(machine.current, facts, observation)
        states.append(machine.fire(trigger, facts).value)
    return states


@pytest.mark.parametrize(("route", "path"), list(PATHS.items()), ids=str)
def test_observations_drive_the_table_along_each_route(
    route: tuple[StorageMode, bool | str], path: list[str]
) -> None:
    assert drive(*route) == path


def test_observe_is_pure() -> None:
    facts = Facts(StorageMode.NON_SHARED)
    after = observe(State.IDLE, facts, PrechecksPassed())
    assert after.prechecks_passed
    assert not facts.prechecks_passed


def test_each_edge_needs_its_observation() -> None:
    """No forward edge fires on the facts alone of the states before it: the action's own
    observation is what lets it move (a fact is not a flag the action sets on its way out)."""
    for (storage, postcopy), path in PATHS.items():
        seen = SEEN_BY_ROUTE[postcopy]
        machine, facts = MigrationMachine(), Facts(storage)
        while (trigger := machine.forward(facts)) is not None:
            assert not machine.allows(trigger, facts), (storage, postcopy, trigger)
            for observation in seen[trigger]:
                facts = observe(machine.current, facts, observation)
            assert machine.allows(trigger, facts)
            machine.fire(trigger, facts)
        assert machine.current.value == path[-1]


@pytest.mark.parametrize(
    ("state", "storage", "observation"),
    [
        # The mirror cannot be ready before the overlay exists, nor on shared storage.
        (State.CAPABILITIES_SET, StorageMode.NON_SHARED, MirrorReady("lm-mirror")),
        (State.CAPABILITIES_SET, StorageMode.SHARED, OverlayActive("lm-overlay")),
        # The target cannot run the guest while RAM still streams, nor before the pause.
        (State.STATE_TRANSFER, StorageMode.NON_SHARED, TargetResumed()),
        (State.MIRRORING, StorageMode.NON_SHARED, TargetResumed()),
        # The source is let go of only after the switchover.
        (State.PRE_SWITCHOVER, StorageMode.SHARED, SourceReleased()),
        # No migration status before the capabilities, nor after the point of no return.
        (State.CONNECTED, StorageMode.SHARED, MigrationStatusChanged(MigrationStatus.ACTIVE)),
        (
            State.SWITCHED_OVER,
            StorageMode.SHARED,
            MigrationStatusChanged(MigrationStatus.ACTIVE),
        ),
        # Prechecks pass once, before anything.
        (State.MIRRORING, StorageMode.NON_SHARED, PrechecksPassed()),
        # Post-copy starts while RAM streams, is committed at the pause.
        (State.PRE_SWITCHOVER, StorageMode.SHARED, PostcopyStarted()),
        (State.STATE_TRANSFER, StorageMode.SHARED, PostcopyCommitted()),
        # A state is saved once the disks are on the target, never while RAM streams.
        (State.SNAPSHOTTED, StorageMode.NON_SHARED, StateSaved()),
        (State.STATE_TRANSFER, StorageMode.SHARED, StateSaved()),
    ],
    ids=str,
)
def test_an_observation_out_of_order_is_refused(
    state: State, storage: StorageMode, observation: Observation
) -> None:
    facts = Facts(storage)
    with pytest.raises(GuardFailed, match="cannot be observed in") as err:
        observe(state, facts, observation)
    assert err.value.state == state.value


ANY_OBSERVATION = st.sampled_from(
    [
        PrechecksPassed(),
        CapabilitiesSet(),
        OverlayActive("o"),
        MirrorReady("m"),
        PostcopyStarted(),
        PostcopyCommitted(),
        TargetResumed(),
        SourceReleased(),
        StateSaved(),
        UndoFinished(clean=True),
        UndoFinished(clean=False),
    ]
    + [MigrationStatusChanged(s) for s in MigrationStatus]
)


@given(
    state=st.sampled_from(State),
    storage=st.sampled_from(StorageMode),
    observation=ANY_OBSERVATION,
)
def test_an_observation_is_taken_exactly_where_the_table_can_have_it(
    state: State, storage: StorageMode, observation: Observation
) -> None:
    legal = state in legal_states(observation) and not (
        isinstance(observation, OverlayActive | MirrorReady) and storage is StorageMode.SHARED
    )
    facts = Facts(storage, transfer=Transfer.STATEFUL_STOP)
    if legal:
        observe(state, facts, observation)
    else:
        with pytest.raises(GuardFailed):
            observe(state, facts, observation)
    assert state not in TERMINAL or not legal, "nothing is observed in a terminal state"


def test_a_live_migration_saves_no_state() -> None:
    with pytest.raises(GuardFailed, match="saves no state"):
        observe(
            State.MIRRORING, Facts(StorageMode.NON_SHARED, transfer=Transfer.LIVE), StateSaved()
        )


def test_past_the_point_of_no_return_only_fail_is_left() -> None:
    machine, facts = MigrationMachine(), Facts(StorageMode.SHARED)
    while machine.current not in NO_RETURN:
        trigger = machine.forward(facts)
        assert trigger is not None
        for observation in SEEN[trigger]:
            facts = observe(machine.current, facts, observation)
        machine.fire(trigger, facts)
    assert machine.current is State.SWITCHED_OVER
    facts = observe(machine.current, facts, UndoFinished(clean=True))
    assert not machine.allows(Trigger.REVERT, facts)
    with pytest.raises(GuardFailed, match="not an edge"):
        machine.fire(Trigger.REVERT, facts)
    assert machine.fire(Trigger.FAIL, facts) is State.FAILED
