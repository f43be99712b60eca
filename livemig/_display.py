"""How a migration shows itself: JSON lines for programs, a live progress display for people."""

from __future__ import annotations

import json
import sys
from typing import IO, TYPE_CHECKING, Any

from livemig.fsm.events import Event, MigrationResult, Reverting, StateEntered, Steered
from livemig.fsm.events import Progress as ProgressEvent

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["HumanDisplay", "JsonLines", "summary_lines"]


class JsonLines:
    """One JSON object per line on stdout (the CLI contract)."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self._out = out or sys.stdout

    def __enter__(self) -> JsonLines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __call__(self, event: Event) -> None:
        self.line(event.to_json())

    def line(self, obj: dict[str, Any]) -> None:
        self._out.write(json.dumps(obj, sort_keys=False) + "\n")
        self._out.flush()


class HumanDisplay:
    """State changes as lines, a bar per disk while the mirrors catch up, and a RAM bar while
    RAM streams (bars on a terminal only)."""

    def __init__(self, console: Console | None = None) -> None:
        # rich only for people: a --json run does not pay for importing it (~80 ms).
        from rich.console import Console  # noqa: PLC0415
        from rich.progress import (  # noqa: PLC0415
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TextColumn("{task.fields[detail]}"),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self._ram: Any = None
        self._disks: dict[str | None, Any] = {}

    def __enter__(self) -> HumanDisplay:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def __call__(self, event: Event) -> None:
        match event:
            case StateEntered(state="idle"):
                pass  # every run starts there: a refused run prints only its error line
            case StateEntered(state=state, at_ms=at):
                self.console.print(f"[cyan]{at / 1000:7.2f}s[/]  {state}")
            case ProgressEvent() if event.ram_total:
                self._show_ram(event)
            case ProgressEvent() if event.disk_total:
                self._show_disk(event)
            case Reverting(state=state, reason=reason, undo_steps=0):
                self.console.print(f"[yellow]stopped in {state}[/] (nothing to undo): {reason}")
            case Reverting(state=state, reason=reason, undo_steps=steps):
                self.console.print(f"[yellow]reverting from {state}[/] ({steps} steps): {reason}")
            case Steered(action=action, reason=reason):
                self.console.print(f"[magenta]policy[/]: {action} ({reason})")
            case _:
                pass

    def _show_disk(self, event: ProgressEvent) -> None:
        task = self._disks.get(event.disk)
        if task is None:
            label = f"disk {event.disk}" if event.disk is not None else "disks"
            task = self._progress.add_task(label, total=event.disk_total, detail="mirror")
            self._disks[event.disk] = task
        self._progress.update(task, completed=event.disk_done, total=event.disk_total)

    def _show_ram(self, event: ProgressEvent) -> None:
        detail = f"pass {event.passes or 0}"
        if event.expected_downtime_ms is not None:
            detail += f", expected downtime {event.expected_downtime_ms} ms"
        done = (event.ram_total or 0) - (event.ram_remaining or 0)
        if self._ram is None:
            self._ram = self._progress.add_task("RAM", total=event.ram_total, detail=detail)
        self._progress.update(self._ram, completed=done, total=event.ram_total, detail=detail)


def summary_lines(result: MigrationResult) -> list[str]:
    """A short human summary of a result."""
    lines = [f"outcome: {result.outcome.value}", "states: " + " -> ".join(result.states)]
    lines.append(f"total: {result.total_ms / 1000:.2f} s")
    stateful = result.transfer == "stateful-stop"
    if stateful:
        lines.append(
            "transfer: stateful stop" + (" (live was impossible)" if result.fallback else "")
        )
    if result.downtime_ms is not None:
        measured = "stop to cont" if stateful else "QEMU"
        lines.append(f"downtime ({measured}): {result.downtime_ms} ms")
    if result.ram_bytes is not None:
        lines.append(f"RAM sent: {result.ram_bytes / 2**20:.1f} MiB")
    if result.disk_bytes is not None:
        lines.append(f"disk copied: {result.disk_bytes / 2**20:.1f} MiB")
    for disk in result.disks:
        if disk.copied:
            sent = f", {disk.bytes_sent / 2**20:.1f} MiB" if disk.bytes_sent is not None else ""
            lines.append(f"  {disk.name}: copied {disk.source} -> {disk.target}{sent}")
        else:
            lines.append(f"  {disk.name}: shared {disk.source}")
    if result.target is not None:
        lines.append(f"target: pid {result.target.get('pid')}, QMP {result.target.get('qmp')}")
    if result.error:
        lines.append(f"error: {result.error}")
    lines += [f"warning: {w}" for w in result.warnings]
    lines += [f"undo failed: {u}" for u in result.undo_failures]
    return lines
