"""QEMU's words for where a migration, a job and the guest stand, as types.

QMP reports them as strings: a migration's status in ``query-migrate`` and ``MIGRATION``
(`MigrationStatus`), a job's in ``query-jobs``, ``query-block-jobs`` and ``JOB_STATUS_CHANGE``
(`JobStatus`), the guest's run state in ``query-status`` (`RunState`). The drivers parse them
here, at the boundary, so the code above asks a status a question (``status.sending``) instead
of comparing strings against sets written out by hand in several places.

The members are QEMU 10.0's values (its ``query-qmp-schema``). QEMU adds words over the years
(``wait-unplug``, ``postcopy-recover-setup``), so one this livemig does not know is no protocol
error: ``parse`` gives the ``UNKNOWN`` member, logs the word once, and each caller decides what
an unknown status means for it. Every predicate is false for ``UNKNOWN`` except
`MigrationStatus.in_progress`: a word we do not know may be a migration under way.

This module imports nothing heavy: the pure machine (:mod:`livemig.fsm.machine`), which
``livemig --help`` loads, uses it.
"""

from __future__ import annotations

import enum
import logging
from typing import TypeVar

__all__ = ["JobStatus", "MigrationStatus", "RunState"]

log = logging.getLogger("livemig.qmp")


class MigrationStatus(enum.StrEnum):
    """A migration's status (QAPI ``MigrationStatus``), on either side.

    The source goes ``setup`` → ``active`` → (``pre-switchover`` with that capability) →
    ``device`` → ``completed``, or through ``postcopy-active`` when post-copy is started; the
    target goes ``setup`` → ``active`` (or ``postcopy-active``) → ``completed``.
    """

    #: No migration has started (``query-migrate`` then answers ``{}``).
    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    #: Pre-copy: RAM streams while the guest runs.
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    #: The source guest is paused before the switchover, until ``migrate-continue``.
    PRE_SWITCHOVER = "pre-switchover"
    #: The source sends the devices' state; the guest is paused.
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"
    #: A word this livemig does not know (see the module's docstring). Not QEMU's.
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, word: str) -> MigrationStatus:
        """The member for QMP's ``word``; `UNKNOWN` for a word this livemig does not know."""
        return _parse(cls, word)

    @property
    def sending(self) -> bool:
        """Under way before post-copy: the source still holds the whole guest and a
        ``migrate_cancel`` takes it back (in ``cancelling`` one already is)."""
        return self in _SENDING

    @property
    def postcopy(self) -> bool:
        """In post-copy: the target runs the guest and pulls the pages it still lacks from the
        source, which must stay until the migration completed."""
        return self in _POSTCOPY

    @property
    def dead_end(self) -> bool:
        """Ended without the guest moving: nothing more will happen on this side."""
        return self in (MigrationStatus.FAILED, MigrationStatus.CANCELLED)

    @property
    def ended(self) -> bool:
        """Over, one way or the other: completed, failed or cancelled."""
        return self is MigrationStatus.COMPLETED or self.dead_end

    @property
    def in_progress(self) -> bool:
        """Started and not ended; true for `UNKNOWN` too, which may be a migration under way."""
        return self is not MigrationStatus.NONE and not self.ended


_SENDING = frozenset(
    {
        MigrationStatus.SETUP,
        MigrationStatus.ACTIVE,
        MigrationStatus.PRE_SWITCHOVER,
        MigrationStatus.DEVICE,
        MigrationStatus.WAIT_UNPLUG,
        MigrationStatus.CANCELLING,
        MigrationStatus.COLO,
    }
)
_POSTCOPY = frozenset(
    {
        MigrationStatus.POSTCOPY_ACTIVE,
        MigrationStatus.POSTCOPY_PAUSED,
        MigrationStatus.POSTCOPY_RECOVER_SETUP,
        MigrationStatus.POSTCOPY_RECOVER,
    }
)


class JobStatus(enum.StrEnum):
    """A background job's status (QAPI ``JobStatus``).

    A mirror or an active commit goes ``created`` → ``running`` → ``ready`` (``standby`` while
    paused) → ``waiting`` → ``pending`` → ``concluded`` → ``null`` (dismissed); a cancel or an
    error goes through ``aborting`` to ``concluded``.
    """

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    #: In sync: it can be completed (a mirror pivots, an active commit merges).
    READY = "ready"
    #: Ready, but paused.
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    #: Ended; a job started with ``auto-dismiss: false`` waits for ``job-dismiss``.
    CONCLUDED = "concluded"
    #: Gone (dismissed).
    NULL = "null"
    #: A word this livemig does not know (see the module's docstring). Not QEMU's.
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, word: str) -> JobStatus:
        """The member for QMP's ``word``; `UNKNOWN` for a word this livemig does not know."""
        return _parse(cls, word)

    @property
    def ending(self) -> bool:
        """On its way out by itself, or already out: it will not become ready any more, and
        QEMU refuses to cancel it."""
        return self in (JobStatus.ABORTING, JobStatus.CONCLUDED, JobStatus.NULL)

    @property
    def cancellable(self) -> bool:
        """Where QEMU's job verb table accepts ``cancel``."""
        return self in _CANCELLABLE


_CANCELLABLE = frozenset(
    {
        JobStatus.CREATED,
        JobStatus.RUNNING,
        JobStatus.PAUSED,
        JobStatus.READY,
        JobStatus.STANDBY,
        JobStatus.WAITING,
        JobStatus.PENDING,
    }
)


class RunState(enum.StrEnum):
    """The guest's run state (QAPI ``RunState``)."""

    DEBUG = "debug"
    #: Started with ``-incoming``: waiting for, or loading, an incoming migration.
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    #: The guest left by migration; it does not run here any more.
    POSTMIGRATE = "postmigrate"
    #: Started with ``-S`` and never run.
    PRELAUNCH = "prelaunch"
    #: Stopped for the last part of an outgoing migration; it resumes or goes ``postmigrate``
    #: by itself.
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"
    #: A word this livemig does not know (see the module's docstring). Not QEMU's.
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, word: str) -> RunState:
        """The member for QMP's ``word``; `UNKNOWN` for a word this livemig does not know."""
        return _parse(cls, word)

    @property
    def running(self) -> bool:
        """The guest's CPUs run (QEMU's ``running`` flag is true in this state only)."""
        return self is RunState.RUNNING


_Word = TypeVar("_Word", MigrationStatus, JobStatus, RunState)
#: Unknown words already logged, so a poll loop does not repeat the warning.
_logged: set[tuple[type[enum.StrEnum], str]] = set()


def _parse(kind: type[_Word], word: str) -> _Word:
    try:
        return kind(word)
    except ValueError:
        if (kind, word) not in _logged:
            _logged.add((kind, word))
            log.warning(
                "QEMU reported %s %r, which this livemig does not know", kind.__name__, word
            )
        return kind.UNKNOWN
