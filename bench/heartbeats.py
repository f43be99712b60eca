"""The guest-observed pause: the longest gap between heartbeats around a migration."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import attrs

from livemig.guest import Heartbeat

__all__ = ["GapReport", "gap_around"]


@attrs.frozen
class GapReport:
    """:param gap_ms: the longest gap between consecutive heartbeats (by seq) that overlaps the
    window, ``None`` with fewer than two heartbeats there.
    :param missing: seqs skipped in the window (heartbeats the host never read).
    :param at: when the longest gap began (trio clock, seconds), ``None`` without one.
    :param seqs: the seqs of the two heartbeats around the longest gap."""

    gap_ms: float | None
    missing: int
    at: float | None = None
    seqs: tuple[int, int] | None = None


def gap_around(beats: Iterable[Heartbeat], start: float, end: float) -> GapReport:
    """Gaps between consecutive heartbeats, source and target consoles merged and ordered by
    seq, that overlap ``[start, end]`` (trio clock, seconds)."""
    ordered = sorted(beats, key=lambda b: b.seq)
    gaps: list[tuple[float, float, tuple[int, int]]] = []
    missing = 0
    for a, b in itertools.pairwise(ordered):
        if b.at >= start and a.at <= end:
            gaps.append(((b.at - a.at) * 1000.0, a.at, (a.seq, b.seq)))
            missing += max(0, b.seq - a.seq - 1)
    if not gaps:
        return GapReport(None, missing)
    gap_ms, at, seqs = max(gaps)
    return GapReport(gap_ms, missing, at, seqs)


def first_after(beats: Iterable[Heartbeat], moment: float) -> float | None:
    """When the first heartbeat at or after ``moment`` was read."""
    return min((b.at for b in beats if b.at >= moment), default=None)
