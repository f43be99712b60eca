"""``livemig faults``: run a fault campaign, print fault x state -> outcome, write a JSON report.

Exit 0 only when every invariant held in every run (and every planned fault struck).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any

import trio

from livemig.fsm.machine import StorageMode
from livemig.testing.campaign_real import CaseReport, run_real_campaign, summary_table

__all__ = ["run_faults"]

EXIT_OK = 0
EXIT_VIOLATED = 1


def run_faults(args: argparse.Namespace) -> int:
    storages = [StorageMode(args.storage)] if args.storage else list(StorageMode)
    ok = _real(args, storages) if args.real else _fake(args, storages)
    return EXIT_OK if ok else EXIT_VIOLATED


def _real(args: argparse.Namespace, storages: list[StorageMode]) -> bool:
    reports = trio.run(partial(run_real_campaign, storages, only=args.only, seed=args.seed))
    report: dict[str, Any] = {
        "kind": "real",
        "seed": args.seed,
        "runs": [r.to_json() for r in reports],
    }
    print(summary_table(reports))
    ok = all(r.ok for r in reports)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    _print_totals(report, ok, [r for r in reports if not r.ok], args.report)
    return ok


def _fake(args: argparse.Namespace, storages: list[StorageMode]) -> bool:
    """The fake QEMUs: the systematic table, then ``--runs`` random plans from ``--seed``."""
    from livemig.testing.campaign_fake import run_fake_campaign  # noqa: PLC0415 - not for --real

    result = run_fake_campaign(storages, args.runs, args.seed)
    args.report.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    print(result.table())
    print(f"\n{result.summary()}; report written to {args.report}")
    for r in result.violations:
        print(f"  #{r.number} {r.storage.value}: {r.plan.describe()}: {'; '.join(r.problems)}")
    return result.ok


def _print_totals(report: dict[str, Any], ok: bool, failed: list[CaseReport], path: Path) -> None:
    runs = report.get("runs", [])
    print(
        f"\n{len(runs)} runs; invariants {'held in every run' if ok else 'VIOLATED'}; "
        f"report written to {path}"
    )
    for r in failed:
        print(f"  {r.case.name}: outcome {r.outcome} (expected {r.expected}), {r.problems}")
