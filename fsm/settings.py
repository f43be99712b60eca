"""Which migration capabilities and parameters to set on each side, from what each offers: pure.

QEMUs differ (an older or newer release lacks a capability or a parameter livemig would use), so
nothing is set blindly: :func:`choose_settings` takes what both sides answered to
``query-migrate-capabilities`` and ``query-migrate-parameters`` and answers with what to set,
what to put back on the source on revert, and what was wanted but is not offered (reported as a
warning; the migration does without it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from livemig.fsm.machine import Transfer
from livemig.fsm.plan import Policy

__all__ = [
    "SOURCE_CAPABILITIES",
    "TARGET_CAPABILITIES",
    "UNLIMITED_BANDWIDTH",
    "MigrationSettings",
    "choose_settings",
]

#: Source capabilities livemig always wants, when the source offers them.
SOURCE_CAPABILITIES = ("events", "pause-before-switchover")
#: Target capabilities: events for MIGRATION, and no disk activation before ``cont``.
TARGET_CAPABILITIES = ("events", "late-block-activate")
#: ``max-bandwidth`` meaning "no cap": QEMU takes bytes/s as int64; this is 1 TiB/s.
UNLIMITED_BANDWIDTH = 1 << 40
#: Source capabilities of a stateful stop: no pause before switchover (the guest is paused
#: already), nothing that converges a running guest.
STATEFUL_SOURCE_CAPABILITIES = ("events",)
#: Parameters the convergence ladder may change later: the undo puts them back too.
_LADDER_PARAMETERS = ("cpu-throttle-initial", "cpu-throttle-increment")


@attrs.frozen
class MigrationSettings:
    source_capabilities: Mapping[str, bool]
    target_capabilities: Mapping[str, bool]
    source_parameters: Mapping[str, Any]
    target_parameters: Mapping[str, Any]
    #: The source's values before, of everything set or possibly changed there.
    restore_capabilities: Mapping[str, bool]
    restore_parameters: Mapping[str, Any]
    #: Wanted, not offered: ``"target capability late-block-activate"``, …
    not_offered: tuple[str, ...]


def choose_settings(
    policy: Policy,
    *,
    source_capabilities: Mapping[str, bool],
    target_capabilities: Mapping[str, bool],
    source_parameters: Mapping[str, Any],
    target_parameters: Mapping[str, Any],
    transfer: Transfer = Transfer.LIVE,
    cpr_reboot: bool = False,
) -> MigrationSettings:
    """What to set, given what each side offers (its answers' keys) and has (their values).

    Nothing is set that a side does not offer, capability or parameter: each side is probed on
    its own (an older or newer QEMU lacks some), and what both must agree on (``multifd``,
    ``postcopy-ram``, ``mapped-ram``, ``mode``) is set only when both offer it.

    A stateful stop (``transfer``) saves to a file: ``mapped-ram`` (each page at its own
    offset: a fixed-size file written in one pass, read back in parallel) and with it
    ``multifd`` when both sides offer them; ``cpr_reboot`` saves in mode ``cpr-reboot``, which
    QEMU's blockers of live migration do not stop.
    """
    missing: list[str] = []

    def offered(name: str, where: Mapping[str, Any], what: str) -> bool:
        if name not in where:
            missing.append(f"{what} {name}")
        return name in where

    stateful = transfer is Transfer.STATEFUL_STOP
    if stateful:
        wanted_src = list(STATEFUL_SOURCE_CAPABILITIES)
    else:
        wanted_src = list(SOURCE_CAPABILITIES) + (["auto-converge"] if policy.auto_converge else [])
    src_caps = {c: True for c in wanted_src if offered(c, source_capabilities, "source capability")}
    dst_caps = {
        c: True for c in TARGET_CAPABILITIES if offered(c, target_capabilities, "target capability")
    }
    both = source_capabilities.keys() & target_capabilities.keys()
    params_both = source_parameters.keys() & target_parameters.keys()
    if policy.postcopy and not stateful and "postcopy-ram" in both:
        # Both sides must agree on it before the stream starts; it costs nothing unused.
        src_caps["postcopy-ram"] = dst_caps["postcopy-ram"] = True
    src_params: dict[str, Any] = {}
    dst_params: dict[str, Any] = {}
    mapped_ram = stateful and "mapped-ram" in both
    if mapped_ram:
        src_caps["mapped-ram"] = dst_caps["mapped-ram"] = True
    if (policy.multifd_channels is not None or mapped_ram) and "multifd" in both:
        src_caps["multifd"] = dst_caps["multifd"] = True
        if policy.multifd_channels is not None and "multifd-channels" in params_both:
            channels = policy.multifd_channels
            src_params["multifd-channels"] = dst_params["multifd-channels"] = channels
    if cpr_reboot and "mode" in params_both:
        src_params["mode"] = dst_params["mode"] = "cpr-reboot"
    convergence = policy.convergence()
    for name, value in (
        ("downtime-limit", convergence.initial_downtime_ms),
        ("max-bandwidth", convergence.bandwidth_cap or UNLIMITED_BANDWIDTH),
    ):
        if offered(name, source_parameters, "source parameter"):
            src_params[name] = value
    restored = (*src_params, *_LADDER_PARAMETERS)
    return MigrationSettings(
        source_capabilities=src_caps,
        target_capabilities=dst_caps,
        source_parameters=src_params,
        target_parameters=dst_params,
        restore_capabilities={c: bool(source_capabilities[c]) for c in src_caps},
        restore_parameters={k: source_parameters[k] for k in restored if k in source_parameters},
        not_offered=tuple(missing),
    )
