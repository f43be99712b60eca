"""``livemig target-command``: print the command line of a migration target for a running source.

The source's argv comes from the process listening on its QMP socket, the versioned machine type
and the disks it runs from its monitor (`livemig.drivers.peer.describe_qemu`);
`livemig.drivers.cmdline` rewrites the argv. Nothing is started, created or changed: the target dir
is not even created (`livemig.drivers.launch` is the one that does).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from functools import partial
from pathlib import Path

import trio

from livemig.drivers import peer
from livemig.drivers.cmdline import default_disk_map, derive_target_argv
from livemig.drivers.peer import disk_files
from livemig.transports.errors import UsageError

__all__ = ["derive_target_command", "disk_files", "run_target_command"]

#: Seconds the source's monitor may take to greet and answer (it greets no second client).
MONITOR_TIMEOUT = peer.MONITOR_TIMEOUT


async def derive_target_command(
    source_qmp: Path, *, target_dir: Path, target_qmp: Path | None = None
) -> list[str]:
    """The derived target argv for the QEMU serving QMP on ``source_qmp``.

    :raise UsageError: when the socket is not a QEMU's, its monitor does not answer, or its
        command line cannot be derived from.
    """
    qmp = target_qmp if target_qmp is not None else target_dir / source_qmp.name
    source = await peer.describe_qemu(source_qmp, monitor_timeout=MONITOR_TIMEOUT)
    return derive_target_argv(
        source.argv,
        target_qmp=os.fspath(qmp),
        target_dir=os.fspath(target_dir),
        machine_type=source.machine,
        disk_map=default_disk_map(source.disk_files, os.fspath(target_dir)),
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
