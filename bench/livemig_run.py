"""The ``livemig`` variant: ``livemig migrate --json`` as a child process, default policy."""

from __future__ import annotations

import json
import sys
from typing import Any

import attrs

from bench.child import ChildResult, run_measured
from livemig.guest._lab import Lab

__all__ = ["LivemigOutcome", "run_livemig"]

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


def livemig_argv(lab: Lab, *, deadline_s: float) -> list[str]:
    """The command line: the lab's two QEMUs, the default policy, the bench's deadline for RAM
    to converge (``--switchover-timeout``; a deadline, not a policy knob)."""
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
        "--json",
    ]


async def run_livemig(lab: Lab, *, deadline_s: float) -> LivemigOutcome:
    stderr_path = lab.work_dir / "bench-livemig.stderr"
    child = await run_measured(
        livemig_argv(lab, deadline_s=deadline_s),
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
