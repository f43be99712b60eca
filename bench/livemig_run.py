"""The ``livemig`` variant: ``livemig migrate --json`` as a child process, default policy.

Against the lab's two QEMUs (``--target-qmp``), or, for the realistic VM, to a target livemig
launches itself (``--to local``: no ``--target-qmp``, ``--target-dir``), or one it launches on
the other "host" of a two-host lab (``--to ssh://``, the cross-host mode)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from bench.child import ChildResult, run_measured
from livemig.guest._lab import Lab

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bench.realistic import RealisticLab
    from livemig.guest._hosts import TwoHosts

__all__ = [
    "LivemigOutcome",
    "launch_ms",
    "livemig_local_argv",
    "livemig_remote_argv",
    "run_livemig",
]

#: Extra seconds the child gets beyond the switchover deadline before it is interrupted (its
#: own deadlines normally end it first).
_SLACK_S = 60.0


@attrs.frozen
class LivemigOutcome:
    child: ChildResult
    result: dict[str, Any] | None
    last_progress: dict[str, Any] | None
    progress_samples: int
    stderr_tail: str

    @property
    def outcome(self) -> str | None:
        return None if self.result is None else str(self.result.get("outcome"))


def livemig_argv(lab: Lab, *, deadline_s: float, mode: str = "auto") -> list[str]:
    """The command line: the lab's two QEMUs, the default policy, the bench's deadline for RAM
    to converge (``--switchover-timeout``; a deadline, not a policy knob), the ``--mode``."""
    return [
        sys.executable,
        "-m",
        "livemig",
        "migrate",
        "--source-qmp",
        str(lab.source_qmp),
        "--target-qmp",
        str(lab.target_qmp),
        "--storage",
        lab.storage,
        "--work-dir",
        str(lab.work_dir),
        "--switchover-timeout",
        str(max(1, round(deadline_s))),
        "--mode",
        mode,
        "--json",
    ]


def livemig_local_argv(
    lab: RealisticLab, *, work_dir: Path, target_dir: Path, deadline_s: float
) -> list[str]:
    """``--to local``: livemig launches the target from the source (in ``target_dir``) and
    copies every disk to it; the rest as :func:`livemig_argv`."""
    return [
        sys.executable,
        "-m",
        "livemig",
        "migrate",
        "--source-qmp",
        str(lab.source_qmp),
        "--target-dir",
        str(target_dir),
        "--storage",
        lab.storage,
        "--work-dir",
        str(work_dir),
        "--switchover-timeout",
        str(max(1, round(deadline_s))),
        "--json",
    ]


def livemig_remote_argv(
    lab: RealisticLab,
    hosts: TwoHosts,
    *,
    work_dir: Path,
    target_dir: Path,
    deadline_s: float,
    data: Sequence[str],
) -> list[str]:
    """``--to ssh://``, run in the source's namespace: livemig launches the target on the lab's
    target host over its sshd (``python -m livemig`` of this checkout there), copies every disk
    to it; ``data`` says how the data goes (``--tls-dir D``, ``--insecure``, ``--tunnel ssh``);
    the rest as :func:`livemig_argv`."""
    return hosts.source.argv(
        [
            sys.executable,
            "-m",
            "livemig",
            "migrate",
            "--source-qmp",
            str(lab.source_qmp),
            "--to",
            f"ssh://{hosts.target_name}",
            "--ssh-config",
            str(hosts.ssh_config),
            "--remote-livemig",
            f"{sys.executable} -m livemig",
            "--target-dir",
            str(target_dir),
            "--storage",
            lab.storage,
            "--work-dir",
            str(work_dir),
            "--switchover-timeout",
            str(max(1, round(deadline_s))),
            "--json",
            *data,
        ]
    )


async def run_livemig(
    lab: Lab | RealisticLab,
    *,
    deadline_s: float,
    argv: list[str] | None = None,
    mode: str = "auto",
) -> LivemigOutcome:
    if argv is None:
        assert isinstance(lab, Lab), "a realistic lab gives its own command line"
        argv = livemig_argv(lab, deadline_s=deadline_s, mode=mode)
    stderr_path = lab.work_dir / "bench-livemig.stderr"
    child = await run_measured(
        argv,
        stderr_path=stderr_path,
        deadline=deadline_s + _SLACK_S,
    )
    result: dict[str, Any] | None = None
    last_progress: dict[str, Any] | None = None
    samples = 0
    for line in child.stdout.decode(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if obj.get("event") == "result":
            result = obj
        elif obj.get("event") == "progress":
            last_progress = obj
            samples += 1
    tail = stderr_path.read_text(errors="replace")[-2000:] if stderr_path.exists() else ""
    return LivemigOutcome(child, result, last_progress, samples, tail)


def launch_ms(child: ChildResult, target_pid: int) -> float | None:
    """How long the launch of a ``--to local`` target took, as far as the bench can see it:
    from the target QEMU's process start (``/proc/PID/stat``, clock ticks since boot) to the
    arrival of livemig's first ``state`` event (the migration's start, right after the launch).
    Leaves out what comes before QEMU's start (reading the source, creating the images: a few
    ms). ``None`` when the QEMU is gone already or no state event came."""
    try:
        stat = Path(f"/proc/{target_pid}/stat").read_text()
    except OSError:
        return None
    started = int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    out = child.stdout
    at = out.find(b'"event": "state"')
    if at < 0:
        return None
    first = child.arrival_of(out.index(b"\n", at) + 1 if b"\n" in out[at:] else len(out))
    return None if first is None else round((first - started) * 1000.0, 1)
