"""QEMU's words as types: parsing at the driver boundary, the predicates, unknown words."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio

from livemig.drivers.jobs import BlockJobInfo, JobInfo
from livemig.drivers.migration import MigrationStats
from livemig.drivers.qmp import EventStream, QMPEvent
from livemig.drivers.runstate import RunStatus
from livemig.drivers.status import JobStatus, MigrationStatus, RunState
from livemig.fsm.machine import State
from livemig.fsm.recovery import _serving_pages
from livemig.fsm.session import wait_job, wait_migration
from livemig.transports.errors import ConnectionLost, MigrationAborted, StepFailed

# The values of QEMU 10.0's QAPI enums, from its ``query-qmp-schema``.
QEMU_MIGRATION_STATUS = (
    "none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
    "postcopy-recover-setup", "postcopy-recover", "completed", "failed", "colo",
    "pre-switchover", "device", "wait-unplug",
)  # fmt: skip
QEMU_JOB_STATUS = (
    "undefined", "created", "running", "paused", "ready", "standby", "waiting", "pending",
    "aborting", "concluded", "null",
)  # fmt: skip
QEMU_RUN_STATE = (
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch",
    "finish-migrate", "restore-vm", "running", "save-vm", "shutdown", "suspended", "watchdog",
    "guest-panicked", "colo",
)  # fmt: skip
KINDS = [
    (MigrationStatus, QEMU_MIGRATION_STATUS),
    (JobStatus, QEMU_JOB_STATUS),
    (RunState, QEMU_RUN_STATE),
]
#: A migration status a newer QEMU may send.
NEWER = "postcopy-device"


@pytest.mark.parametrize(("kind", "words"), KINDS, ids=lambda k: getattr(k, "__name__", ""))
def test_every_word_of_qemu_10_is_a_member_and_only_unknown_is_ours(
    kind: type[MigrationStatus | JobStatus | RunState], words: tuple[str, ...]
) -> None:
    assert [kind.parse(w).value for w in words] == list(words)
    assert {m.value for m in kind} - set(words) == {"unknown"}


@pytest.mark.parametrize("kind", [MigrationStatus, JobStatus, RunState])
def test_a_word_livemig_does_not_know_is_unknown_and_logged_once(
    kind: type[MigrationStatus | JobStatus | RunState], caplog: pytest.LogCaptureFixture
) -> None:
    word = f"from-qemu-99-{kind.__name__}"
    with caplog.at_level(logging.WARNING, logger="livemig.qmp"):
        assert kind.parse(word) is kind.UNKNOWN
        assert kind.parse(word) is kind.UNKNOWN
    assert [r.getMessage().count(repr(word)) for r in caplog.records] == [1]


def test_a_member_parses_as_itself() -> None:
    # The fake QEMU answers with the members themselves.
    assert MigrationStatus.parse(MigrationStatus.ACTIVE) is MigrationStatus.ACTIVE
    assert str(MigrationStatus.ACTIVE) == "active"
    assert f"{MigrationStatus.PRE_SWITCHOVER}" == "pre-switchover"


def members(predicate: str, kind: type[MigrationStatus | JobStatus | RunState]) -> set[str]:
    return {m.value for m in kind if getattr(m, predicate)}


@pytest.mark.parametrize(
    ("predicate", "expected"),
    [
        (
            "sending",
            {"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling", "colo"},
        ),
        (
            "postcopy",
            {"postcopy-active", "postcopy-paused", "postcopy-recover-setup", "postcopy-recover"},
        ),
        ("dead_end", {"failed", "cancelled"}),
        ("ended", {"completed", "failed", "cancelled"}),
        ("in_progress", set(QEMU_MIGRATION_STATUS) - {"none", "completed", "failed", "cancelled"}
         | {"unknown"}),
    ],
)  # fmt: skip
def test_migration_status_predicates(predicate: str, expected: set[str]) -> None:
    assert members(predicate, MigrationStatus) == expected


@pytest.mark.parametrize(
    ("predicate", "expected"),
    [
        ("ending", {"aborting", "concluded", "null"}),
        ("cancellable", {"created", "running", "paused", "ready", "standby", "waiting", "pending"}),
    ],
)
def test_job_status_predicates(predicate: str, expected: set[str]) -> None:
    assert members(predicate, JobStatus) == expected


def test_run_state_running_is_running_only() -> None:
    assert members("running", RunState) == {"running"}


def test_no_migration_yet_is_none() -> None:
    assert MigrationStats.from_qmp({}).status is MigrationStatus.NONE
    assert not MigrationStatus.NONE.in_progress


def test_the_drivers_parse_status_words() -> None:
    assert MigrationStats.from_qmp({"status": "active"}).status is MigrationStatus.ACTIVE
    assert MigrationStats.from_qmp({"status": NEWER}).status is MigrationStatus.UNKNOWN
    job = {"id": "m", "type": "mirror", "status": "ready", "current-progress": 1}
    assert JobInfo.from_qmp(job | {"total-progress": 1}).status is JobStatus.READY
    block_job = {
        "device": "m", "type": "mirror", "status": "standby", "ready": True, "offset": 1,
        "len": 1, "busy": False, "paused": False, "speed": 0,
    }  # fmt: skip
    assert BlockJobInfo.from_qmp(block_job).status is JobStatus.STANDBY
    status = RunStatus.from_qmp({"status": "finish-migrate", "running": False})
    assert status == RunStatus(RunState.FINISH_MIGRATE, running=False)


@pytest.mark.parametrize("kind", [MigrationStatus, JobStatus, RunState])
def test_an_unknown_word_is_only_in_progress(
    kind: type[MigrationStatus | JobStatus | RunState],
) -> None:
    # A migration we cannot name may be under way: the prechecks refuse such a source.
    expected = {"in_progress"} if kind is MigrationStatus else set()
    predicates = {n for n, v in vars(kind).items() if isinstance(v, property)}
    assert {p for p in predicates if getattr(kind.UNKNOWN, p)} == expected


def test_recovery_waits_on_an_unknown_status_after_a_committed_postcopy() -> None:
    # Quitting a source that may still serve pages would lose the guest: wait it out instead.
    assert _serving_pages(MigrationStatus.UNKNOWN)
    assert _serving_pages(MigrationStatus.POSTCOPY_RECOVER)
    assert not _serving_pages(MigrationStatus.COMPLETED)
    assert not _serving_pages(MigrationStatus.FAILED)


class Events(EventStream):
    """Events from a list; then the connection is lost."""

    def __init__(self, events: list[tuple[str, dict[str, object]]]) -> None:
        self._events: Iterator[tuple[str, dict[str, object]]] = iter(events)

    async def receive(self) -> QMPEvent:
        await trio.lowlevel.checkpoint()
        for name, data in self._events:
            return QMPEvent(name, data, 0.0)
        raise ConnectionLost("no more events", monitor="test")


async def test_wait_migration_waits_past_an_unknown_status() -> None:
    stream = Events(
        [
            ("MIGRATION", {"status": "active"}),
            ("MIGRATION", {"status": NEWER}),
            ("MIGRATION", {}),
            ("MIGRATION", {"status": "completed"}),
        ]
    )
    got = await wait_migration(
        stream, {MigrationStatus.COMPLETED}, state=State.PRE_SWITCHOVER, side="source"
    )
    assert got is MigrationStatus.COMPLETED


@pytest.mark.parametrize("end", ["failed", "cancelled"])
async def test_wait_migration_stops_at_a_dead_end(end: str) -> None:
    stream = Events([("MIGRATION", {"status": NEWER}), ("MIGRATION", {"status": end})])
    with pytest.raises(MigrationAborted, match=f"source migration {end}"):
        await wait_migration(
            stream, {MigrationStatus.COMPLETED}, state=State.PRE_SWITCHOVER, side="source"
        )


class OneJob:
    """A monitor with one job in it, for ``wait_job``'s first look (``query-jobs``)."""

    def __init__(self, status: str) -> None:
        self.status = status

    @property
    def name(self) -> str:
        return "test"

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        assert command == "query-jobs"
        job = {"id": "m", "type": "mirror", "status": self.status}
        return [job | {"current-progress": 0, "total-progress": 1}]

    def listen(self, *names: str) -> AbstractAsyncContextManager[EventStream]:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


async def test_wait_job_waits_past_an_unknown_job_status() -> None:
    stream = Events(
        [
            ("JOB_STATUS_CHANGE", {"id": "m", "status": "from-qemu-99"}),
            ("JOB_STATUS_CHANGE", {"id": "other", "status": "ready"}),
            ("JOB_STATUS_CHANGE", {"id": "m", "status": "ready"}),
        ]
    )
    monitor = OneJob("running")
    await wait_job(stream, monitor, "m", until="ready", state=State.MIRRORING)


@pytest.mark.parametrize("end", ["aborting", "concluded", "null"])
async def test_wait_job_fails_when_the_job_ends_before_it_is_ready(end: str) -> None:
    stream = Events([("JOB_STATUS_CHANGE", {"id": "m", "status": end})])
    with pytest.raises(StepFailed, match=f"ended \\({end}\\) before it was ready"):
        await wait_job(stream, OneJob("running"), "m", until="ready", state=State.MIRRORING)


async def test_wait_job_reads_the_older_block_job_events() -> None:
    stream = Events(
        [
            ("BLOCK_JOB_ERROR", {"device": "m", "operation": "write", "action": "report"}),
            ("BLOCK_JOB_COMPLETED", {"device": "m"}),
            ("JOB_STATUS_CHANGE", {"id": "m", "status": "null"}),
        ]
    )
    monitor = OneJob("aborting")
    await wait_job(stream, monitor, "m", until="gone", state=State.MIRRORING, errors_fatal=False)
    errors = Events([("BLOCK_JOB_ERROR", {"device": "m", "operation": "write"})])
    with pytest.raises(StepFailed, match="BLOCK_JOB_ERROR: write"):
        await wait_job(errors, monitor, "m", until="gone", state=State.MIRRORING)
