"""The benchmark loop: every repetition runs every scenario with every variant, interleaved.

Order: for each repetition, for each scenario, each variant in turn (the order rotates by one
each repetition), then the floor from livemig's bytes of that repetition. Every run gets its
own temporary work directory and a freshly booted guest; a failed run is recorded as failed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import trio
import trio_asyncio

from bench.bare import run_bare_qmp
from bench.bare import summary as bare_summary
from bench.child import run_measured
from bench.floor import stream_through_unix_socket
from bench.heartbeats import first_after, gap_around
from bench.libvirt import (
    LibvirtPeers,
    LibvirtUnavailable,
    ensure_installed,
    libvirt_peers,
    run_libvirt,
)
from bench.livemig_run import LivemigOutcome, launch_ms, livemig_local_argv, run_livemig
from bench.lxd import run_lxd_equivalent
from bench.model import RunRecord, Status, Variant
from bench.realistic import (
    AnyLab,
    DialedConsole,
    RealisticCache,
    RealisticLab,
    Survivor,
    disks_at,
    disks_on,
    ensure_cache,
    exited_event,
    kill_qemus_under,
    pid_exited_event,
    realistic_lab,
    verify_survivor,
)
from bench.scenarios import DISK_BYTES, Scenario
from livemig.drivers.process import find_qemu_processes
from livemig.guest import GuestImage, Heartbeat, ensure_built
from livemig.guest._lab import Lab, migration_lab

__all__ = [
    "RUN_SLACK_S",
    "Config",
    "LivemigArgv",
    "Results",
    "Saver",
    "describe",
    "dirty_mib",
    "environment",
    "libvirt_run",
    "realistic_run",
    "rotated",
    "run_bench",
    "run_line",
    "say",
]

REPO = Path(__file__).resolve().parents[1]
#: livemig errors that mean "RAM did not converge in time" (the run reverted cleanly).
_NOT_CONVERGED = frozenset({"DeadlineExceeded", "ConvergenceFailed"})
#: Start-up CPU samples per repetition.
_STARTUP_SAMPLES = 3
#: Runs of each ``--help`` command line, timed once at the start.
_HELP_SAMPLES = 10
#: Time a lab run may take beyond the migration deadline (boot, verify, poweroff, teardown).
RUN_SLACK_S = 300.0


@attrs.frozen
class Config:
    runs: int
    scenarios: tuple[Scenario, ...]
    variants: tuple[Variant, ...]
    deadline_s: float
    install: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "scenarios": [s.name for s in self.scenarios],
            "variants": list(self.variants),
            "deadline_s": self.deadline_s,
        }


@attrs.define
class Results:
    config: Config
    started_utc: str = attrs.field(
        factory=lambda: datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    environment: dict[str, Any] = attrs.field(factory=dict)
    records: list[RunRecord] = attrs.field(factory=list)
    #: Variants that could not run, and why.
    skipped: dict[str, str] = attrs.field(factory=dict)
    notes: list[str] = attrs.field(factory=list)
    #: CPU times of ``livemig migrate`` children refused at their first connect, after every
    #: import a migration needs (Python start-up and imports), a few per repetition.
    startup_cpu_ms: list[float] = attrs.field(factory=list)
    #: Wall times of ``livemig --help`` and ``livemig migrate --help``, by command line.
    help_wall_ms: dict[str, list[float]] = attrs.field(factory=dict)
    finished: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "started_utc": self.started_utc,
            "finished": self.finished,
            "config": self.config.to_json(),
            "environment": self.environment,
            "skipped": self.skipped,
            "notes": self.notes,
            "startup_cpu_ms": self.startup_cpu_ms,
            "help_wall_ms": self.help_wall_ms,
            "records": [r.to_json() for r in self.records],
        }


Saver = Callable[[Results], None]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run_bench(config: Config, results: Results, save: Saver) -> None:
    """Run everything, appending to ``results`` and calling ``save`` after each repetition."""
    image = await ensure_built()
    results.environment.update(await environment())
    base = Path(tempfile.mkdtemp(prefix="livemig-bench-"))
    try:
        async with trio_asyncio.open_loop(), contextlib.AsyncExitStack() as stack:
            peers = await _libvirt(config, results, stack, base)
            if "livemig" in config.variants:
                await _help_times(base, results)
            cache: RealisticCache | None = None
            if any(s.realistic for s in config.scenarios):
                say("realistic VM: writing its images' data (once) …")
                cache = await ensure_cache(base / "realistic-cache")
            for rep in range(1, config.runs + 1):
                for _ in range(_STARTUP_SAMPLES):
                    if (cpu := await _startup_cpu(base)) is not None:
                        results.startup_cpu_ms.append(cpu)
                for scenario in config.scenarios:
                    await _repetition(
                        config=config,
                        results=results,
                        image=image,
                        peers=peers,
                        base=base,
                        rep=rep,
                        scenario=scenario,
                        cache=cache,
                    )
                save(results)
        results.finished = True
        commit = (await environment()).get("livemig_commit")
        if commit != results.environment.get("livemig_commit"):
            results.notes.append(
                f"livemig's working tree changed during the run: {commit} at the end"
            )
    finally:
        _kill_qemus_under(base)
        shutil.rmtree(base, ignore_errors=True)


def _kill_qemus_under(base: Path) -> None:
    """Last resort after an error or Ctrl-C: no QEMU of the bench's may outlive it (each lab
    stops its own QEMUs on the way out; this only sweeps up what a failure left)."""
    for pid in find_qemu_processes(base):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


async def _libvirt(
    config: Config, results: Results, stack: contextlib.AsyncExitStack, base: Path
) -> LibvirtPeers | None:
    if "libvirt" not in config.variants:
        return None
    say("libvirt: checking the installation and starting two daemons …")
    reason = await ensure_installed(install=config.install)
    if reason is None:
        try:
            peers = await stack.enter_async_context(libvirt_peers(base / "libvirt"))
        except (LibvirtUnavailable, OSError) as err:
            reason = f"libvirt skipped: the daemons could not be started: {err}"
        else:
            results.environment["libvirt"] = peers.version
            return peers
    results.skipped["libvirt"] = reason
    say(reason)
    return None


def rotated(variants: Sequence[Variant], by: int) -> list[Variant]:
    k = by % len(variants) if variants else 0
    return [*variants[k:], *variants[:k]]


async def _repetition(
    *,
    config: Config,
    results: Results,
    image: GuestImage,
    peers: LibvirtPeers | None,
    base: Path,
    rep: int,
    scenario: Scenario,
    cache: RealisticCache | None = None,
) -> None:
    done: dict[Variant, RunRecord] = {}
    for variant in rotated(config.variants, rep - 1):
        if variant == "libvirt" and peers is None:
            continue
        work = base / f"r{rep}-{len(results.records)}-{variant}"
        await trio.Path(work).mkdir(parents=True)
        try:
            if variant == "libvirt":
                assert peers is not None
                record = await libvirt_run(
                    peers,
                    scenario,
                    image=image,
                    work=work,
                    rep=rep,
                    deadline=config.deadline_s,
                    serial=len(results.records),
                    cache=cache,
                )
            elif scenario.realistic:
                assert cache is not None
                record = await realistic_run(
                    variant,
                    scenario,
                    image=image,
                    work=work,
                    rep=rep,
                    deadline=config.deadline_s,
                    cache=cache,
                )
            else:
                record = await _lab_run(
                    variant, scenario, image=image, work=work, rep=rep, deadline=config.deadline_s
                )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results.records.append(record)
        done[variant] = record
        say(f"[{rep}/{config.runs}] {scenario.name:<26} {variant:<15} {run_line(record)}")
    if "livemig" in done:
        record = await _floor(done["livemig"], scenario, rep)
        results.records.append(record)
        say(f"[{rep}/{config.runs}] {scenario.name:<26} {'floor':<15} {run_line(record)}")


def run_line(r: RunRecord) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    text = (
        f"{r.status:<13} total {ms(r.total_ms)} ms, downtime {ms(r.downtime_ms)} ms, "
        f"gap {ms(r.heartbeat_gap_ms)} ms"
    )
    if r.cpu_ms is not None:
        text += f", cpu {ms(r.cpu_ms)}/{ms(r.wall_ms)} ms"
    if r.error:
        text += f" | {r.error[:200]}"
    if r.problems:
        text += f" | VIOLATIONS: {'; '.join(r.problems)[:300]}"
    return text


async def _lab_run(
    variant: Variant,
    scenario: Scenario,
    *,
    image: GuestImage,
    work: Path,
    rep: int,
    deadline: float,
) -> RunRecord:
    record = RunRecord(rep, scenario.name, variant, "failed", loadavg=os.getloadavg()[0])
    try:
        with trio.fail_after(deadline + RUN_SLACK_S):
            async with migration_lab(
                image,
                work,
                storage=scenario.storage,
                memory_mib=scenario.memory_mib,
                dirty_mib_s=scenario.dirty_mib_s,
                dirty_buf_mib=scenario.dirty_buf_mib,
                disk_bytes=DISK_BYTES,
            ) as lab:
                started = trio.current_time()
                if variant == "livemig":
                    await _livemig(lab, record, deadline)
                elif variant == "livemig-stateful":
                    await _livemig(lab, record, deadline, mode="stateful-stop")
                elif variant == "bare-qmp":
                    await _bare(lab, record, deadline)
                else:
                    await _lxd(lab, record, deadline)
                ended = trio.current_time()
                await _verify(lab, record, started, ended)
    except Exception as err:
        record.status = "failed"
        message = describe(err)
        record.error = f"{record.error}; {message}" if record.error else message
    return record


async def _verify(lab: Lab, record: RunRecord, started: float, ended: float) -> None:
    expect: Literal["source", "target"] = "target" if record.status == "ok" else "source"
    verdict = await lab.verify(expect=expect)
    record.problems += list(verdict.problems)
    console = lab.target_console if expect == "target" else lab.source_console
    end = first_after(console.heartbeats, ended) or ended
    gap = gap_around(lab.heartbeats(), started, end)
    record.heartbeat_gap_ms = gap.gap_ms
    record.detail["missing_heartbeats"] = gap.missing
    record.detail["records_checked"] = verdict.records.checked
    record.detail["survivor"] = expect


async def _livemig(lab: Lab, record: RunRecord, deadline: float, *, mode: str = "auto") -> None:
    await _loaded_startup(record, lab.work_dir.parent)
    _take_livemig(record, await run_livemig(lab, deadline_s=deadline, mode=mode))


async def _loaded_startup(record: RunRecord, where: Path) -> None:
    """Start-up under this run's load: the guest is running (and dirtying) as it will during
    the migration; the refused children touch neither QEMU."""
    loaded = [
        cpu
        for _ in range(_STARTUP_SAMPLES)
        if (cpu := await _startup_cpu(where, name="startup-loaded")) is not None
    ]
    record.startup_cpu_ms = statistics.median(loaded) if loaded else None


def _take_livemig(record: RunRecord, out: LivemigOutcome) -> None:
    """livemig's figures and outcome into ``record``."""
    record.cpu_ms = out.child.cpu_s * 1000.0
    record.wall_ms = out.child.wall_s * 1000.0
    record.detail.update(
        exit_code=out.child.returncode,
        user_ms=round(out.child.user_s * 1000.0, 1),
        sys_ms=round(out.child.sys_s * 1000.0, 1),
        progress_samples=out.progress_samples,
        last_progress=out.last_progress,
    )
    result = out.result
    if result is None:
        record.error = f"no result line (exit {out.child.returncode}): {out.stderr_tail[-500:]}"
        return
    record.detail.update(
        outcome=result.get("outcome"),
        states=result.get("states"),
        phases_ms=result.get("phases_ms"),
        warnings=result.get("warnings"),
        switchover=result.get("switchover"),
        to_cont_ms=livemig_to_cont_ms(result),
    )
    record.total_ms = _num(result.get("total_ms"))
    record.downtime_ms = _num(result.get("downtime_ms"))
    record.ram_bytes = _whole(result.get("ram_bytes"))
    record.disk_bytes = _whole(result.get("disk_bytes"))
    outcome = result.get("outcome")
    status: Status
    if outcome == "finalized":
        status = "ok"
    elif outcome == "reverted" and result.get("error_type") in _NOT_CONVERGED:
        status = "not-converged"
    else:
        status = "failed"
    record.status = status
    if status != "ok":
        record.error = f"{outcome} in {result.get('failed_in')}: {result.get('error')}"


def livemig_to_cont_ms(result: dict[str, Any]) -> float | None:
    """From livemig's start to the target's ``cont`` answered, from its result: the time it
    entered ``pre-switchover`` (the sum of the durations of the states before, ``phases_ms``)
    plus the ``← target cont`` entry of its switchover window (whose 0 is the pre-switchover
    event received, just before that state is entered: a fraction of a millisecond). After a
    stateful stop: the time it entered ``switched-over`` (right after that ``cont``)."""
    states, phases, window = (
        result.get("states"),
        result.get("phases_ms"),
        result.get("switchover"),
    )
    if not (isinstance(states, list) and isinstance(phases, dict) and isinstance(window, list)):
        return None
    if "pre-switchover" not in states:
        # A stateful stop: the target's cont answered is what moves it to switched-over.
        if "state-saved" not in states or "switched-over" not in states:
            return None
        before = states[: states.index("switched-over")]
        if len(set(before)) != len(before) or not all(
            isinstance(phases.get(s), int | float) for s in before
        ):
            return None
        return round(float(sum(phases[s] for s in before)), 1)
    before = states[: states.index("pre-switchover")]
    if len(set(before)) != len(before) or not all(
        isinstance(phases.get(s), int | float) for s in before
    ):
        return None
    conts = [e[0] for e in window if isinstance(e, list) and e[1:] == ["← target cont"]]
    if not conts or not isinstance(conts[-1], int | float):
        return None
    return round(float(sum(phases[s] for s in before)) + float(conts[-1]), 1)


#: A livemig command line for the realistic VM: ``(lab, livemig's work dir, the target dir)``.
LivemigArgv = Callable[[RealisticLab, Path, Path], list[str]]


async def realistic_run(
    variant: Variant,
    scenario: Scenario,
    *,
    image: GuestImage,
    work: Path,
    rep: int,
    deadline: float,
    cache: RealisticCache,
    wrapper: Sequence[str] = (),
    livemig_argv: LivemigArgv | None = None,
) -> RunRecord:
    """One run on the realistic VM: livemig launches its own target (``--to local``, or
    ``livemig_argv``'s command line); bare-qmp and lxd-equivalent get one started beforehand
    from the same spec. ``wrapper`` runs the source QEMU (``ip netns exec NAME``)."""
    record = RunRecord(rep, scenario.name, variant, "failed", loadavg=os.getloadavg()[0])
    record.detail["host_dirty_mib"] = dirty_mib()
    prestarted = variant in ("bare-qmp", "lxd-equivalent")

    def local_argv(lab: RealisticLab, work_dir: Path, target_dir: Path) -> list[str]:
        return livemig_local_argv(
            lab, work_dir=work_dir, target_dir=target_dir, deadline_s=deadline
        )

    try:
        with trio.fail_after(deadline + RUN_SLACK_S):
            async with realistic_lab(
                image, work, scenario, cache, with_target=prestarted, wrapper=wrapper
            ) as lab:
                if not prestarted:
                    await _realistic_livemig(lab, record, deadline, livemig_argv or local_argv)
                else:
                    started = trio.current_time()
                    if variant == "bare-qmp":
                        await _bare(lab, record, deadline)
                    else:
                        await _lxd(lab, record, deadline)
                    ended = trio.current_time()
                    await _verify_realistic(lab, record, started, ended)
    except Exception as err:
        record.status = "failed"
        message = describe(err)
        record.error = f"{record.error}; {message}" if record.error else message
    finally:
        # The lab stopped its own QEMUs; a target livemig launched is nobody's child.
        if pids := kill_qemus_under(work):
            record.problems.append(f"QEMU processes left (killed): {pids}")
    return record


def dirty_mib() -> float | None:
    """The host's dirty page cache (``/proc/meminfo``), MiB: writeback the run may wait for."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Dirty:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


async def _verify_realistic(
    lab: RealisticLab, record: RunRecord, started: float, ended: float
) -> None:
    """bare-qmp, lxd-equivalent: the invariants on the target started beforehand (converged)
    or on the source (reverted)."""
    assert lab.target is not None
    assert lab.target_images is not None
    assert lab.target_console is not None
    assert lab.target_console.console is not None
    async with trio.open_nursery() as nursery:
        source_gone = exited_event(lab.source, nursery)
        target_gone = exited_event(lab.target, nursery)
        if record.status == "ok":
            survivor = Survivor(
                "target",
                lab.target_qmp,
                lab.target_console.console,
                disks_on(lab.target_images, markers_from=lab.images),
                lab.target_nodes,
            )
            other, mine = source_gone, target_gone
        else:
            survivor = Survivor(
                "source", lab.source_qmp, lab.source_console, lab.images.disk_images(),
                lab.source_nodes,
            )  # fmt: skip
            other, mine = target_gone, source_gone
        await _check_survivor(
            lab, record, survivor, other=other, mine=mine, window=(started, ended)
        )
        nursery.cancel_scope.cancel()


def _beats(lab: RealisticLab, *extra: DialedConsole | None) -> list[Heartbeat]:
    consoles = [lab.target_console, *extra]
    beats = list(lab.source_console.heartbeats)
    for c in consoles:
        if c is not None:
            beats += c.heartbeats
    return beats


async def _check_survivor(
    lab: RealisticLab,
    record: RunRecord,
    survivor: Survivor,
    *,
    other: trio.Event | None,
    mine: trio.Event,
    window: tuple[float, float],
    extra: tuple[DialedConsole | None, ...] = (),
) -> None:
    """The invariants on ``survivor`` (``other``: the other QEMU's exit, ``mine``: its own),
    and the heartbeat gap over ``window`` (the migration's start and end)."""
    started, ended = window
    verdict = await verify_survivor(
        survivor,
        boot_id=lab.boot_id,
        other_exited=other,
        survivor_exited=mine,
        heartbeats=_beats(lab, *extra),
        work_dir=lab.work_dir,
        scratch_dir=lab.work_dir,
    )
    record.problems += list(verdict.problems)
    end = first_after(survivor.console.heartbeats, ended) or ended
    gap = gap_around(_beats(lab, *extra), started, end)
    record.heartbeat_gap_ms = gap.gap_ms
    record.detail["missing_heartbeats"] = gap.missing
    if gap.at is not None:
        record.detail["gap_at_ms"] = round((gap.at - started) * 1000.0, 1)
    if gap.seqs is not None:
        record.detail["gap_between"] = _whose(gap.seqs, lab, extra, started)
    record.detail["records_checked"] = verdict.records_checked
    record.detail["layer_markers_checked"] = verdict.markers_checked
    record.detail["survivor"] = survivor.side


def _whose(
    seqs: tuple[int, int],
    lab: RealisticLab,
    extra: tuple[DialedConsole | None, ...],
    started: float,
) -> list[list[object]]:
    """The heartbeats around the longest gap, as ``[seq, console, ms since the start, acks]``
    (for the report: which side went quiet)."""
    consoles = [("source", list(lab.source_console.heartbeats))]
    for c in (lab.target_console, *extra):
        if c is not None:
            consoles.append((c.name, c.heartbeats))
    return [
        [h.seq, name, round((h.at - started) * 1000.0, 1), dict(h.acks)]
        for name, beats in consoles
        for h in beats
        if h.seq in seqs
    ]


#: How long the bench waits for the console of a target livemig launched once it runs the
#: guest (the bench dials it as soon as its socket appears, long before).
_CONSOLE_S = 5.0


async def _realistic_livemig(
    lab: RealisticLab, record: RunRecord, deadline: float, argv_for: LivemigArgv
) -> None:
    """``livemig migrate`` without ``--target-qmp`` (``--to local``, or ``--to ssh://``):
    livemig launches the target in ``target/`` from the source's command line; the bench dials
    its console there (one file system for both "hosts")."""
    target_dir = lab.work_dir / "target"
    console = DialedConsole("target", target_dir / "serial.sock")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(console.run)
        await _loaded_startup(record, lab.work_dir.parent)
        argv = argv_for(lab, lab.work_dir / "livemig", target_dir)
        started = trio.current_time()
        out = await run_livemig(lab, deadline_s=deadline, argv=argv)
        ended = trio.current_time()
        _take_livemig(record, out)
        target = (out.result or {}).get("target")
        if record.status == "ok" and isinstance(target, dict):
            pid = int(target["pid"])
            record.detail["launch_ms"] = launch_ms(out.child, pid)
            record.detail["target"] = target
            copies = {Path(k): Path(v) for k, v in dict(target["disks"]).items()}
            with trio.move_on_after(_CONSOLE_S):
                await console.wait_console()
            if console.console is None:
                record.problems.append(f"the target's console {console.path} never answered")
                return
            survivor = Survivor(
                "target",
                Path(str(target["qmp"])),
                console.console,
                disks_at(lab.images, copies),
                lab.source_nodes,
            )
            other, mine = exited_event(lab.source, nursery), pid_exited_event(pid, nursery)
        else:
            if target_dir.exists():
                record.problems.append(f"the launched target's dir is left: {target_dir}")
            survivor = Survivor(
                "source", lab.source_qmp, lab.source_console, lab.images.disk_images(),
                lab.source_nodes,
            )  # fmt: skip
            other, mine = None, exited_event(lab.source, nursery)
        await _check_survivor(
            lab,
            record,
            survivor,
            other=other,
            mine=mine,
            window=(started, ended),
            extra=(console,),
        )
        nursery.cancel_scope.cancel()


async def _bare(lab: AnyLab, record: RunRecord, deadline: float) -> None:
    out = await run_bare_qmp(lab, deadline_s=deadline)
    record.total_ms = out.total_ms
    record.downtime_ms = _num(out.downtime_ms)
    record.ram_bytes = out.ram_bytes
    record.disk_bytes = out.disk_bytes
    record.problems += out.revert_problems
    record.detail.update(bare_summary(out))
    if out.converged:
        record.status = "ok"
        if out.error:  # after the switchover: the figures may be missing
            record.detail["warning"] = out.error
    else:
        record.status = "not-converged" if out.timed_out else "failed"
        record.error = out.error


async def _lxd(lab: AnyLab, record: RunRecord, deadline: float) -> None:
    out = await run_lxd_equivalent(lab, deadline_s=deadline)
    record.total_ms = out.total_ms
    record.downtime_ms = _num(out.downtime_ms)
    record.ram_bytes = out.ram_bytes
    record.disk_bytes = out.disk_bytes
    record.problems += out.revert_problems
    record.detail.update(phases_ms=out.phases_ms, polls=out.polls, last_poll=out.last_poll)
    if out.converged:
        record.status = "ok"
    else:
        record.status = "not-converged" if out.timed_out else "failed"
        record.error = out.error


async def libvirt_run(
    peers: LibvirtPeers,
    scenario: Scenario,
    *,
    image: GuestImage,
    work: Path,
    rep: int,
    deadline: float,
    serial: int,
    cache: RealisticCache | None = None,
    variant: Variant = "libvirt",
) -> RunRecord:
    record = RunRecord(rep, scenario.name, variant, "failed", loadavg=os.getloadavg()[0])
    if scenario.realistic:
        record.detail["host_dirty_mib"] = dirty_mib()
    try:
        with trio.fail_after(deadline + RUN_SLACK_S):
            out = await run_libvirt(
                peers,
                scenario,
                image,
                work,
                run_name=f"lvb{serial}",
                deadline_s=deadline,
                cache=cache,
            )
    except Exception as err:
        record.error = describe(err)
        return record
    record.total_ms = out.total_ms
    record.downtime_ms = out.downtime_ms
    record.ram_bytes = out.ram_bytes
    record.disk_bytes = out.disk_bytes
    record.heartbeat_gap_ms = out.heartbeat_gap_ms
    record.problems += out.problems
    record.detail.update(
        missing_heartbeats=out.missing_heartbeats,
        virsh_wall_ms=out.virsh_wall_ms,
        stats=out.stats,
    )
    if out.records_checked is not None:
        record.detail["records_checked"] = out.records_checked
    if out.gap_at_ms is not None:
        record.detail["gap_at_ms"] = out.gap_at_ms
    if out.survivor_disks is not None:
        record.detail["survivor_disks"] = out.survivor_disks
    if out.converged:
        record.status = "ok"
    else:
        record.status = "not-converged" if out.timed_out else "failed"
        record.error = out.error
    return record


async def _floor(livemig: RunRecord, scenario: Scenario, rep: int) -> RunRecord:
    record = RunRecord(rep, scenario.name, "floor", "failed")
    if not livemig.converged or livemig.ram_bytes is None:
        record.error = "livemig did not finish in this repetition: no byte count to stream"
        return record
    nbytes = livemig.ram_bytes + (livemig.disk_bytes or 0)
    timing = await stream_through_unix_socket(nbytes)
    record.status = "ok"
    record.total_ms = timing.seconds * 1000.0
    record.ram_bytes = livemig.ram_bytes
    record.disk_bytes = livemig.disk_bytes
    record.detail["bytes_per_s"] = round(timing.bytes_per_s)
    return record


def _dead_socket(path: Path) -> Path:
    """A unix socket file nobody listens on: it passes livemig's "is a socket" check, and
    connecting to it is refused."""
    if not path.is_socket():
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
    return path


async def _startup_cpu(base: Path, *, name: str = "startup") -> float | None:
    """CPU time of ``livemig migrate --json`` refused at its first connect: Python start-up and
    every import a migration loads (the CLI, trio, trio-asyncio, qemu.qmp, the drivers, the
    state machine), then ``trio.run`` and one refused ``connect``; nothing is touched."""
    where = base / name
    where.mkdir(exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "livemig",
        "migrate",
        "--source-qmp",
        str(_dead_socket(where / "a.qmp")),
        "--target-qmp",
        str(_dead_socket(where / "b.qmp")),
        "--storage",
        "non-shared",
        "--work-dir",
        str(where / "work"),
        "--json",
    ]
    try:
        child = await run_measured(argv, stderr_path=where / "stderr", deadline=60)
    except OSError:
        return None
    refused = child.returncode == 2 and b'"outcome": "refused"' in child.stdout
    return child.cpu_s * 1000.0 if refused else None


#: The command lines whose wall time is reported (each after ``python -m livemig``).
HELP_COMMANDS: tuple[tuple[str, ...], ...] = (("--help",), ("migrate", "--help"))


async def _help_times(base: Path, results: Results) -> None:
    """Wall time of each of :data:`HELP_COMMANDS`, :data:`_HELP_SAMPLES` runs each."""
    for args in HELP_COMMANDS:
        name = " ".join(("livemig", *args))
        for _ in range(_HELP_SAMPLES):
            try:
                child = await run_measured(
                    [sys.executable, "-m", "livemig", *args],
                    stderr_path=base / "help.stderr",
                    deadline=60,
                )
            except OSError:
                continue
            if child.returncode == 0:
                results.help_wall_ms.setdefault(name, []).append(child.wall_s * 1000.0)


async def environment() -> dict[str, Any]:
    async def first_line(*argv: str) -> str | None:
        try:
            result = await trio.run_process(
                list(argv), capture_stdout=True, capture_stderr=True, check=False
            )
        except OSError:
            return None
        lines = result.stdout.decode(errors="replace").strip().splitlines()
        return lines[0] if result.returncode == 0 and lines else None

    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": await first_line("qemu-system-x86_64", "--version"),
        "livemig_commit": await first_line(
            "git", "-C", str(REPO), "describe", "--always", "--dirty"
        ),
        "accel": "tcg",
    }


def describe(err: BaseException) -> str:
    """An error for the report; the leaves of an exception group, not the group."""
    if isinstance(err, BaseExceptionGroup):
        return "; ".join(describe(e) for e in err.exceptions)
    return f"{type(err).__name__}: {err}"


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _whole(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
