"""``livemig demo``: boot a realistic VM, migrate it to a target livemig launches from it
(``--to local``), prove nothing was lost on any disk."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
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
from livemig.drivers import runstate
from livemig.drivers.process import QemuProcess, launched
from livemig.drivers.qmp import open_monitor
from livemig.fsm.events import MigrationResult, Outcome
from livemig.fsm.plan import Plan
from livemig.guest import RealisticImages, ensure_built, make_realistic_images, realistic_vm_spec
from livemig.guest._console import SerialConsole
from livemig.guest._records import DisksReport, verify_disks
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
    """Boot the realistic VM, migrate it to a target livemig launches (``--to local``), then
    stop whichever QEMU runs the guest and check every acknowledged record on every disk."""
    policy, deadlines = policy_from(args)
    image = await ensure_built()
    images = await make_realistic_images(work / "source", depth=1)
    spec = realistic_vm_spec(
        image,
        images,
        qmp_socket=work / "source" / "vm.qmp",
        name="source",
        memory_mib=args.memory_mib,
        accel=args.accel,
        dirty_mib_s=dirty,
    )
    async with (
        trio_asyncio.open_loop(),
        launched(spec, work_dir=work / "source") as source,
        trio.open_nursery() as nursery,
    ):
        console = SerialConsole.of(source)
        nursery.start_soon(console.run)
        started = trio.current_time()
        boot_id = await console.wait_boot()
        last = await console.wait_heartbeat(5)
        _say(
            display,
            {
                "event": "guest",
                "boot_id": f"{boot_id:016x}",
                "booted_s": round(last.at - started, 2),
                "heartbeat": last.seq,
            },
            f"realistic VM booted on the source (q35, 2 vCPUs, qcow2 root on a backing file, "
            f"raw data disk, CD-ROM, NIC, RNG, USB tablet; boot id {boot_id:016x}); migrating "
            f"to a target livemig launches ({args.storage} storage, dirtying {dirty} MiB/s)",
        )
        plan = Plan.create(
            source_qmp=spec.qmp_socket,
            target_qmp=work / "target" / spec.qmp_socket.name,
            storage=args.storage,
            work_dir=work / "run",
            policy=policy,
            deadlines=deadlines,
        )
        result = await run_interruptible(plan, display, work / "target")
        if result.outcome is Outcome.FINALIZED and result.target is not None:
            verdict = await _verify_target(result.target, images, boot_id, console, work)
        else:
            verdict = await _verify_source(console, source, images, boot_id, work)
        nursery.cancel_scope.cancel()
    return result, verdict


async def _verify_target(
    target: Mapping[str, Any],
    images: RealisticImages,
    boot_id: int,
    source_console: SerialConsole,
    work: Path,
) -> Verdict:
    """The guest runs on the target: let it write on, stop it, read its images."""
    serial = Path(str(target["serial"]))
    problems: list[str] = []
    with trio.move_on_after(30):
        while True:
            seen = _read_serial(serial)
            if seen.last_acked > source_console.last_acked + 5:
                break
            await trio.sleep(0.1)
    async with open_monitor(Path(str(target["qmp"])), name="target") as m:
        if not (await runstate.query_status(m)).running:
            problems.append("the target does not run the guest")
        await m.execute("quit")
    pid = int(target["pid"])
    with trio.move_on_after(10):
        while _runs(pid):  # noqa: ASYNC110 - another process (not ours): no event to wait on
            await trio.sleep(0.05)
    seen = _read_serial(serial)
    if seen.boot_ids:
        problems.append("the guest rebooted on the target")
    if seen.last_acked <= source_console.last_acked:
        problems.append("the guest made no progress on the target")
    copies = {Path(k): Path(v) for k, v in dict(target["disks"]).items()}
    disks = [
        attrs.evolve(d, path=copies.get(d.path, d.path), fmt="qcow2" if d.fmt == "qcow2" else "raw")
        for d in images.disk_images()
    ]
    report = await verify_disks(disks, boot_id=boot_id, acked=seen.acked, scratch_dir=work)
    problems += report.problems()
    return Verdict("target", tuple(problems), report)


async def _verify_source(
    console: SerialConsole, source: QemuProcess, images: RealisticImages, boot_id: int, work: Path
) -> Verdict:
    """The guest stayed on the source (the run reverted): power it off, read its images."""
    await console.wait_heartbeat(console.last_acked + 5)
    await console.send_line("poweroff")
    await console.wait_poweroff()
    await source.wait()
    report = await verify_disks(
        images.disk_images(), boot_id=boot_id, acked=console.acked, slack=0, scratch_dir=work
    )
    return Verdict("source", tuple(report.problems()), report)


def _read_serial(path: Path) -> SerialConsole:
    return SerialConsole.parse("target", path.read_text(errors="replace"))


def _runs(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which an init that reaps nothing leaves, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@attrs.frozen
class Verdict:
    """Where the guest ended and what the checks found."""

    survivor: str
    problems: tuple[str, ...]
    report: DisksReport

    @property
    def ok(self) -> bool:
        return not self.problems


def _show_verdict(display: JsonLines | HumanDisplay, verdict: Verdict) -> None:
    per_disk = {name: r.checked for name, r in verdict.report.reports}
    missing = sum(r.missing_count for _, r in verdict.report.reports)
    _say(
        display,
        {
            "event": "verdict",
            "ok": verdict.ok,
            "survivor": verdict.survivor,
            "records_checked": per_disk,
            "records_missing": missing,
            "problems": list(verdict.problems),
        },
        f"guest ran on the {verdict.survivor}; acknowledged disk records checked: "
        + ", ".join(f"{name} {n}" for name, n in per_disk.items())
        + f"; {missing} missing\n"
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
