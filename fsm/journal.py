"""The run's journal: what a crashed livemig needs to get the guest back to safety.

The runner hands it to a :class:`JournalSink` after every undo push (durably: fsynced), on every
state entry once something was touched (atomically but not fsynced: only the state changed,
and a recovery decides by asking the QEMUs, not by it; durably at ``switched-over``, the point
of no return; not at all at ``pre-switchover``: the guest is paused there, and the journal of
``state-transfer`` already holds all a recovery needs), and at the point of no return of
post-copy; it removes it once the run reached a terminal state other than ``failed``. Undo steps
are pushed *before* the thing they undo is created, and the runner awaits each write, so the
journal never misses something that exists; every undo step is safe to run when its thing does
not exist.

Two sinks: :class:`FileJournal`, the default, keeps it in the work dir, written atomically and
durably (a temporary file, ``fsync``, ``rename``, ``fsync`` of the directory) in a worker thread,
so no ``fsync`` blocks the event loop; :class:`MemoryJournal` keeps it in memory, for the fake
world, whose runs must do no real I/O under a mock clock.

:func:`livemig.fsm.recovery.recover` reads it after a crash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from livemig.fsm.undo import UndoStep
from livemig.transports.errors import UsageError

__all__ = [
    "JOURNAL_VERSION",
    "FileJournal",
    "Journal",
    "JournalSink",
    "MemoryJournal",
    "find_journals",
    "journal_path",
    "remove_journal",
    "write_journal",
]

JOURNAL_VERSION = 1


@attrs.frozen
class Journal:
    """One run as it stood at its last journal write.

    :param postcopy_committed: ``migrate-continue`` into post-copy was sent or about to be: the
        source can no longer take the guest back.
    :param files: files of the run to remove whatever the outcome (overlay, sockets).
    :param remote: a target on another host: how to reach it and what was launched there
        (`livemig.fsm.plan.Plan.remote`); ``None``: this host.
    """

    run_id: str
    source_qmp: str
    target_qmp: str
    storage: str
    state: str
    undo: tuple[UndoStep, ...]
    files: tuple[str, ...]
    target_resumed: bool = False
    postcopy_committed: bool = False
    stop_source: bool = True
    remote: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JOURNAL_VERSION,
            "run_id": self.run_id,
            "source_qmp": self.source_qmp,
            "target_qmp": self.target_qmp,
            "storage": self.storage,
            "state": self.state,
            "undo": [s.to_json() for s in self.undo],
            "files": list(self.files),
            "target_resumed": self.target_resumed,
            "postcopy_committed": self.postcopy_committed,
            "stop_source": self.stop_source,
            **({"remote": dict(self.remote)} if self.remote is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Journal:
        if data.get("version") != JOURNAL_VERSION:
            raise UsageError(f"journal version {data.get('version')!r} is not {JOURNAL_VERSION}")
        try:
            return cls(
                run_id=str(data["run_id"]),
                source_qmp=str(data["source_qmp"]),
                target_qmp=str(data["target_qmp"]),
                storage=str(data["storage"]),
                state=str(data["state"]),
                undo=tuple(UndoStep.from_json(s) for s in data["undo"]),
                files=tuple(str(f) for f in data["files"]),
                target_resumed=bool(data["target_resumed"]),
                postcopy_committed=bool(data["postcopy_committed"]),
                stop_source=bool(data.get("stop_source", True)),
                remote=dict(data["remote"]) if data.get("remote") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"journal is damaged: {err}") from err


class JournalSink(Protocol):
    """Where a run's journal is kept, one per run id."""

    async def write(self, journal: Journal, *, durable: bool = True) -> None:
        """Replace the journal of ``journal.run_id``, atomically; ``durable``: kept for good
        (a host crash included) once this returns."""

    async def remove(self, run_id: str) -> None:
        """Forget the journal of ``run_id``, if there is one."""

    async def read(self) -> list[Journal]:
        """Every journal kept, oldest first.

        :raise UsageError: when one cannot be read.
        """


@attrs.define
class FileJournal:
    """Journals in ``work_dir`` (``lm-<run id>-journal.json``), each write atomic (and fsynced
    when durable), done in a worker thread."""

    work_dir: Path

    async def write(self, journal: Journal, *, durable: bool = True) -> None:
        path = journal_path(self.work_dir, journal.run_id)
        await trio.to_thread.run_sync(partial(write_journal, path, journal, durable=durable))

    async def remove(self, run_id: str) -> None:
        await trio.to_thread.run_sync(remove_journal, journal_path(self.work_dir, run_id))

    async def read(self) -> list[Journal]:
        return [journal for _, journal in find_journals(self.work_dir)]


@attrs.define
class MemoryJournal:
    """Journals in memory: for runs that must do no real I/O (the fake world)."""

    journals: dict[str, Journal] = attrs.field(factory=dict)

    async def write(self, journal: Journal, *, durable: bool = True) -> None:
        del durable
        self.journals[journal.run_id] = journal

    async def remove(self, run_id: str) -> None:
        self.journals.pop(run_id, None)

    async def read(self) -> list[Journal]:
        return list(self.journals.values())


def journal_path(work_dir: Path, run_id: str) -> Path:
    return work_dir / f"lm-{run_id}-journal.json"


def write_journal(path: Path, journal: Journal, *, durable: bool = True) -> None:
    """Replace the journal atomically; ``durable``: fsynced, file and directory (about 6 ms
    here), so it survives a host crash, not only livemig's."""
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(journal.to_json(), separators=(",", ":")).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def remove_journal(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)
    _fsync_dir(path.parent)


def find_journals(work_dir: Path) -> list[tuple[Path, Journal]]:
    """Every journal left in ``work_dir``, oldest first.

    :raise UsageError: when one cannot be read.
    """
    found = []
    for path in sorted(work_dir.glob("lm-*-journal.json"), key=lambda p: p.stat().st_mtime):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot read journal {path}: {err}") from err
        found.append((path, Journal.from_json(data)))
    return found


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
