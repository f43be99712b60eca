"""The one error root of livemig and its whole tree.

Every layer (``transports``, ``drivers``, ``fsm``, the ``livemig`` facade) raises only these,
chaining the low-level cause with ``raise … from err``. They live in the bottom layer so that every
layer above can raise them without an upward import; ``livemig`` re-exports them.

::

    LivemigError                     root: catch this to catch everything livemig raises
    ├── UsageError                   the caller's input is wrong; nothing was touched
    │   └── PrecheckError            the two QEMUs cannot be migrated between as asked
    ├── QMPError                     something about a QEMU monitor; carries the monitor's name
    │   ├── ConnectFailed            could not reach or greet the monitor
    │   ├── CommandFailed            QEMU answered a command with an error (error_class, desc)
    │   ├── ConnectionLost           "broken": the monitor went away (QEMU died, socket cut)
    │   │   └── QemuGone             and cannot be reached again: its QEMU is gone
    │   ├── MonitorClosed            "closed": used after *we* closed it
    │   └── ProtocolError            the reply was not QMP (malformed JSON, wrong shape)
    ├── ProcessError                 a QEMU process would not start, or exited unexpectedly
    ├── ToolError                    a helper program (qemu-img, …) failed; carries argv, stderr
    └── MigrationError               the migration machine could not go on; carries the state
        ├── StepFailed               a forward action failed (the cause is chained)
        ├── GuardFailed              a trigger's guard did not hold on what was observed
        ├── DeadlineExceeded         a wait ran past the plan's deadline
        ├── ConvergenceFailed        RAM did not converge and the policy gave up
        ├── MigrationAborted         QEMU reported the migration failed or cancelled
        ├── Interrupted              the operator cancelled (signal or cancel scope)
        └── LinkLost                 the target's host was unreachable for too long

An undo step that fails is not raised: the result lists it (``undo_failures``) and the run ends
``failed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CommandFailed",
    "ConnectFailed",
    "ConnectionLost",
    "ConvergenceFailed",
    "DeadlineExceeded",
    "GuardFailed",
    "Interrupted",
    "LinkLost",
    "LivemigError",
    "MigrationAborted",
    "MigrationError",
    "MonitorClosed",
    "PrecheckError",
    "ProcessError",
    "ProtocolError",
    "QMPError",
    "QemuGone",
    "StepFailed",
    "ToolError",
    "UsageError",
]


class LivemigError(Exception):
    """Root of every error livemig raises on purpose."""


class UsageError(LivemigError):
    """The caller's input is wrong. Raised before anything is touched."""


class PrecheckError(UsageError):
    """Source and target were reached but cannot be migrated between as asked."""


class QMPError(LivemigError):
    """A problem with one QEMU monitor.

    :param monitor: the monitor's name (``"source"``, ``"target"``, …).
    """

    def __init__(self, message: str, *, monitor: str) -> None:
        super().__init__(f"{monitor}: {message}")
        self.monitor = monitor


class ConnectFailed(QMPError):
    """The monitor could not be reached or did not complete the QMP greeting."""


class ConnectionLost(QMPError):
    """The monitor went away under us (QEMU exited, the socket was cut)."""


class QemuGone(ConnectionLost):
    """The monitor cannot be reached again: its QEMU is gone (a dropped link alone is a plain
    :class:`ConnectionLost`, and the next command reconnects)."""


class MonitorClosed(QMPError):
    """The monitor was used after livemig itself closed it."""


class ProtocolError(QMPError):
    """The peer spoke something that is not QMP."""


class CommandFailed(QMPError):
    """QEMU answered a command with an error.

    :param command: the QMP command that was sent.
    :param arguments: its arguments.
    :param error_class: QEMU's error class (``GenericError``, ``DeviceNotFound``, …).
    :param desc: QEMU's human-readable description.
    """

    def __init__(
        self,
        *,
        monitor: str,
        command: str,
        arguments: Mapping[str, Any] | None,
        error_class: str,
        desc: str,
    ) -> None:
        super().__init__(f"{command} failed: {error_class}: {desc}", monitor=monitor)
        self.command = command
        self.arguments = dict(arguments or {})
        self.error_class = error_class
        self.desc = desc


class ProcessError(LivemigError):
    """A QEMU process would not start, or exited when it should not have.

    :param returncode: its exit status, if it exited.
    :param stderr_tail: the last lines it wrote to stderr.
    """

    def __init__(
        self, message: str, *, returncode: int | None = None, stderr_tail: str = ""
    ) -> None:
        detail = f"{message} (exit status {returncode})" if returncode is not None else message
        if stderr_tail:
            detail = f"{detail}: {stderr_tail.strip()}"
        super().__init__(detail)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class ToolError(LivemigError):
    """A helper program (``qemu-img`` and the like) failed."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{argv[0]} exited with status {returncode}: {stderr.strip()}")
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr


class MigrationError(LivemigError):
    """The migration machine could not go on.

    :param state: the machine state the error happened in (its string value).
    """

    def __init__(self, message: str, *, state: str) -> None:
        super().__init__(f"in state {state}: {message}")
        self.state = state


class StepFailed(MigrationError):
    """A forward action failed; the cause is chained as ``__cause__``."""


class GuardFailed(MigrationError):
    """A trigger's guard did not hold on what the runner observed (or the move is not an edge)."""


class DeadlineExceeded(MigrationError):
    """A wait ran past the deadline the plan gave it."""


class ConvergenceFailed(MigrationError):
    """RAM did not converge, every remedy the policy allows was tried, and it gave up."""


class MigrationAborted(MigrationError):
    """QEMU reported the migration ``failed`` or ``cancelled``."""


class Interrupted(MigrationError):
    """The operator cancelled the migration."""


class LinkLost(MigrationError):
    """The target's host could not be reached for longer than the plan allows (its control
    connection stayed down): the migration reverts, before the point of no return."""
