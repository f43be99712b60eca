"""Test machinery for livemig, as ``trio.testing`` is for trio: the model of two QEMUs, the fault
kinds and their injector, the one table of fault cases with its oracle, and both fault
campaigns. The engine never imports it::

    from livemig.testing import AtState, Fault, FaultKind, fake_world, migrate_with_faults

    async with fake_world(tmp_path, storage="non-shared") as world:
        run = await migrate_with_faults(world, (Fault(FaultKind.HANG, AtState("mirroring")),))
    assert run.verdict.ok, run.explain()

- :mod:`livemig.testing.model`: the fake QEMUs, host and guest (``fake_world``), one run under
  a fault plan (``migrate_with_faults``) and the safety invariants (``check_invariants``);
- :mod:`livemig.testing.faults`: fault values (``FaultPlan``, ``Fault``, ``FaultKind``,
  ``AtState``, ``AtCommand``) and the ``FaultInjector`` that makes them happen through the
  runner's seams, on the fake QEMUs and on real ones alike;
- :mod:`livemig.testing.cases`: the table of cases (``Case``, ``FAULT_STATES``, ``applies``) and
  the oracle (``expected``) both campaigns judge by;
- :mod:`livemig.testing.campaign_fake` (``run_fake_campaign``, ``run_plan``) and
  :mod:`livemig.testing.campaign_real` (``run_real_campaign``, ``run_case``): ``livemig faults``
  and ``livemig faults --real``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from livemig._lazy import lazy_exports

if TYPE_CHECKING:
    from livemig.testing.campaign_fake import (
        FakeCampaignResult,
        PlanReport,
        run_fake_campaign,
        run_plan,
    )
    from livemig.testing.campaign_real import CaseReport, run_case, run_real_campaign
    from livemig.testing.cases import FAULT_STATES, Case, applies, crash_points, expected
    from livemig.testing.faults import (
        AtCommand,
        AtState,
        Fault,
        FaultInjector,
        FaultKind,
        FaultPlan,
        Fired,
        Where,
    )
    from livemig.testing.model.invariants import Verdict, check_invariants
    from livemig.testing.model.runs import FAST_DEADLINES, FaultRun, migrate_with_faults, plan_for
    from livemig.testing.model.world import Knobs, Storage, World, fake_world

__all__ = [
    "FAST_DEADLINES",
    "FAULT_STATES",
    "AtCommand",
    "AtState",
    "Case",
    "CaseReport",
    "FakeCampaignResult",
    "Fault",
    "FaultInjector",
    "FaultKind",
    "FaultPlan",
    "FaultRun",
    "Fired",
    "Knobs",
    "PlanReport",
    "Storage",
    "Verdict",
    "Where",
    "World",
    "applies",
    "check_invariants",
    "crash_points",
    "expected",
    "fake_world",
    "migrate_with_faults",
    "plan_for",
    "run_case",
    "run_fake_campaign",
    "run_plan",
    "run_real_campaign",
]

#: Where each export lives, imported on first use: ``livemig.testing.cases`` does not load the
#: real campaign (the test guest's lab), nor the fake campaign the fake QEMUs.
_EXPORTS: dict[str, str] = {
    "FakeCampaignResult": "livemig.testing.campaign_fake",
    "PlanReport": "livemig.testing.campaign_fake",
    "run_fake_campaign": "livemig.testing.campaign_fake",
    "run_plan": "livemig.testing.campaign_fake",
    "CaseReport": "livemig.testing.campaign_real",
    "run_case": "livemig.testing.campaign_real",
    "run_real_campaign": "livemig.testing.campaign_real",
    "FAULT_STATES": "livemig.testing.cases",
    "Case": "livemig.testing.cases",
    "applies": "livemig.testing.cases",
    "crash_points": "livemig.testing.cases",
    "expected": "livemig.testing.cases",
    "AtCommand": "livemig.testing.faults",
    "AtState": "livemig.testing.faults",
    "Fault": "livemig.testing.faults",
    "FaultInjector": "livemig.testing.faults",
    "FaultKind": "livemig.testing.faults",
    "FaultPlan": "livemig.testing.faults",
    "Fired": "livemig.testing.faults",
    "Where": "livemig.testing.faults",
    "Verdict": "livemig.testing.model.invariants",
    "check_invariants": "livemig.testing.model.invariants",
    "FAST_DEADLINES": "livemig.testing.model.runs",
    "FaultRun": "livemig.testing.model.runs",
    "migrate_with_faults": "livemig.testing.model.runs",
    "plan_for": "livemig.testing.model.runs",
    "Knobs": "livemig.testing.model.world",
    "Storage": "livemig.testing.model.world",
    "World": "livemig.testing.model.world",
    "fake_world": "livemig.testing.model.world",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)
