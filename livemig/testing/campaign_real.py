"""Fault campaigns on real QEMU: every fault kind at every state where it applies, on the real
test guest, with the safety invariants checked for real after each run.

Each case boots a fresh guest (so a verdict belongs to one fault only), migrates it with one
fault, and checks: exactly one QEMU runs the guest and it is running; its heartbeat goes on (no
reboot); every disk record it acknowledged is on the surviving disk after a clean shutdown;
nothing is left behind (processes, nodes, jobs, exports, files). Faults are real where they can
be: QEMU processes are SIGKILLed, the NBD export is torn down under the mirror, the work
directory is a tiny tmpfs that really fills up, and livemig itself runs as a separate process
that is SIGKILLed and then recovered with ``livemig recover``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import attrs
import trio
import trio_asyncio

from livemig.drivers import runstate
from livemig.drivers.host import LocalHost
from livemig.drivers.qmp import Monitor, open_monitor
from livemig.fsm.events import MigrationResult, Outcome
from livemig.fsm.machine import State, StorageMode
from livemig.fsm.plan import Deadlines, Plan
from livemig.fsm.runner import connect_monitor, migrate
from livemig.fsm.undo import Side
from livemig.guest import GuestImage, ensure_built
from livemig.guest._lab import Lab, migration_lab, realistic_migration_lab
from livemig.testing import cases as fault_cases
from livemig.testing.cases import FAULT_STATES, STORAGES, Case, outcome_names
from livemig.testing.faults import FaultInjector, FaultKind, FaultPlan

__all__ = [
    "CaseReport",
    "aims_at",
    "cases",
    "kill_on_state",
    "run_case",
    "run_real_campaign",
    "summary_table",
]

#: Where the NBD export exists, so tearing it down cuts the link.
_NBD_STATES = frozenset({State.MIRRORING, State.STATE_TRANSFER, State.PRE_SWITCHOVER})
#: A command deadline short enough for ``hang`` cases to end quickly (a fixed 60 s RAM phase,
#: and liveness questions as long as two commands, as before these were fields of their own).
CAMPAIGN_DEADLINES = Deadlines(
    command=3.0,
    switchover=60.0,
    switchover_per_gib=0.0,
    completion=30.0,
    undo_step=20.0,
    liveness=6.0,
)
#: Bytes of the tmpfs that stands in for a full work directory: room for the journal and the
#: sockets, none for a qcow2 overlay.
_FULL_DISK_BYTES = 128 << 10


def aims_at(case: Case) -> bool:
    """Whether the real campaign can aim this case of the table at real QEMU. It runs every
    case but these, and judges each by the same oracle as the fake
    (:func:`livemig.testing.cases.expected`):

    - ``idle``: a fault there strikes a precheck, before livemig has touched either QEMU; the
      fake table and the refusal tests cover it, a real guest adds nothing.
    - ``cut-nbd`` outside ``mirroring`` … ``pre-switchover``: a real cut tears the NBD export
      down, and there is none before the mirror starts nor after the switchover (the fake
      models a partition instead, which bites once NBD is used).
    - ``crash`` at a command: livemig is a process of its own, SIGKILLed from outside as it
      announces a state; nothing outside it can aim between two of its QMP commands.
    """
    if case.state is None or case.state is State.IDLE:
        return False
    if case.kind is FaultKind.CUT_NBD:
        return case.state in _NBD_STATES
    return True


def cases(storages: Iterable[StorageMode] = STORAGES) -> list[Case]:
    """The cases of the table the real campaign runs (:func:`aims_at`)."""
    return [c for c in fault_cases.cases(list(storages)) if aims_at(c)]


async def run_real_campaign(
    storages: Iterable[StorageMode] = STORAGES,
    *,
    only: str | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[CaseReport]:
    """Run every case of :func:`cases` (those whose name contains ``only``, when given), each
    on a freshly booted guest, building the test guest first if needed. Call it in trio.

    :param progress: gets a line per case (default: to stderr).
    """
    say = progress if progress is not None else _to_stderr
    image = await ensure_built()
    chosen = [c for c in cases(storages) if only is None or only in c.name]
    reports: list[CaseReport] = []
    async with trio_asyncio.open_loop():
        for number, case in enumerate(chosen, 1):
            with tempfile.TemporaryDirectory(prefix="livemig-fault-") as work:
                report = await run_case(image, Path(work), case, seed=seed)
            reports.append(report)
            mark = "ok  " if report.ok else "FAIL"
            say(
                f"[{number:3}/{len(chosen)}] {mark} {case.name:56} -> {report.outcome}"
                f" ({report.seconds:.1f} s)"
                + ("" if report.ok else f": {'; '.join(report.problems) or report.error}")
            )
    return reports


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@attrs.frozen
class CaseReport:
    case: Case
    outcome: str
    fired: bool
    problems: tuple[str, ...]
    seconds: float
    states: tuple[str, ...] = ()
    error: str | None = None
    heartbeat_gap_ms: float | None = None
    records_checked: int = 0

    @property
    def expected(self) -> tuple[str, ...]:
        """The outcomes a correct livemig ends in: the one oracle's, the fake campaign's too."""
        return outcome_names(fault_cases.expected(self.case))

    @property
    def ok(self) -> bool:
        return self.fired and self.outcome in self.expected and not self.problems

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=False)
        out["case"] = {
            "storage": self.case.storage.value,
            "kind": self.case.kind.value,
            "at": self.case.where.to_json(),
        }
        out["ok"] = self.ok
        out["expected"] = list(self.expected)
        out["problems"] = list(self.problems)
        out["states"] = list(self.states)
        return out


#: Which VM a case runs on: the one-disk test guest, or the realistic VM (two writable disks,
#: a qcow2 root on a backing file, a CD-ROM, a NIC, …), whose every disk is checked.
VmKind = Literal["test", "realistic"]


def _lab(
    image: GuestImage, work_dir: Path, case: Case, vm: VmKind
) -> contextlib.AbstractAsyncContextManager[Lab]:
    if vm == "realistic":
        return realistic_migration_lab(image, work_dir, storage=case.storage.value, dirty_mib_s=20)
    return migration_lab(image, work_dir, storage=case.storage.value, dirty_mib_s=20)


async def run_case(
    image: GuestImage, work_dir: Path, case: Case, *, seed: int = 0, vm: VmKind = "test"
) -> CaseReport:
    """Run one case on a fresh guest in ``work_dir`` and check every invariant.

    A ``cut-nbd`` tears down the export of the last copied disk (the realistic VM's data disk:
    the second mirror). Needs a trio-asyncio loop (for QMP).
    """
    started = trio.current_time()
    async with _lab(image, work_dir, case, vm) as lab:
        if case.kind is FaultKind.CRASH:
            result, fired = await _crash_and_recover(lab, work_dir, case)
        elif case.kind is FaultKind.DISK_FULL:
            result, fired = await _with_full_disk(lab, work_dir, case)
        else:
            result, fired = await _inject(lab, work_dir, case, seed)
        problems, gap, checked = await _check(lab, case, result)
    return CaseReport(
        case=case,
        outcome=result.outcome.value,
        fired=fired,
        problems=tuple(problems),
        seconds=trio.current_time() - started,
        states=result.states,
        error=result.error,
        heartbeat_gap_ms=gap,
        records_checked=checked,
    )


def _plan(lab: Lab, work_dir: Path) -> Plan:
    return Plan.create(
        source_qmp=lab.source_qmp,
        target_qmp=lab.target_qmp,
        storage=lab.storage,
        work_dir=work_dir,
        deadlines=CAMPAIGN_DEADLINES,
    )


async def _inject(lab: Lab, work_dir: Path, case: Case, seed: int) -> tuple[MigrationResult, bool]:
    plan = _plan(lab, work_dir)
    monitors: dict[str, Monitor] = {}

    async def capture(path: Path, name: str) -> Monitor:
        monitors[name] = monitor = await connect_monitor(path, name)
        return monitor

    async def kill(side: Side) -> None:
        qemu = lab.source if side is Side.SOURCE else lab.target
        qemu.kill()
        await qemu.wait()

    async def cut_nbd() -> None:
        # Tear the export down under the mirror: QEMU drops every NBD connection to it.
        export = plan.names(lab.copied_disks - 1).export_id
        await monitors["target"].execute("block-export-del", {"id": export, "mode": "hard"})

    faults = FaultPlan((case.fault,), seed)
    injector = FaultInjector(faults, kill=kill, cut_nbd=cut_nbd)
    result = await migrate(
        plan,
        on_event=injector.on_event,
        connector=injector.connector(capture),
        host=injector.host(LocalHost()),
        interrupt=injector.interrupt,
    )
    return result, bool(injector.fired)


async def _with_full_disk(lab: Lab, work_dir: Path, case: Case) -> tuple[MigrationResult, bool]:
    """The work directory really is full: a tmpfs too small for the overlay."""
    full = work_dir / "full"
    async with _tiny_tmpfs(full) as mounted:
        plan = _plan(lab, full if mounted else work_dir)
        faults = () if mounted else (case.fault,)
        injector = FaultInjector(FaultPlan(faults))
        result = await migrate(plan, host=injector.host(LocalHost()))
    fired = "No space left" in (result.error or "")
    return result, fired


@contextlib.asynccontextmanager
async def _tiny_tmpfs(path: Path) -> AsyncIterator[bool]:
    """Mount a tiny tmpfs at ``path``; yields whether it could (root can; others get an injected
    ``disk-full`` instead, and the report says which)."""
    await trio.Path(path).mkdir(parents=True, exist_ok=True)
    mount = await trio.run_process(
        ["mount", "-t", "tmpfs", "-o", f"size={_FULL_DISK_BYTES}", "tmpfs", str(path)],
        check=False,
        capture_stderr=True,
    )
    try:
        yield mount.returncode == 0
    finally:
        if mount.returncode == 0:
            with trio.CancelScope(shield=True):
                await trio.run_process(["umount", str(path)], check=False)
        await trio.Path(path).rmdir()


async def _crash_and_recover(lab: Lab, work_dir: Path, case: Case) -> tuple[MigrationResult, bool]:
    """livemig, a process of its own, is SIGKILLed as it enters the state; then recovered."""
    argv = [
        sys.executable, "-m", "livemig", "migrate", "--json",
        "--source-qmp", str(lab.source_qmp), "--target-qmp", str(lab.target_qmp),
        "--storage", lab.storage, "--work-dir", str(work_dir),
    ]  # fmt: skip
    assert case.state is not None  # aims_at: a crash as livemig enters a state
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    fired = await kill_on_state(process, case.state.value)
    await process.wait()
    from livemig.fsm.recovery import recover  # noqa: PLC0415 - only this case needs it

    results = await recover(work_dir)
    if len(results) != 1:
        return _no_result(f"recover found {len(results)} journals"), fired
    return results[0], fired


async def kill_on_state(process: trio.Process, state: str) -> bool:
    """Read ``livemig migrate --json`` lines; SIGKILL it as it enters ``state``. Whether it did."""
    assert process.stdout is not None
    buffer = b""
    while chunk := await process.stdout.receive_some():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = json.loads(raw)
            if line.get("event") == "state" and line.get("state") == state:
                process.kill()
                return True
    return False


def _no_result(error: str) -> MigrationResult:
    return MigrationResult(outcome=Outcome.FAILED, states=(), total_ms=0.0, error=error)


async def _check(
    lab: Lab, case: Case, result: MigrationResult
) -> tuple[list[str], float | None, int]:
    if result.outcome is Outcome.FAILED and case.kind is FaultKind.KILL_SOURCE:
        return await _check_guest_lost(lab, result), None, 0
    if result.outcome is Outcome.FAILED and case.kind is FaultKind.KILL_TARGET:
        return await _check_source_kept(lab, result), None, 0
    problems: list[str] = []
    survivor: Literal["source", "target"] = (
        "target" if result.outcome is Outcome.FINALIZED else "source"
    )
    verdict = await lab.verify(expect=survivor)
    problems += verdict.problems
    return problems, verdict.heartbeat_gap_ms, verdict.records.checked


async def _check_guest_lost(lab: Lab, result: MigrationResult) -> list[str]:
    """The source was killed: the report must say so, the target must be gone, and only what
    holds the dead guest's data may stay: the journal and the overlay with its last writes
    (``qemu-img commit`` merges it into the base), both named in the report."""
    problems = []
    report = (result.error or "") + " ".join(result.undo_failures)
    if "source" not in report:
        problems.append("the report does not say the source is gone")
    with trio.move_on_after(10):
        await lab.target.wait()
    if lab.target.returncode is None:
        problems.append("the target QEMU was left running")
    left = sorted(p.name for p in lab.work_dir.iterdir() if p.name.startswith("lm-"))
    kept = ("-journal.json", "-overlay.qcow2")
    if stray := [name for name in left if not name.endswith(kept)]:
        problems.append(f"files left: {stray}")
    if (overlay := [n for n in left if n.endswith("-overlay.qcow2")]) and overlay[0] not in report:
        problems.append(f"{overlay[0]} was kept but the report does not name it")
    return problems


async def _check_source_kept(lab: Lab, result: MigrationResult) -> list[str]:
    """The target was killed after the switchover: the report must say so, and the source,
    paused with the guest as of the switchover, must be kept for the operator."""
    problems = []
    report = (result.error or "") + " ".join(result.undo_failures)
    if "target" not in report:
        problems.append("the report does not say the target is gone")
    if lab.target.returncode is None:
        problems.append("the target QEMU still runs")
    if lab.source.returncode is not None:
        problems.append("the source QEMU, the only copy left, is gone")
    else:
        async with open_monitor(lab.source.spec.qmp_socket, name="check") as monitor:
            if (await runstate.query_status(monitor)).running:
                problems.append("the source runs the guest again after the target took over")
    return problems


def summary_table(reports: list[CaseReport]) -> str:
    """Fault by state: the outcome, one markdown table per storage mode."""
    out: list[str] = []
    for storage in StorageMode:
        rows = [r for r in reports if r.case.storage is storage]
        if not rows:
            continue
        states = [s for s in FAULT_STATES if any(r.case.state is s for r in rows)]
        out.append(f"\n{storage.value} storage\n")
        out.append("| fault | " + " | ".join(s.value for s in states) + " |")
        out.append("|---|" + "---|" * len(states))
        for kind in FaultKind:
            cells = []
            for state in states:
                found = [r for r in rows if r.case.kind is kind and r.case.state is state]
                cells.append(", ".join(_cell(r) for r in found) if found else "·")
            if any(c != "·" for c in cells):
                out.append(f"| {kind.value} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _cell(report: CaseReport) -> str:
    mark = "ok" if report.ok else "FAIL"
    side = f" ({report.case.side.value})" if report.case.side else ""
    return f"{report.outcome}{side} {mark}"
