"""``livemig target-command``: print the command line of a migration target for a running source.

The source's argv comes from the process listening on its QMP socket (`livemig.drivers.peer`), the
versioned machine type and the disks it runs from its monitor; `livemig.drivers.cmdline` rewrites
the argv. Nothing is started, created or changed: the target dir is not even created.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from functools import partial
from pathlib import Path

import trio
import trio_asyncio

from livemig.drivers import block, runstate
from livemig.drivers.cmdline import default_disk_map, derive_target_argv
from livemig.drivers.peer import qemu_argv
from livemig.drivers.qmp import open_monitor
from livemig.transports.errors import QMPError, UsageError

__all__ = ["derive_target_command", "disk_files", "run_target_command"]

#: Seconds the source's monitor may take to greet and answer (it greets no second client).
MONITOR_TIMEOUT = 10.0
_PROTOCOL = re.compile(r"^(json:|[a-z][a-z0-9+.-]*:)")


def disk_files(devices: tuple[block.BlockDevice, ...]) -> list[str]:
    """The image files of the disks the guest can write to, in device order (read-only media
    and network images are left out: a target can open them as they are)."""
    return [
        d.filename
        for d in devices
        if d.writable and d.filename is not None and not _PROTOCOL.match(d.filename)
    ]


async def derive_target_command(
    source_qmp: Path, *, target_dir: Path, target_qmp: Path | None = None
) -> list[str]:
    """The derived target argv for the QEMU serving QMP on ``source_qmp``.

    :raise UsageError: when the socket is not a QEMU's, its monitor does not answer, or its
        command line cannot be derived from.
    """
    qmp = target_qmp if target_qmp is not None else target_dir / source_qmp.name
    try:
        with trio.fail_after(MONITOR_TIMEOUT):
            async with (
                trio_asyncio.open_loop(),
                open_monitor(source_qmp, name="source") as monitor,
            ):
                # Found while the monitor is ours: the probe's connection then waits in QEMU's
                # listen backlog only until we leave, and takes no slot from another client.
                _pid, argv = qemu_argv(source_qmp)
                machine = await runstate.query_machine(monitor)
                devices = await block.query_block(monitor)
    except trio.TooSlowError as err:
        raise UsageError(
            f"the source's monitor {source_qmp} did not answer within {MONITOR_TIMEOUT:g} s "
            "(another client connected to it?)"
        ) from err
    except QMPError as err:
        raise UsageError(f"cannot ask the source: {err}") from err
    return derive_target_argv(
        argv,
        target_qmp=os.fspath(qmp),
        target_dir=os.fspath(target_dir),
        machine_type=machine,
        disk_map=default_disk_map(disk_files(devices), os.fspath(target_dir)),
        source_qmp=os.fspath(source_qmp),
    )


def run_target_command(args: argparse.Namespace) -> int:
    source: Path = args.source_qmp.absolute()
    if not source.is_socket():
        raise UsageError(f"{args.source_qmp} does not exist or is not a socket")
    target_dir: Path = (args.target_dir or source.parent / "target").absolute()
    target_qmp: Path | None = args.target_qmp.absolute() if args.target_qmp else None
    argv = trio.run(
        partial(derive_target_command, source, target_dir=target_dir, target_qmp=target_qmp)
    )
    sys.stdout.write(shlex.join(argv) + "\n")
    return 0
