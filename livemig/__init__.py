"""livemig: live-migrate a running QEMU guest as an explicit finite-state machine.

The public surface for embedders. Everything else (``fsm``, ``drivers``, ``transports``) is
internal and may change::

    import livemig

    plan = livemig.Plan.create(
        source_qmp="/run/vm/src.qmp", target_qmp="/run/vm/dst.qmp",
        storage="non-shared", work_dir="/var/lib/livemig/vm1",
    )
    result = await livemig.migrate(plan, on_event=print)
    if result.outcome is not livemig.Outcome.FINALIZED:
        ...
"""

from livemig.fsm.events import (
    Event,
    MigrationResult,
    Outcome,
    Progress,
    Reverting,
    StateEntered,
    Steered,
    Warned,
)
from livemig.fsm.machine import State, StorageMode
from livemig.fsm.plan import Deadlines, Plan, Policy
from livemig.fsm.runner import Connector, migrate
from livemig.transports.errors import (
    CommandFailed,
    ConnectFailed,
    ConnectionLost,
    ConvergenceFailed,
    DeadlineExceeded,
    GuardFailed,
    Interrupted,
    LivemigError,
    MigrationAborted,
    MigrationError,
    MonitorClosed,
    PrecheckError,
    ProcessError,
    ProtocolError,
    QMPError,
    StepFailed,
    ToolError,
    UsageError,
)

__all__ = [
    "CommandFailed",
    "ConnectFailed",
    "ConnectionLost",
    "Connector",
    "ConvergenceFailed",
    "DeadlineExceeded",
    "Deadlines",
    "Event",
    "GuardFailed",
    "Interrupted",
    "LivemigError",
    "MigrationAborted",
    "MigrationError",
    "MigrationResult",
    "MonitorClosed",
    "Outcome",
    "Plan",
    "Policy",
    "PrecheckError",
    "ProcessError",
    "Progress",
    "ProtocolError",
    "QMPError",
    "Reverting",
    "State",
    "StateEntered",
    "Steered",
    "StepFailed",
    "StorageMode",
    "ToolError",
    "UsageError",
    "Warned",
    "migrate",
]
