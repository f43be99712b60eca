"""``livemig demo``: boot the test guest, migrate it to a second QEMU, prove nothing was lost."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import trio
import trio_asyncio

from livemig._display import HumanDisplay, JsonLines
from livemig.cli import (
    EXIT_FAILED,
    exit_code,
    policy_from,
    run_interruptible,
    show_result,
)
from livemig.fsm.events import MigrationResult, Outcome
from livemig.fsm.plan import Plan
from livemig.guest import ensure_built
from livemig.guest._lab import Verdict, migration_lab
from livemig.transports.errors import UsageError

__all__ = ["run_demo"]


def run_demo(args: argparse.Namespace) -> int:
    dirty = _dirty_rate(args.dirty_mib_s)
    display: JsonLines | HumanDisplay = JsonLines() if args.json else HumanDisplay()
    with _work_dir(args.work_dir) as work, display:
        result, verdict = trio.run(_demo, args, dirty, work, display)
    show_result(display, result)
    _show_verdict(display, verdict)
    code = exit_code(result)
    return EXIT_FAILED if code == 0 and not verdict.ok else code


async def _demo(
    args: argparse.Namespace,
    dirty: int | Literal["max"],
    work: Path,
    display: JsonLines | HumanDisplay,
) -> tuple[MigrationResult, Verdict]:
    policy, deadlines = policy_from(args)
    image = await ensure_built()
    async with trio_asyncio.open_loop():
        started = trio.current_time()
        async with migration_lab(
            image,
            work,
            storage=args.storage,
            memory_mib=args.memory_mib,
            dirty_mib_s=dirty,
            accel=args.accel,
        ) as lab:
            last = lab.source_console.heartbeats[-1]
            _say(
                display,
                {
                    "event": "guest",
                    "boot_id": f"{lab.boot_id:016x}",
                    "booted_s": round(last.at - started, 2),
                    "heartbeat": last.seq,
                },
                f"guest booted on the source (boot id {lab.boot_id:016x}), "
                f"heartbeat {last.seq} after {last.at - started:.1f} s; migrating "
                f"({args.storage} storage, dirtying {dirty} MiB/s)",
            )
            plan = Plan.create(
                source_qmp=lab.source_qmp,
                target_qmp=lab.target_qmp,
                storage=args.storage,
                work_dir=work,
                policy=policy,
                deadlines=deadlines,
            )
            result = await run_interruptible(plan, display)
            survivor: Literal["source", "target"] = (
                "target" if result.outcome is Outcome.FINALIZED else "source"
            )
            verdict = await lab.verify(expect=survivor)
    return result, verdict


def _show_verdict(display: JsonLines | HumanDisplay, verdict: Verdict) -> None:
    records = verdict.records
    _say(
        display,
        {
            "event": "verdict",
            "ok": verdict.ok,
            "survivor": verdict.survivor,
            "heartbeat_gap_ms": round(verdict.heartbeat_gap_ms, 1),
            "records_checked": records.checked,
            "records_missing": records.missing_count,
            "problems": list(verdict.problems),
        },
        f"guest runs on the {verdict.survivor}; largest heartbeat gap "
        f"{verdict.heartbeat_gap_ms:.0f} ms; {records.checked} acknowledged disk records checked, "
        f"{records.missing_count} missing\n"
        + ("invariants: all held" if verdict.ok else "invariants VIOLATED:\n  ")
        + "\n  ".join(verdict.problems),
    )


def _say(display: JsonLines | HumanDisplay, obj: dict[str, object], text: str) -> None:
    if isinstance(display, JsonLines):
        display.line(obj)
    else:
        display.console.print(text)


def _dirty_rate(text: str) -> int | Literal["max"]:
    if text == "max":
        return "max"
    if not text.isdigit():
        raise UsageError(f"--dirty-mib-s takes a whole number or 'max', not {text!r}")
    return int(text)


@contextlib.contextmanager
def _work_dir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.absolute()
        return
    path = Path(tempfile.mkdtemp(prefix="livemig-demo-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
