"""Medians per scenario x variant, the project's targets as PASS/FAIL, markdown and JSON."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import attrs

from bench.model import CROSS_HOST_VARIANTS, RunRecord
from bench.runner import Results
from bench.scenarios import Scenario

__all__ = [
    "TLS_PLAIN_FACTOR",
    "Cell",
    "TargetCheck",
    "check_targets",
    "cross_host_checks",
    "markdown",
    "summarize",
    "write",
]

_VARIANTS = (
    "livemig",
    "livemig-stateful",
    "bare-qmp",
    "lxd-equivalent",
    "libvirt",
    "floor",
    *CROSS_HOST_VARIANTS,
)
#: The peers livemig's total and downtime are shown as ratios to.
_PEERS = ("bare-qmp", "lxd-equivalent", "libvirt")
#: The wall-time limit for ``livemig --help`` and ``livemig migrate --help``.
HELP_LIMIT_MS = 150.0
#: The realistic VM's goal: livemig's total at most this times libvirt's.
REALISTIC_LIBVIRT_FACTOR = 0.7
_MIB = float(1 << 20)
#: The cross-host goal: livemig with TLS at most this times livemig over plain TCP (total).
TLS_PLAIN_FACTOR = 1.3


def _median(values: Iterable[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


@attrs.frozen
class Cell:
    """One scenario x variant: counts over every run, medians over the converged ones."""

    scenario: str
    variant: str
    runs: int
    ok: int
    not_converged: int
    failed: int
    with_violations: int
    total_ms: float | None
    downtime_ms: float | None
    gap_ms: float | None
    ram_bytes: float | None
    disk_bytes: float | None
    cpu_ms: float | None
    cpu_share: float | None
    #: The CPU share with the start-up CPU (median of the refused children) taken out.
    cpu_share_net: float | None = None
    #: From the start to the target's ``cont`` answered (livemig computed; bare-qmp's total).
    to_cont_ms: float | None = None
    #: livemig ``--to local``: the target's launch (``bench.livemig_run.launch_ms``), and the
    #: total with it (median of each run's sum).
    launch_ms: float | None = None
    total_with_launch_ms: float | None = None

    @classmethod
    def of(
        cls,
        scenario: str,
        variant: str,
        runs: Sequence[RunRecord],
        startup_ms: float | None = None,
    ) -> Cell:
        ok = [r for r in runs if r.converged]

        def med(get: Callable[[RunRecord], float | int | None]) -> float | None:
            return _median(get(r) for r in ok)

        return cls(
            scenario=scenario,
            variant=variant,
            runs=len(runs),
            ok=len(ok),
            not_converged=sum(r.status == "not-converged" for r in runs),
            failed=sum(r.status == "failed" for r in runs),
            with_violations=sum(bool(r.problems) for r in runs),
            total_ms=med(lambda r: r.total_ms),
            downtime_ms=med(lambda r: r.downtime_ms),
            gap_ms=med(lambda r: r.heartbeat_gap_ms),
            ram_bytes=med(lambda r: r.ram_bytes),
            disk_bytes=med(lambda r: r.disk_bytes),
            cpu_ms=med(lambda r: r.cpu_ms),
            cpu_share=med(lambda r: r.cpu_share),
            cpu_share_net=med(lambda r: r.cpu_share_net(startup_ms)),
            to_cont_ms=med(lambda r: r.to_cont_ms),
            launch_ms=med(_launch_ms),
            total_with_launch_ms=med(
                lambda r: (
                    None
                    if r.total_ms is None or (launch := _launch_ms(r)) is None
                    else r.total_ms + launch
                )
            ),
        )


def _launch_ms(r: RunRecord) -> float | None:
    value = r.detail.get("launch_ms")
    return float(value) if isinstance(value, int | float) else None


def summarize(
    records: Sequence[RunRecord], startup_ms: float | None = None
) -> dict[tuple[str, str], Cell]:
    """Cells per scenario x variant; ``startup_ms`` is taken out of the net CPU shares."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.scenario, r.variant), []).append(r)
    return {key: Cell.of(key[0], key[1], runs, startup_ms) for key, runs in groups.items()}


def startup_ms(results: Results) -> float | None:
    """Median CPU of the refused ``livemig migrate`` children (Python start-up and imports)."""
    return _median(results.startup_cpu_ms)


@attrs.frozen
class TargetCheck:
    target: str
    scenario: str
    livemig: str
    reference: str
    verdict: str  # PASS, FAIL or n/a
    note: str = ""


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def _compare(
    target: str,
    scenario: str,
    mine: float | None,
    theirs: float | None,
    factor: float,
    *,
    ref_name: str,
    ref_cell: Cell | None,
    fmt: Callable[[float | None], str] = _ms,
) -> TargetCheck:
    """``mine ≤ factor x theirs``."""
    ref_text = f"{'' if factor == 1 else f'{factor:g} x '}{ref_name} {fmt(theirs)}"
    if mine is None:
        return TargetCheck(target, scenario, "-", ref_text, "FAIL", "livemig never converged")
    if theirs is None:
        if ref_cell is not None and ref_cell.runs and ref_cell.ok == 0 and ref_cell.not_converged:
            note = f"{ref_name} never converged within the deadline"
            return TargetCheck(target, scenario, fmt(mine), ref_text, "PASS", note)
        return TargetCheck(target, scenario, fmt(mine), ref_text, "n/a", f"no {ref_name} figure")
    ratio = mine / theirs if theirs else float("inf")
    verdict = "PASS" if mine <= factor * theirs else "FAIL"
    return TargetCheck(target, scenario, fmt(mine), ref_text, verdict, f"ratio {ratio:.2f}")


def check_targets(
    cells: dict[tuple[str, str], Cell], scenarios: Sequence[Scenario]
) -> list[TargetCheck]:
    checks: list[TargetCheck] = []
    for sc in scenarios:
        name = sc.name
        lm = cells.get((name, "livemig"))
        if lm is None:
            continue
        lxd = cells.get((name, "lxd-equivalent"))
        lv = cells.get((name, "libvirt"))
        fl = cells.get((name, "floor"))
        bare = cells.get((name, "bare-qmp"))

        def val(cell: Cell | None, get: Callable[[Cell], float | None]) -> float | None:
            return None if cell is None else get(cell)

        checks.append(
            TargetCheck(
                "every run finalized, invariants held",
                name,
                f"{lm.ok}/{lm.runs} finalized, {lm.with_violations} with violations",
                "",
                "PASS" if lm.ok == lm.runs and lm.with_violations == 0 else "FAIL",
            )
        )
        if bare is not None:
            checks.append(
                _compare(
                    "total ≤ 1.15 x bare-qmp (start → target cont)",
                    name,
                    lm.to_cont_ms,
                    bare.total_ms,
                    1.15,
                    ref_name="bare-qmp",
                    ref_cell=bare,
                )
            )
            checks.append(
                _compare(
                    "downtime ≤ 1.1 x bare-qmp",
                    name,
                    lm.downtime_ms,
                    bare.downtime_ms,
                    1.1,
                    ref_name="bare-qmp",
                    ref_cell=bare,
                )
            )
        if lv is not None:
            checks.append(
                _compare(
                    "total ≤ libvirt",
                    name,
                    lm.total_ms,
                    lv.total_ms,
                    1,
                    ref_name="libvirt",
                    ref_cell=lv,
                )
            )
        if lv is not None and sc.realistic:
            checks.append(
                _compare(
                    f"total ≤ {REALISTIC_LIBVIRT_FACTOR:g} x libvirt",
                    name,
                    lm.total_ms,
                    lv.total_ms,
                    REALISTIC_LIBVIRT_FACTOR,
                    ref_name="libvirt",
                    ref_cell=lv,
                )
            )
            if lm.total_with_launch_ms is not None:
                checks.append(
                    _compare(
                        f"total + target launch ≤ {REALISTIC_LIBVIRT_FACTOR:g} x libvirt "
                        "(libvirt's total starts its target QEMU too)",
                        name,
                        lm.total_with_launch_ms,
                        lv.total_ms,
                        REALISTIC_LIBVIRT_FACTOR,
                        ref_name="libvirt",
                        ref_cell=lv,
                    )
                )
        if lxd is not None and sc.load in ("idle", "50"):
            checks.append(
                _compare(
                    "total ≤ 0.6 x lxd-equivalent",
                    name,
                    lm.total_ms,
                    lxd.total_ms,
                    0.6,
                    ref_name="lxd-equivalent",
                    ref_cell=lxd,
                )
            )
        if fl is not None:
            checks.append(
                _compare(
                    "total ≤ 1.5 x floor",
                    name,
                    lm.total_ms,
                    val(fl, lambda c: c.total_ms),
                    1.5,
                    ref_name="floor",
                    ref_cell=fl,
                )
            )
        if lv is not None:
            checks.append(
                _compare(
                    "downtime ≤ libvirt",
                    name,
                    lm.downtime_ms,
                    lv.downtime_ms,
                    1,
                    ref_name="libvirt",
                    ref_cell=lv,
                )
            )
        if sc.load == "idle":
            checks.append(
                _compare(
                    "heartbeat gap ≤ 150 ms",
                    name,
                    lm.gap_ms,
                    150.0,
                    1,
                    ref_name="limit",
                    ref_cell=None,
                )
            )
        if lxd is not None:
            checks.append(
                _compare(
                    "heartbeat gap ≤ 0.3 x lxd-equivalent",
                    name,
                    lm.gap_ms,
                    lxd.gap_ms,
                    0.3,
                    ref_name="lxd-equivalent",
                    ref_cell=lxd,
                )
            )
        checks.append(
            _compare(
                "CPU ≤ 5 % of wall (start-up excluded)",
                name,
                lm.cpu_share_net,
                0.05,
                1,
                ref_name="limit",
                ref_cell=None,
                fmt=_pct,
            )
        )
    return checks


def help_checks(help_wall_ms: Mapping[str, Sequence[float]]) -> list[TargetCheck]:
    """``livemig --help`` and ``livemig migrate --help``: median wall ≤ :data:`HELP_LIMIT_MS`."""
    return [
        _compare(
            f"`{command}` wall ≤ {HELP_LIMIT_MS:.0f} ms",
            f"median of {len(times)}",
            _median(times),
            HELP_LIMIT_MS,
            1,
            ref_name="limit",
            ref_cell=None,
        )
        for command, times in help_wall_ms.items()
    ]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f} %"


def _num(v: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if v is None else f"{v / scale:.{digits}f}"


def medians_table(results: Results, cells: dict[tuple[str, str], Cell]) -> list[str]:
    lines = [
        "| scenario | variant | converged | total ms | to target cont ms | downtime ms "
        "| heartbeat gap ms | RAM MiB | disk MiB | livemig CPU ms (share of wall: raw; "
        "start-up excluded) |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for sc in results.config.scenarios:
        for variant in _VARIANTS:
            cell = cells.get((sc.name, variant))
            if cell is None:
                if variant in results.skipped:
                    lines.append(f"| {sc.name} | {variant} | skipped | | | | | | | |")
                continue
            counts = f"{cell.ok}/{cell.runs}"
            if cell.not_converged:
                counts += f" ({cell.not_converged} not converged)"
            if cell.failed:
                counts += f" ({cell.failed} failed)"
            if cell.with_violations:
                counts += f" ⚠ {cell.with_violations} with violations"
            cpu = (
                f"{cell.cpu_ms:.0f} ({_pct(cell.cpu_share)}; {_pct(cell.cpu_share_net)})"
                if cell.cpu_ms is not None
                else ""
            )
            lines.append(
                f"| {sc.name} | {variant} | {counts} | {_num(cell.total_ms)} "
                f"| {_num(cell.to_cont_ms)} | {_num(cell.downtime_ms)} | {_num(cell.gap_ms)} "
                f"| {_num(cell.ram_bytes, _MIB, 1)} | {_num(cell.disk_bytes, _MIB, 1)} | {cpu} |"
            )
    return lines


def stateful_table(results: Results, cells: dict[tuple[str, str], Cell]) -> list[str]:
    """A stateful stop against the live route on the same scenario (when it was run): the
    guest's downtime (``stop`` to ``cont``) and heartbeat gap, and the total, as ratios."""
    rows = []
    for sc in results.config.scenarios:
        live, stop = cells.get((sc.name, "livemig")), cells.get((sc.name, "livemig-stateful"))
        if live is None or stop is None:
            continue
        rows.append(
            f"| {sc.name} | {_num(stop.downtime_ms)} / {_num(live.downtime_ms)} "
            f"({_ratio(stop.downtime_ms, live.downtime_ms)}) | {_num(stop.gap_ms)} / "
            f"{_num(live.gap_ms)} ({_ratio(stop.gap_ms, live.gap_ms)}) | {_num(stop.total_ms)} / "
            f"{_num(live.total_ms)} ({_ratio(stop.total_ms, live.total_ms)}) |"
        )
    if not rows:
        return []
    return [
        "## Stateful stop against live (medians: stateful / live, ratio)",
        "",
        "| scenario | downtime ms | heartbeat gap ms | total ms |",
        "|---|--:|--:|--:|",
        *rows,
        "",
    ]


def _ratio(mine: float | None, theirs: float | None) -> str:
    if mine is None or theirs is None or theirs == 0:
        return "-"
    return f"{mine / theirs:.2f}"


def ratios_table(results: Results, cells: dict[tuple[str, str], Cell]) -> list[str]:
    """livemig's medians over each peer's: total (each variant's own measure), start → target
    cont (livemig's computed, over bare-qmp's total), downtime, heartbeat gap."""
    head = "| scenario | figure |" + "".join(f" / {p} |" for p in _PEERS)
    lines = [head, "|---|---|" + "--:|" * len(_PEERS)]
    for sc in results.config.scenarios:
        lm = cells.get((sc.name, "livemig"))
        if lm is None:
            continue
        peers = [cells.get((sc.name, p)) for p in _PEERS]
        rows: list[tuple[str, Callable[[Cell], float | None], Callable[[Cell], float | None]]] = [
            ("total", lambda c: c.total_ms, lambda c: c.total_ms),
            ("start → target cont", lambda c: c.to_cont_ms, lambda c: c.to_cont_ms),
            ("downtime", lambda c: c.downtime_ms, lambda c: c.downtime_ms),
            ("heartbeat gap", lambda c: c.gap_ms, lambda c: c.gap_ms),
        ]
        for figure, mine, theirs in rows:
            cols = "".join(
                f" {_ratio(mine(lm), None if p is None else theirs(p))} |" for p in peers
            )
            lines.append(f"| {sc.name} | {figure} |{cols}")
    return lines


def targets_table(checks: Sequence[TargetCheck]) -> list[str]:
    lines = [
        "| target | scenario | livemig | reference | verdict | note |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c.target} | {c.scenario} | {c.livemig} | {c.reference} | **{c.verdict}** | {c.note} |"
        for c in checks
    ]
    passed = sum(c.verdict == "PASS" for c in checks)
    failed = sum(c.verdict == "FAIL" for c in checks)
    lines.append("")
    lines.append(f"{passed} PASS, {failed} FAIL, {len(checks) - passed - failed} n/a")
    return lines


#: livemig's states whose durations add up to "``migrate`` answered": connecting and prechecks
#: (idle), capabilities (connected), snapshot (capabilities-set), base copy and mirror
#: (snapshotted), ``migrate-incoming`` + ``migrate`` (mirroring).
_BEFORE_RAM = ("idle", "connected", "capabilities-set", "snapshotted", "mirroring")
_SPLIT = ("to migrate answered", "RAM until pre-switchover", "pre-switchover → cont", "after cont")


def phase_split(r: RunRecord) -> dict[str, float] | None:
    """Where one converged livemig or bare-qmp run spent its time, in :data:`_SPLIT` order
    ("after cont": livemig's stats, quit and clean-up inside its total; bare-qmp's, off its
    clock, up to the source's ``quit`` answered)."""
    ph = r.detail.get("phases_ms")
    if not r.converged or not isinstance(ph, dict) or r.total_ms is None:
        return None
    parts: tuple[float | None, ...]
    try:
        if r.variant == "livemig":
            cont = r.to_cont_ms
            window = [e for e in r.detail.get("switchover") or [] if e[1] == "← target cont"]
            if cont is None or not window:
                return None
            before = sum(float(ph.get(s, 0.0)) for s in _BEFORE_RAM)
            parts = (before, float(ph["state-transfer"]), float(window[-1][0]), r.total_ms - cont)
        elif r.variant == "bare-qmp":
            migrate = float(ph["← source migrate"])
            paused = float(ph["source pre-switchover event received"])
            quit_ms = r.detail.get("to_quit_ms")
            after = float(quit_ms) - r.total_ms if isinstance(quit_ms, int | float) else None
            parts = (migrate, paused - migrate, r.total_ms - paused, after)
        else:
            return None
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return {k: v for k, v in zip(_SPLIT, parts, strict=True) if v is not None}


def split_table(results: Results) -> list[str]:
    """Medians of :func:`phase_split` per scenario, livemig beside bare-qmp (each column its
    own median: they need not add up to the total's)."""
    lines = [
        "| scenario | variant | " + " | ".join(f"{k} ms" for k in _SPLIT) + " | runs |",
        "|---|---|" + "--:|" * (len(_SPLIT) + 1),
    ]
    for sc in results.config.scenarios:
        for variant in ("livemig", "bare-qmp"):
            splits = [
                p
                for r in results.records
                if r.scenario == sc.name and r.variant == variant
                if (p := phase_split(r)) is not None
            ]
            if not splits:
                continue
            cols = " | ".join(_num(_median(p.get(k) for p in splits)) for k in _SPLIT)
            lines.append(f"| {sc.name} | {variant} | {cols} | {len(splits)} |")
    return lines


def _window_run(records: Sequence[RunRecord], scenario: str, variant: str) -> RunRecord | None:
    """The converged run of median downtime (the lower median), else the first converged."""
    runs = [
        r
        for r in records
        if r.scenario == scenario
        and r.variant == variant
        and r.converged
        and isinstance(r.detail.get("switchover"), list)
        and r.detail["switchover"]
    ]
    if not runs:
        return None
    timed = sorted((r for r in runs if r.downtime_ms is not None), key=lambda r: r.downtime_ms or 0)
    return timed[(len(timed) - 1) // 2] if timed else runs[0]


def switchover_section(results: Results) -> list[str]:
    """Per scenario, the median-downtime run's switchover window, livemig's and bare-qmp's:
    ms from the source's pre-switchover event received (0) to the target's cont answered."""
    lines: list[str] = []
    for sc in results.config.scenarios:
        for variant in ("livemig", "bare-qmp"):
            run = _window_run(results.records, sc.name, variant)
            if run is None:
                continue
            lines.append(
                f"**{sc.name}**, {variant} (rep {run.rep}, downtime {_num(run.downtime_ms)} ms):"
            )
            lines.append("")
            lines.append("```")
            for entry in run.detail["switchover"]:
                if isinstance(entry, list) and len(entry) == 2:
                    lines.append(f"{entry[0]:>9.1f}  {entry[1]}")
            lines.append("```")
            lines.append("")
            if isinstance(phases := run.detail.get("phases_ms"), dict) and phases:
                how = "ms in each state" if variant == "livemig" else "ms since the first command"
                steps = ", ".join(f"{k} {v}" for k, v in phases.items())
                lines += [f"Phases ({how}): {steps}.", ""]
    return lines or ["- no converged run with a switchover timeline"]


def notes(results: Results) -> list[str]:
    out = [f"- {reason}" for reason in results.skipped.values()]
    if (startup := startup_ms(results)) is not None:
        out.append(
            f"- Start-up: a `livemig migrate --json` refused at its first connect (two unix "
            f"socket files nobody listens on), after every import a migration loads, uses "
            f"{startup:.0f} ms of CPU on the idle machine (median of "
            f"{len(results.startup_cpu_ms)}). It is part of livemig's raw CPU figure. Each "
            "livemig run also measures it in its own lab, the guest running as during the "
            "migration, just before migrating; the start-up-excluded share is (CPU - that "
            "run's start-up) / wall (the idle figure where a run has none), and the CPU target "
            "uses it."
        )
        loaded: dict[str, list[float]] = {}
        for r in results.records:
            if r.variant == "livemig" and r.startup_cpu_ms is not None:
                loaded.setdefault(r.scenario, []).append(r.startup_cpu_ms)
        if loaded:
            per = ", ".join(f"{k} {_num(_median(v))} ms" for k, v in loaded.items())
            out.append(f"- Start-up CPU under each scenario's load (median over its runs): {per}.")
    for command, times in results.help_wall_ms.items():
        median = _median(times)
        out.append(
            f"- `{command}`: median wall {_num(median)} ms over {len(times)} runs "
            f"(min {_num(min(times))}, max {_num(max(times))}), `python -m livemig` from the venv."
        )
    if any(r.variant == "bare-qmp" for r in results.records):
        out.append(
            "- Totals: bare-qmp's is from its first QMP command to the target's `cont` answered "
            "(monitors connected beforehand, not counted); livemig's `total` is its own "
            "`total_ms`, from its start (connecting both monitors, prechecks) to `finalized` "
            "(after the source's statistics, `quit` and file removal). livemig's 'to target "
            "cont' is from its start to the target's `cont` answered (from its result: the time "
            "it entered pre-switchover plus the window's `← target cont`); it still includes "
            "connecting the monitors and the prechecks, which bare-qmp does not do. The "
            "1.15 x bare-qmp target compares that figure with bare-qmp's total."
        )
    out += [f"- {n}" for n in _realistic_notes(results)]
    floors = [r.detail.get("bytes_per_s") for r in results.records if r.variant == "floor"]
    rate = _median(f for f in floors if isinstance(f, int | float))
    if rate is not None:
        out.append(f"- Floor: unix socket stream throughput, median {rate / 1e6:.0f} MB/s.")
    out += [f"- {n}" for n in results.notes]
    return out


def _realistic_notes(results: Results) -> list[str]:
    """How the realistic scenario's variants differ, and livemig's launch and disk figures."""
    scenarios = [s for s in results.config.scenarios if s.realistic]
    if not scenarios:
        return []
    out = [
        "Realistic VM: livemig runs `--to local` (no `--target-qmp`: it launches the target "
        "from the source's command line itself); bare-qmp and lxd-equivalent get a target "
        "started beforehand by the bench from the same spec, libvirt starts its own. "
        "livemig's `total_ms` starts after its launch; libvirt's `time_elapsed` includes "
        "starting the destination QEMU (its Prepare phase), bare-qmp's and lxd-equivalent's "
        "totals start with the target already running. The row 'total + target launch' adds "
        "the launch as the bench sees it (the target QEMU's process start to livemig's first "
        "state event).",
    ]
    for sc in scenarios:
        cells = summarize([r for r in results.records if r.scenario == sc.name])
        lm = cells.get((sc.name, "livemig"))
        if lm is not None and lm.launch_ms is not None:
            out.append(
                f"{sc.name}: livemig's target launch, median {_num(lm.launch_ms)} ms; total "
                f"with it {_num(lm.total_with_launch_ms)} ms."
            )
    return out


def _runs_table(records: Sequence[RunRecord]) -> list[str]:
    lines = [
        "| # | rep | scenario | variant | status | total ms | downtime ms | gap ms | RAM MiB "
        "| disk MiB | CPU ms | load avg | notes |",
        "|--:|--:|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for i, r in enumerate(records, 1):
        note = (
            "; ".join([*(["VIOLATION: " + p for p in r.problems]), *([r.error] if r.error else [])])
            .replace("|", "/")
            .replace("\n", " ")
        )
        lines.append(
            f"| {i} | {r.rep} | {r.scenario} | {r.variant} | {r.status} | {_num(r.total_ms)} "
            f"| {_num(r.downtime_ms)} | {_num(r.heartbeat_gap_ms)} "
            f"| {_num(r.ram_bytes, _MIB, 1)} | {_num(r.disk_bytes, _MIB, 1)} "
            f"| {_num(r.cpu_ms)} | {_num(r.loadavg, 1, 2)} | {note[:400]} |"
        )
    return lines


def _cross_host(results: Results) -> bool:
    return any(v in CROSS_HOST_VARIANTS for v in results.config.variants)


def cross_host_checks(
    cells: Mapping[tuple[str, str], Cell], scenarios: Sequence[Scenario]
) -> list[TargetCheck]:
    """The cross-host goals: TLS ≤ 1.3x plain on total time; livemig with TLS ≤ libvirt with
    TLS on total time and downtime. A goal with a missing side is n/a, not a pass."""
    checks: list[TargetCheck] = []
    for sc in scenarios:
        tls = cells.get((sc.name, "livemig-tls"))
        plain = cells.get((sc.name, "livemig-plain"))
        libvirt = cells.get((sc.name, "libvirt-tls"))

        def check(
            target: str,
            *,
            mine: float | None,
            theirs: float | None,
            factor: float,
            note: str,
            scenario: str = sc.name,
        ) -> TargetCheck:
            if mine is None or theirs is None:
                verdict = "n/a"
            else:
                verdict = "PASS" if mine <= factor * theirs else "FAIL"
            return TargetCheck(
                target=target,
                scenario=scenario,
                livemig=_num(mine),
                reference=f"{factor:g} x {_num(theirs)}",
                verdict=verdict,
                note=f"{note}; ratio {_ratio(mine, theirs)}",
            )

        checks += [
            check(
                "TLS total ≤ 1.3x plain",
                mine=None if tls is None else tls.total_ms,
                theirs=None if plain is None else plain.total_ms,
                factor=TLS_PLAIN_FACTOR,
                note="livemig-tls over livemig-plain, ms",
            ),
            check(
                "TLS total ≤ libvirt TLS",
                mine=None if tls is None else tls.total_ms,
                theirs=None if libvirt is None else libvirt.total_ms,
                factor=1.0,
                note="livemig-tls over libvirt-tls, ms",
            ),
            check(
                "TLS downtime ≤ libvirt TLS",
                mine=None if tls is None else tls.downtime_ms,
                theirs=None if libvirt is None else libvirt.downtime_ms,
                factor=1.0,
                note="livemig-tls over libvirt-tls, ms",
            ),
        ]
    return checks


def cross_host_table(results: Results, cells: Mapping[tuple[str, str], Cell]) -> list[str]:
    """Each cross-host variant's medians and its ratio to livemig-plain and to libvirt-tls."""
    lines = [
        "| variant | converged | total ms | downtime ms | heartbeat gap ms | total / plain "
        "| total / libvirt-tls | downtime / libvirt-tls |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for sc in results.config.scenarios:
        plain = cells.get((sc.name, "livemig-plain"))
        libvirt = cells.get((sc.name, "libvirt-tls"))
        for variant in CROSS_HOST_VARIANTS:
            cell = cells.get((sc.name, variant))
            if cell is None:
                if variant in results.skipped:
                    lines.append(f"| {variant} | skipped: {results.skipped[variant]} | | | | | | |")
                continue
            lines.append(
                f"| {variant} | {cell.ok}/{cell.runs} | {_num(cell.total_ms)} "
                f"| {_num(cell.downtime_ms)} | {_num(cell.gap_ms)} "
                f"| {_ratio(cell.total_ms, None if plain is None else plain.total_ms)} "
                f"| {_ratio(cell.total_ms, None if libvirt is None else libvirt.total_ms)} "
                f"| {_ratio(cell.downtime_ms, None if libvirt is None else libvirt.downtime_ms)} |"
            )
    return lines


def _cross_host_markdown(results: Results, *, with_runs: bool) -> str:
    cells = summarize(results.records, startup_ms(results))
    env = results.environment
    cfg = results.config
    parts = [
        f"# livemig cross-host benchmark — {results.started_utc}",
        "",
        f"{cfg.runs} repetitions; in each, every variant in turn (the order rotates per "
        "repetition), each on a freshly booted realistic VM (TCG) in the source namespace, "
        f"moved to the target namespace. Medians over the runs that converged within the "
        f"{cfg.deadline_s:.0f} s deadline.",
        "",
        f"Host: {env.get('cpus')} CPUs, kernel {env.get('kernel')}, {env.get('qemu')}, "
        f"libvirt: {env.get('libvirt', 'not used')}, livemig {env.get('livemig_commit')}; "
        f"link: {env.get('link')}.",
    ]
    if not results.finished:
        parts += ["", "**Partial results: the run did not finish.**"]
    parts += [
        "",
        "## Across the link",
        "",
        *cross_host_table(results, cells),
        "",
        "## Goals",
        "",
        *targets_table(cross_host_checks(cells, cfg.scenarios)),
        "",
        "## Notes",
        "",
        *([f"- {n}" for n in results.notes] or ["- none"]),
    ]
    if with_runs:
        parts += ["", "## Every run", "", *_runs_table(results.records)]
    return "\n".join(parts) + "\n"


def markdown(results: Results, *, with_runs: bool = True) -> str:
    if _cross_host(results):
        return _cross_host_markdown(results, with_runs=with_runs)
    cells = summarize(results.records, startup_ms(results))
    checks = [
        *check_targets(cells, results.config.scenarios),
        *help_checks(results.help_wall_ms),
    ]
    env = results.environment
    cfg = results.config
    head = [
        f"# livemig benchmark — {results.started_utc}",
        "",
        f"{cfg.runs} repetitions; in each, every scenario runs every variant in turn (the order "
        f"rotates per repetition), each on a freshly booted test guest (TCG). Medians over the "
        f"runs that converged within the {cfg.deadline_s:.0f} s deadline.",
        "",
        f"Host: {env.get('cpus')} CPUs, kernel {env.get('kernel')}, {env.get('qemu')}, "
        f"libvirt: {env.get('libvirt', 'not used')}, livemig {env.get('livemig_commit')}.",
    ]
    if not results.finished:
        head += ["", "**Partial results: the run did not finish.**"]
    scen = [f"- `{s.name}`: {s.describe}" for s in cfg.scenarios]
    parts = [
        *head,
        "",
        "## Scenarios",
        "",
        *scen,
        "",
        "## Medians",
        "",
        *medians_table(results, cells),
        "",
        "## livemig over each peer (ratios of medians)",
        "",
        *ratios_table(results, cells),
        "",
        *stateful_table(results, cells),
        "## Where the time goes: livemig and bare-qmp (medians)",
        "",
        "livemig's first column includes connecting its monitors and the prechecks; bare-qmp's "
        "starts at its first command. 'after cont' is inside livemig's total, outside "
        "bare-qmp's.",
        "",
        *split_table(results),
        "",
        "## Targets",
        "",
        *targets_table(checks),
        "",
        "## Notes",
        "",
        *(notes(results) or ["- none"]),
        "",
        "## Switchover windows (median-downtime run)",
        "",
        "ms from the source's pre-switchover event received (0) to the target's `cont` "
        "answered; a negative first entry is when QEMU stamped the event (the guest paused). "
        "`→`/`←`: a command sent/answered.",
        "",
        *switchover_section(results),
    ]
    if with_runs:
        parts += ["", "## Every run", "", *_runs_table(results.records)]
    return "\n".join(parts) + "\n"


def write(results: Results, directory: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    md = directory / f"{stem}.md"
    js = directory / f"{stem}.json"
    md.write_text(markdown(results))
    cells = summarize(results.records, startup_ms(results))
    payload = results.to_json()
    payload["startup_ms"] = startup_ms(results)
    payload["medians"] = [attrs.asdict(c) for c in cells.values()]
    checks = (
        cross_host_checks(cells, results.config.scenarios)
        if _cross_host(results)
        else [
            *check_targets(cells, results.config.scenarios),
            *help_checks(results.help_wall_ms),
        ]
    )
    payload["targets"] = [attrs.asdict(c) for c in checks]
    js.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return md, js
