"""``python -m bench``: run the benchmark, write ``bench/results/<timestamp>.{md,json}``."""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast, get_args

import trio

from bench import report
from bench.model import VARIANTS, Variant
from bench.runner import Config, Results, run_bench
from bench.scenarios import (
    LOADS,
    MEMORIES,
    REALISTIC_SCENARIOS,
    STORAGES,
    Load,
    Storage,
    select,
)

__all__ = ["main"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _list_of(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {bad}; choose from {', '.join(allowed)}"
            )
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark livemig against bare QMP, libvirt, an LXD-equivalent sequence "
        "and the loopback floor on the test guest.",
    )
    p.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    p.add_argument(
        "--scenario",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this scenario (repeatable; see --list); the realistic VM's "
        "(realistic-idle-1G-non-shared) runs only when named",
    )
    p.add_argument("--load", type=_list_of(LOADS, "load"), default=[], help="filter: idle,50,max")
    p.add_argument(
        "--memory",
        type=_list_of([str(m) for m in MEMORIES], "RAM size"),
        default=[],
        help="RAM sizes in MiB: 512,1024 (filters the full matrix)",
    )
    p.add_argument(
        "--storage",
        type=_list_of(STORAGES, "storage mode"),
        default=[],
        help="filter: non-shared,shared",
    )
    p.add_argument(
        "--variants",
        type=_list_of(VARIANTS, "variant"),
        default=list(VARIANTS),
        help="default: livemig,bare-qmp,lxd-equivalent,libvirt (the floor comes with livemig)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds a migration may take to converge (default 60)",
    )
    p.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get install libvirt when it is missing (skip it instead)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--list", action="store_true", help="list the selected scenarios and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scenarios = select(
            names=args.scenario,
            loads=cast(list[Load], args.load),
            memories=[int(m) for m in args.memory],
            storages=cast(list[Storage], args.storage),
        )
    except ValueError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    if args.list:
        for s in scenarios:
            print(f"{s.name:<28} {s.describe}")
        if not args.scenario:
            for s in REALISTIC_SCENARIOS:
                print(f"{s.name:<28} (only with --scenario {s.name}) {s.describe}")
        return 0
    if not scenarios or args.runs < 1:
        print("bench: nothing to run", file=sys.stderr)
        return 2
    variants = tuple(v for v in get_args(Variant) if v in args.variants)
    config = Config(
        runs=args.runs,
        scenarios=tuple(scenarios),
        variants=cast(tuple[Variant, ...], variants),
        deadline_s=args.deadline,
        install=not args.no_install,
    )
    results = Results(config)
    stem = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")

    def save(r: Results) -> None:
        report.write(r, args.out, stem)

    code = 0
    try:
        trio.run(run_bench, config, results, save)
    except* KeyboardInterrupt:
        # Every QEMU, libvirtd and livemig child has been stopped on the way out.
        results.notes.append("interrupted (Ctrl-C): partial results")
        code = 130
    md, js = report.write(results, args.out, stem)
    print(report.markdown(results, with_runs=False))
    print(f"written: {md} and {js}", file=sys.stderr)
    return code
