"""``python -m bench``: run the benchmark, write ``bench/results/<timestamp>.{md,json}``."""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import cast, get_args

import trio

from bench import cross_host, report
from bench.model import CROSS_HOST_VARIANTS, OPT_IN_VARIANTS, VARIANTS, Variant
from bench.runner import Config, Results, Saver, run_bench
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
        type=_list_of((*VARIANTS, *OPT_IN_VARIANTS, *CROSS_HOST_VARIANTS), "variant"),
        default=None,
        help="default: livemig,bare-qmp,lxd-equivalent,libvirt (the floor comes with livemig); "
        "livemig-stateful (--mode stateful-stop on the same lab) when named; "
        "with --cross-host: livemig-tls,livemig-plain,livemig-tunnel,libvirt-tls",
    )
    p.add_argument(
        "--cross-host",
        action="store_true",
        help="the realistic VM moved between the two network-namespace hosts of a test lab "
        "(veth link, sshd, test CA): livemig --to ssh:// with TLS, plain TCP and --tunnel ssh, "
        "against libvirt --p2p --tls between a daemon in each namespace",
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cross_host:
        return _cross_host(parser, args)
    if args.variants is None:
        args.variants = list(VARIANTS)
    if bad := [v for v in args.variants if v in CROSS_HOST_VARIANTS]:
        parser.error(f"{', '.join(bad)}: only with --cross-host")
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
    return _run(config, args.out, run_bench)


def _cross_host(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    variants = args.variants if args.variants is not None else list(CROSS_HOST_VARIANTS)
    if bad := [v for v in variants if v not in CROSS_HOST_VARIANTS]:
        parser.error(f"{', '.join(bad)}: not a cross-host variant")
    if args.scenario or args.load or args.memory or args.storage or args.list:
        parser.error("--cross-host runs its own scenario: " + cross_host.SCENARIO.describe)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    config = Config(
        runs=args.runs,
        scenarios=(cross_host.SCENARIO,),
        variants=tuple(v for v in CROSS_HOST_VARIANTS if v in variants),
        deadline_s=args.deadline,
        install=not args.no_install,
    )
    return _run(config, args.out, cross_host.run_cross_host)


def _run(
    config: Config, out: Path, bench: Callable[[Config, Results, Saver], Awaitable[None]]
) -> int:
    results = Results(config)
    stem = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")

    def save(r: Results) -> None:
        report.write(r, out, stem)

    code = 0
    try:
        trio.run(bench, config, results, save)
    except* KeyboardInterrupt:
        # Every QEMU, libvirtd and livemig child has been stopped on the way out.
        results.notes.append("interrupted (Ctrl-C): partial results")
        code = 130
    md, js = report.write(results, out, stem)
    print(report.markdown(results, with_runs=False))
    print(f"written: {md} and {js}", file=sys.stderr)
    return code
