"""The compensation stack: what to undo, as data.

Each forward action pushes the undo of what it created *as it creates it* (the saga pattern). A
step is a frozen value: a kind, the side it acts on and its arguments. Steps are data, not
closures, so a stack can be written to a journal and read back after a crash;
:mod:`livemig.fsm.reverter`
holds the one interpreter that carries them out.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["Side", "UndoKind", "UndoStack", "UndoStep"]


class Side(enum.StrEnum):
    SOURCE = "source"
    TARGET = "target"


class UndoKind(enum.StrEnum):
    """Each kind names the compensation, imperative. Every one is safe to run twice."""

    #: Put migration capabilities back as they were (args: ``capabilities``).
    RESTORE_CAPABILITIES = "restore-capabilities"
    #: Put migration parameters back as they were (args: ``parameters``).
    RESTORE_PARAMETERS = "restore-parameters"
    #: Remove a file livemig created (args: ``path``).
    DELETE_FILE = "delete-file"
    #: Remove a block node livemig added (args: ``node``).
    DELETE_NODE = "delete-node"
    #: Merge the overlay back into the base with an active commit (args: ``node``, ``job``).
    MERGE_OVERLAY = "merge-overlay"
    #: Stop the NBD server on the target.
    STOP_NBD_SERVER = "stop-nbd-server"
    #: Remove a block export (args: ``export``).
    DELETE_EXPORT = "delete-export"
    #: Cancel a block job and wait until it is gone (args: ``job``).
    CANCEL_JOB = "cancel-job"
    #: Cancel an outgoing migration and wait until it has stopped.
    CANCEL_MIGRATION = "cancel-migration"
    #: Make sure the guest runs (``cont`` only when it is not running).
    RESUME_GUEST = "resume-guest"
    #: Remove a user-created object livemig added, the TLS credentials (args: ``id``).
    DELETE_OBJECT = "delete-object"
    #: Quit a QEMU process (the target that never ran the guest).
    QUIT = "quit"


@attrs.frozen
class UndoStep:
    kind: UndoKind
    side: Side
    args: Mapping[str, Any] = attrs.field(factory=dict)

    def describe(self) -> str:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(self.args.items()))
        return f"{self.kind.value} on {self.side.value}" + (f" ({detail})" if detail else "")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "side": self.side.value, "args": dict(self.args)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UndoStep:
        return cls(UndoKind(data["kind"]), Side(data["side"]), dict(data.get("args", {})))


@attrs.define
class UndoStack:
    """Last in, first out. The runner is its only owner; it journals the stack after every push
    (:meth:`livemig.fsm.session.Session.push_undo`), before the thing the step undoes is
    created. Pops and discards are not journalled at once: a step left in the journal for
    something already gone is harmless to run.
    """

    _steps: list[UndoStep] = attrs.field(factory=list, alias="steps")

    def push(self, step: UndoStep) -> None:
        self._steps.append(step)

    def discard(self, kind: UndoKind, side: Side) -> None:
        """Drop every pending step of ``kind`` on ``side``: what it would undo is already gone."""
        self._steps = [s for s in self._steps if not (s.kind is kind and s.side is side)]

    def top(self) -> UndoStep | None:
        """The step to run next, left on the stack until :meth:`pop` says it is done."""
        return self._steps[-1] if self._steps else None

    def pop(self) -> UndoStep:
        return self._steps.pop()

    def clear(self) -> None:
        self._steps.clear()

    def __len__(self) -> int:
        return len(self._steps)

    def snapshot(self) -> tuple[UndoStep, ...]:
        return tuple(self._steps)
