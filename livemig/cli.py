"""The ``livemig`` command. Exit codes (a stable contract):

====  =====================================================================
 0    finalized: the guest runs on the target
 2    usage or input error: a clear message, nothing touched
 3    reverted: the guest runs on the source with every write it made
 4    failed: needs attention; the report says what is where
130   interrupted by SIGINT/SIGTERM (after a clean revert)
====  =====================================================================
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livemig.fsm.events import Event, MigrationResult, Outcome
from livemig.fsm.machine import StorageChoice, StorageMode, TransferChoice
from livemig.transports.errors import LivemigError, UsageError

if TYPE_CHECKING:
    # Building the parser (``--help``) needs none of these; each command imports what it runs
    # (trio, qemu.qmp, rich) in its own function, which keeps start-up under 150 ms.
    import trio

    from livemig._display import HumanDisplay, JsonLines
    from livemig.fsm.plan import Deadlines, Plan, Policy
    from livemig.remote import RemoteOptions

#: libvirt's and QEMU's place for a host's x509 credentials (``--tls-dir``'s default).
_DEFAULT_TLS_DIR = "/etc/pki/qemu"

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_REVERTED", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REVERTED = 3
EXIT_FAILED = 4
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="livemig", description="Live-migrate a running QEMU guest.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    mig = sub.add_parser("migrate", help="migrate a running guest to a target QEMU")
    mig.add_argument("--source-qmp", required=True, type=Path, help="source QMP socket")
    mig.add_argument(
        "--to",
        metavar="local|ssh://[USER@]HOST[:PORT]",
        help="launch the target from the source's command line on this host (local, the "
        "default without --target-qmp) or on another one, over ssh",
    )
    mig.add_argument(
        "--target-dir",
        type=Path,
        help="with --to: the target's images, sockets and log, on its host (default: "
        "WORK_DIR/target-RUN_ID)",
    )
    mig.add_argument(
        "--tls-dir",
        type=Path,
        help="QEMU x509 credentials (ca-cert.pem, server-*.pem, client-*.pem), the same path on "
        "both hosts: TLS on the RAM stream and the disk copy (default with --to ssh://: "
        f"{_DEFAULT_TLS_DIR} when it exists)",
    )
    mig.add_argument(
        "--tls-hostname",
        metavar="NAME",
        help="the name the target's certificate must carry (default: the address dialled)",
    )
    mig.add_argument(
        "--tunnel",
        choices=("ssh",),
        help="with --to ssh://: carry the RAM stream and the disk copy through ssh (no port "
        "opened; slower)",
    )
    mig.add_argument("--ssh-config", type=Path, help="an OpenSSH client config (ssh -F)")
    mig.add_argument(
        "--link-timeout",
        type=_positive_int,
        default=15,
        metavar="S",
        help="with --to ssh://: revert when the target's host stays unreachable this long, "
        "before the point of no return (default 15 s)",
    )
    mig.add_argument(
        "--postcopy-recover-timeout",
        type=_positive_int,
        default=300,
        metavar="S",
        help="with --postcopy: how long to try resuming a post-copy a broken link paused before "
        "ending failed, both QEMUs kept (default 300 s)",
    )
    mig.add_argument(
        "--remote-livemig",
        default="livemig",
        metavar="COMMAND",
        help="the livemig command on the target host (default: livemig)",
    )
    mig.add_argument(
        "--nbd", help="with --target-qmp: where the target serves the disk copy (default: unix)"
    )
    mig.add_argument(
        "--target-qmp",
        type=Path,
        help="a target you started (same devices, -S and -incoming defer): its QMP socket",
    )
    mig.add_argument(
        "--storage",
        choices=[m.value for m in StorageChoice],
        default=StorageChoice.AUTO.value,
        help="shared: the target opens the same images; non-shared: copy every disk; auto "
        "(default): per disk, copy those the target does not open as the same file",
    )
    mig.add_argument(
        "--mode",
        choices=[m.value for m in TransferChoice],
        default=TransferChoice.AUTO.value,
        help="live: RAM streams while the guest runs; stateful-stop: pause the guest, save its "
        "state to a file in the work dir and restore it on the target; auto (default): live, "
        "and a stateful stop when live transfer is impossible (a migration blocker on the "
        "source: the result's 'fallback' says which)",
    )
    mig.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="NAME",
        help="move only this disk (repeatable): block node, -drive id or device id (default: "
        "every disk; one left out must be shared)",
    )
    mig.add_argument(
        "--work-dir",
        type=Path,
        default=default_work_dir(),
        help="for the overlay, sockets and journal (default: %(default)s)",
    )
    mig.add_argument(
        "--migrate-uri", help="where the target listens for RAM (default: unix socket)"
    )
    mig.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain TCP off this host (guest memory in the clear)",
    )
    _common_args(mig)

    demo = sub.add_parser(
        "demo", help="boot a realistic VM and migrate it to a target livemig launches"
    )
    _storage_arg(demo, required=False)
    demo.add_argument("--dirty-mib-s", default="0", help="guest RAM dirtying rate, MiB/s or 'max'")
    demo.add_argument("--memory-mib", type=int, default=1024, help="guest RAM (default 1024)")
    demo.add_argument("--accel", choices=("tcg", "kvm"), default="tcg", help="default tcg")
    demo.add_argument("--work-dir", type=Path, help="keep the run's files here (default: temp)")
    _common_args(demo)

    rec = sub.add_parser(
        "recover", help="after livemig crashed: bring each journalled run to a safe end"
    )
    rec.add_argument(
        "--work-dir", type=Path, default=default_work_dir(), help="default: %(default)s"
    )
    rec.add_argument("--json", action="store_true", help="JSON lines on stdout")
    rec.add_argument(
        "--step-timeout",
        type=_positive_int,
        default=60,
        metavar="S",
        help="seconds each connect, QMP command and undo step may take (default 60)",
    )

    faults = sub.add_parser(
        "faults", help="run a fault-injection campaign and report whether every invariant held"
    )
    faults.add_argument(
        "--real",
        action="store_true",
        help="on real QEMU with the test guest: every fault kind at every state it applies to",
    )
    faults.add_argument(
        "--runs", type=_positive_int, default=200, help="fake campaign: fault plans to run"
    )
    faults.add_argument("--seed", type=_nonnegative_int, default=0, help="reproduces a campaign")
    faults.add_argument(
        "--storage", choices=[m.value for m in StorageMode], help="only this storage mode"
    )
    faults.add_argument(
        "--only", metavar="TEXT", help="real campaign: only cases whose name contains TEXT"
    )
    faults.add_argument(
        "--report",
        type=Path,
        default=Path("livemig-faults.json"),
        help="JSON report (default: %(default)s)",
    )

    tgt = sub.add_parser(
        "target-command",
        help="print the command line of a migration target for a running source QEMU",
    )
    tgt.add_argument("--source-qmp", required=True, type=Path, help="source QMP socket")
    tgt.add_argument(
        "--target-dir",
        type=Path,
        help="the target's disk images and sockets (not created; default: 'target' beside "
        "the source's QMP socket)",
    )
    tgt.add_argument(
        "--target-qmp", type=Path, help="the target's QMP socket (default: in the target dir)"
    )

    agent = sub.add_parser(
        "remote-target",
        help="(run by livemig over ssh on a target host) check it, launch or remove a target",
    )
    agent.add_argument("action", choices=("probe", "launch", "remove", "unrelay"))

    diag = sub.add_parser("diagram", help="draw the migration machine")
    diag.add_argument("--format", choices=("svg", "mermaid", "dot"), default="svg")
    diag.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    diag.add_argument(
        "--trace",
        type=Path,
        metavar="REPORT",
        help="highlight the path of one run: a `livemig migrate --json` output or result line",
    )
    return parser


def _storage_arg(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--storage",
        choices=[m.value for m in StorageMode],
        required=required,
        default=None if required else StorageMode.NON_SHARED.value,
        help="shared: both QEMUs open one image; non-shared: copy the disk",
    )


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout")
    parser.add_argument(
        "--max-bandwidth",
        type=_nonnegative_int,
        default=0,
        metavar="MIB_S",
        help="cap the migration at this many MiB/s (default 0: no cap)",
    )
    parser.add_argument(
        "--downtime-limit", type=_positive_int, default=300, metavar="MS", help="default 300 ms"
    )
    parser.add_argument(
        "--max-downtime",
        type=_positive_int,
        default=1000,
        metavar="MS",
        help="how far a stalled migration may raise the downtime limit (default 1000 ms)",
    )
    parser.add_argument(
        "--no-auto-converge", action="store_true", help="do not throttle a busy guest"
    )
    parser.add_argument(
        "--postcopy",
        action="store_true",
        help="switch to post-copy when RAM does not converge (no revert after it starts)",
    )
    parser.add_argument(
        "--switchover-timeout",
        type=_positive_int,
        metavar="S",
        help="revert if RAM has not converged after S seconds (default: scaled by the guest's "
        "RAM, 60 s + 15 s per GiB, more on a capped link: 120 s for 4 GiB, 1020 s for 64 GiB)",
    )
    parser.add_argument(
        "--switchover-per-gib",
        type=_nonnegative_int,
        metavar="S",
        help="scale that deadline: --switchover-timeout (default 60) plus S seconds per GiB "
        "of guest RAM",
    )


def _positive_int(text: str) -> int:
    value = _nonnegative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def policy_from(args: argparse.Namespace) -> tuple[Policy, Deadlines]:
    from livemig.fsm.plan import Policy  # noqa: PLC0415 - not needed for --help

    policy = Policy(
        max_bandwidth=args.max_bandwidth * 2**20 if args.max_bandwidth else None,
        downtime_limit_ms=args.downtime_limit,
        max_downtime_ms=args.max_downtime,
        auto_converge=not args.no_auto_converge,
        postcopy=args.postcopy,
    )
    return policy, _deadlines(args.switchover_timeout, args.switchover_per_gib)


def _deadlines(timeout: int | None, per_gib: int | None) -> Deadlines:
    """The RAM phase's deadline from the flags: scaled by default, fixed with
    ``--switchover-timeout`` alone, scaled from that base with ``--switchover-per-gib``."""
    from livemig.fsm.plan import Deadlines  # noqa: PLC0415 - not needed for --help

    default = Deadlines()
    if timeout is None and per_gib is None:
        return default
    return Deadlines(
        switchover=default.switchover if timeout is None else float(timeout),
        switchover_per_gib=0.0 if per_gib is None else float(per_gib),
    )


def exit_code(result: MigrationResult) -> int:
    """The documented exit code of a result, chosen by its outcome (and, for a revert, by
    whether the operator asked for it)."""
    match result.outcome:
        case Outcome.FINALIZED:
            return EXIT_OK
        case Outcome.REFUSED:
            return EXIT_USAGE
        case Outcome.FAILED:
            return EXIT_FAILED
        case Outcome.REVERTED:
            return EXIT_INTERRUPTED if result.interrupted else EXIT_REVERTED


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "diagram":
            return _diagram(args)
        if args.command == "recover":
            return _recover_command(args)
        if args.command == "faults":
            from livemig.faults_command import run_faults  # noqa: PLC0415 - campaign code

            return run_faults(args)
        if args.command == "remote-target":
            from livemig.remote_agent import main as agent_main  # noqa: PLC0415

            return agent_main(args.action)
        if args.command == "target-command":
            from livemig.target_command import run_target_command  # noqa: PLC0415 - trio, QMP

            return run_target_command(args)
        if args.command == "demo":
            from livemig.demo import run_demo  # noqa: PLC0415 - pulls in the test guest

            return run_demo(args)
        return _migrate_command(args)
    except UsageError as err:
        print(f"livemig: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except LivemigError as err:
        print(f"livemig: error: {err}", file=sys.stderr)
        return EXIT_FAILED


def _diagram(args: argparse.Namespace) -> int:
    from livemig.fsm.diagram import render, render_trace  # noqa: PLC0415 - graphviz is only needed here

    if args.trace is None:
        text = render(args.format)
    else:
        states, failed_in = _read_trace(args.trace)
        try:
            text = render_trace(args.format, states, failed_in)
        except ValueError as err:
            raise UsageError(f"{args.trace}: not a path of the machine: {err}") from err
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _read_trace(path: Path) -> tuple[list[str], str | None]:
    """The states and fault state of the last result in a JSON (lines) report."""
    try:
        text = path.read_text()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err}") from err
    found: dict[str, Any] | None = None
    for line in text.splitlines() if "\n" in text.strip() else [text]:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("states"), list):
            found = obj
    if found is None:
        raise UsageError(f"{path} has no result with a list of states")
    return [str(s) for s in found["states"]], found.get("failed_in")


def _migrate_command(args: argparse.Namespace) -> int:
    local = args.target_qmp is None
    remote = args.to is not None and args.to != "local"
    if remote and not args.to.startswith("ssh://"):
        raise UsageError(f"--to takes local or ssh://[user@]host[:port], not {args.to!r}")
    if args.to is not None and not local:
        raise UsageError("--to launches the target: give it or --target-qmp, not both")
    if args.target_dir is not None and not local:
        raise UsageError("--target-dir is for --to (a target you started has its own)")
    for flag, value in (("--tunnel", args.tunnel), ("--ssh-config", args.ssh_config)):
        if value is not None and not remote:
            raise UsageError(f"{flag} is for --to ssh://")
    if remote and args.nbd is not None:
        raise UsageError("--nbd is for --target-qmp (--to ssh:// chooses its own)")
    if remote and args.migrate_uri is not None:
        raise UsageError("--migrate-uri is for --target-qmp (--to ssh:// chooses its own)")
    if args.tls_dir is not None and not args.tls_dir.is_dir():
        raise UsageError(f"--tls-dir {args.tls_dir} is not a directory")
    sockets = [("source", args.source_qmp)] + ([] if local else [("target", args.target_qmp)])
    for what, path in sockets:
        if not path.is_socket():
            raise UsageError(f"{what} QMP socket {path} does not exist or is not a socket")
    import secrets  # noqa: PLC0415

    from attrs import evolve  # noqa: PLC0415

    from livemig.fsm.plan import Plan  # noqa: PLC0415 - not needed for --help

    policy, deadlines = policy_from(args)
    deadlines = evolve(
        deadlines,
        link=float(args.link_timeout),
        postcopy_recover=float(args.postcopy_recover_timeout),
    )
    run_id = secrets.token_hex(4)
    target_dir = (args.target_dir or args.work_dir / f"target-{run_id}").absolute()
    tls = None
    if args.tls_dir is not None and not remote:
        from livemig.transports.endpoints import Tls, parse_endpoint  # noqa: PLC0415

        dialled = parse_endpoint(args.migrate_uri or "") if args.migrate_uri else None
        host = args.tls_hostname or getattr(dialled, "host", None)
        if host is None:
            raise UsageError(
                "--tls-dir with --target-qmp needs --tls-hostname or a tcp --migrate-uri"
            )
        tls = Tls(args.tls_dir.absolute(), host)
    plan = Plan.create(
        source_qmp=args.source_qmp,
        # With --to local, where the launched target's socket will be (the source's name).
        target_qmp=args.target_qmp or target_dir / args.source_qmp.name,
        run_id=run_id,
        storage=args.storage,
        work_dir=args.work_dir,
        disks=args.disk,
        migrate_uri=args.migrate_uri,
        nbd=args.nbd,
        policy=policy,
        deadlines=deadlines,
        insecure=args.insecure or remote,  # --to ssh:// makes its own refusal
        tls=tls,
        transfer=args.mode,
    )
    launch: Path | RemoteOptions | None = target_dir if local else None
    if remote:
        from livemig.remote import DEFAULT_TLS_DIR, RemoteOptions  # noqa: PLC0415
        from livemig.transports.ssh import parse_ssh_url  # noqa: PLC0415

        tls_dir = args.tls_dir
        if tls_dir is None and args.tunnel is None and DEFAULT_TLS_DIR.is_dir():
            tls_dir = DEFAULT_TLS_DIR
        launch = RemoteOptions(
            ssh=parse_ssh_url(args.to, config=args.ssh_config),
            target_dir=target_dir,
            tls_dir=tls_dir.absolute() if tls_dir is not None else None,
            tls_hostname=args.tls_hostname,
            tunnel=args.tunnel == "ssh",
            insecure=args.insecure,
            livemig=args.remote_livemig,
        )
    result = run_with_display(plan, as_json=args.json, launch=launch)
    return exit_code(result)


def default_work_dir() -> Path:
    """``$LIVEMIG_WORK_DIR``, else ``livemig`` in the temporary directory. ``migrate`` and
    ``recover`` agree on it, so a crashed run is found without being told where."""
    configured = os.environ.get("LIVEMIG_WORK_DIR")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "livemig"


def _recover_command(args: argparse.Namespace) -> int:
    if not args.work_dir.is_dir():
        raise UsageError(f"work dir {args.work_dir} does not exist")
    import trio  # noqa: PLC0415 - not needed for --help

    from livemig._display import HumanDisplay, JsonLines  # noqa: PLC0415 - rich
    from livemig.fsm.plan import Deadlines  # noqa: PLC0415 - not needed for --help
    from livemig.fsm.recovery import recover  # noqa: PLC0415 - pulls in the drivers

    deadlines = Deadlines(recover_step=float(args.step_timeout))
    from livemig.remote import remote_target  # noqa: PLC0415 - a target on another host

    results = trio.run(
        partial(recover, args.work_dir, deadlines=deadlines, remote_target=remote_target)
    )
    display: JsonLines | HumanDisplay = JsonLines() if args.json else HumanDisplay()
    if not results and isinstance(display, HumanDisplay):
        display.console.print(f"nothing to recover in {args.work_dir}")
    for result in results:
        show_result(display, result)
    codes = [exit_code(r) for r in results]
    return max(codes, default=EXIT_OK)


def run_with_display(
    plan: Plan, *, as_json: bool, launch: Path | RemoteOptions | None = None
) -> MigrationResult:
    """Run one migration under SIGINT/SIGTERM handling, showing it as the caller asked; with
    ``launch``, to a target launched in that directory (``--to local``) or on another host
    (``--to ssh://``)."""
    import trio  # noqa: PLC0415 - not needed for --help

    from livemig._display import HumanDisplay, JsonLines  # noqa: PLC0415 - rich

    display: JsonLines | HumanDisplay = JsonLines() if as_json else HumanDisplay()
    with display:
        result = trio.run(run_interruptible, plan, display, launch)
    show_result(display, result)
    return result


def show_result(display: JsonLines | HumanDisplay, result: MigrationResult) -> None:
    from livemig._display import HumanDisplay, JsonLines, summary_lines  # noqa: PLC0415 - rich

    """The result line (JSON) or summary (human). A refusal is one error line on stderr, as
    for any other bad input, beside its JSON result."""
    if isinstance(display, JsonLines):
        display.line(result.to_json())
    if result.outcome is Outcome.REFUSED:
        print(f"livemig: error: {result.error}", file=sys.stderr)
    elif isinstance(display, HumanDisplay):
        for line in summary_lines(result):
            display.console.print(line)


async def run_interruptible(
    plan: Plan, on_event: Callable[[Event], None], launch: Path | RemoteOptions | None = None
) -> MigrationResult:
    """Migrate; SIGINT or SIGTERM meanwhile makes it revert cleanly (the result says so)."""
    import trio  # noqa: PLC0415 - not needed for --help

    interrupt = trio.Event()
    try:
        return await _interruptible(plan, on_event, launch, interrupt)
    except BaseExceptionGroup as group:  # the nurseries': one error of ours is the error
        sole: BaseException = group
        while isinstance(sole, BaseExceptionGroup) and len(sole.exceptions) == 1:
            sole = sole.exceptions[0]
        if isinstance(sole, LivemigError):
            raise sole from None
        raise


async def _interruptible(
    plan: Plan,
    on_event: Callable[[Event], None],
    launch: Path | RemoteOptions | None,
    interrupt: trio.Event,
) -> MigrationResult:
    import trio  # noqa: PLC0415 - not needed for --help

    from livemig.fsm.runner import migrate  # noqa: PLC0415 - pulls in the drivers

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, interrupt)
        if launch is None:
            result = await migrate(plan, on_event=on_event, interrupt=interrupt)
        elif isinstance(launch, Path):
            from livemig.local import migrate_to_local  # noqa: PLC0415

            result = await migrate_to_local(
                plan, target_dir=launch, on_event=on_event, interrupt=interrupt
            )
        else:
            from livemig.remote import migrate_to_ssh  # noqa: PLC0415

            result = await migrate_to_ssh(plan, launch, on_event=on_event, interrupt=interrupt)
        nursery.cancel_scope.cancel()
    return result


async def _watch_signals(interrupt: trio.Event) -> None:
    # A second signal while reverting is ignored on purpose: stopping half-way through a
    # revert is what loses guests.
    import trio  # noqa: PLC0415 - not needed for --help

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            interrupt.set()


if __name__ == "__main__":
    sys.exit(main())
