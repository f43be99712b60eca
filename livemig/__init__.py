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

from __future__ import annotations

from typing import TYPE_CHECKING

from livemig._lazy import lazy_exports

if TYPE_CHECKING:
    from livemig.fsm.events import (
        Event,
        MigrationResult,
        Outcome,
        Progress,
        Reverting,
        StateEntered,
        Steered,
    )
    from livemig.fsm.machine import State, StorageChoice, StorageMode
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
    "StorageChoice",
    "StorageMode",
    "ToolError",
    "UsageError",
    "migrate",
]

#: Where each export lives. Imported on first use, so ``import livemig.cli`` (``livemig --help``)
#: does not pay for trio, qemu.qmp and transitions; ``TYPE_CHECKING`` above keeps mypy exact.
_EXPORTS: dict[str, str] = {
    "Event": "livemig.fsm.events",
    "MigrationResult": "livemig.fsm.events",
    "Outcome": "livemig.fsm.events",
    "Progress": "livemig.fsm.events",
    "Reverting": "livemig.fsm.events",
    "StateEntered": "livemig.fsm.events",
    "Steered": "livemig.fsm.events",
    "State": "livemig.fsm.machine",
    "StorageChoice": "livemig.fsm.machine",
    "StorageMode": "livemig.fsm.machine",
    "Deadlines": "livemig.fsm.plan",
    "Plan": "livemig.fsm.plan",
    "Policy": "livemig.fsm.plan",
    "Connector": "livemig.fsm.runner",
    "migrate": "livemig.fsm.runner",
    "CommandFailed": "livemig.transports.errors",
    "ConnectFailed": "livemig.transports.errors",
    "ConnectionLost": "livemig.transports.errors",
    "ConvergenceFailed": "livemig.transports.errors",
    "DeadlineExceeded": "livemig.transports.errors",
    "GuardFailed": "livemig.transports.errors",
    "Interrupted": "livemig.transports.errors",
    "LivemigError": "livemig.transports.errors",
    "MigrationAborted": "livemig.transports.errors",
    "MigrationError": "livemig.transports.errors",
    "MonitorClosed": "livemig.transports.errors",
    "PrecheckError": "livemig.transports.errors",
    "ProcessError": "livemig.transports.errors",
    "ProtocolError": "livemig.transports.errors",
    "QMPError": "livemig.transports.errors",
    "StepFailed": "livemig.transports.errors",
    "ToolError": "livemig.transports.errors",
    "UsageError": "livemig.transports.errors",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)
