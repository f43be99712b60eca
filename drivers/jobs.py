"""QMP commands on background jobs (mirror, commit, …): watch, complete, cancel, dismiss.

Thin typed wrappers: one QMP command each, no policy, no timeouts, no retries. QEMU has two views
of the same jobs: the generic ``job-*`` commands (by job id) and the older ``block-job-*`` ones (by
"device", which for a job started with ``job-id`` is that id). Jobs dismiss themselves when they
end unless started with ``auto-dismiss: false``.
"""

from __future__ import annotations

from typing import Any

import attrs

from livemig.drivers.qapi import Monitor, json_array, member, optional_member, query
from livemig.drivers.status import JobStatus

__all__ = [
    "BlockJobInfo",
    "JobInfo",
    "JobStatus",
    "block_job_cancel",
    "job_cancel",
    "job_complete",
    "job_dismiss",
    "query_block_jobs",
    "query_jobs",
]


@attrs.frozen
class JobInfo:
    """One entry of ``query-jobs``.

    :param id: the job id.
    :param type: ``mirror``, ``commit``, ``stream``, ``backup``, …
    :param status: where the job stands.
    :param current_progress: work done, in an arbitrary unit (bytes for block jobs)…
    :param total_progress: …out of this much, which may still grow.
    :param error: why it failed, once concluded with an error.
    """

    id: str
    type: str
    status: JobStatus
    current_progress: int
    total_progress: int
    error: str | None

    @classmethod
    def from_qmp(cls, job: Any) -> JobInfo:
        return cls(
            id=member(job, "id", str),
            type=member(job, "type", str),
            status=JobStatus.parse(member(job, "status", str)),
            current_progress=member(job, "current-progress", int),
            total_progress=member(job, "total-progress", int),
            error=optional_member(job, "error", str),
        )


@attrs.frozen
class BlockJobInfo:
    """One entry of ``query-block-jobs``.

    :param device: the job id (or the device, for jobs started without one).
    :param ready: whether a mirror or active commit is in sync and can complete.
    :param offset: bytes done…
    :param len: …out of this many, which may still grow while the guest writes.
    :param speed: the rate limit in bytes per second (0: none).
    """

    device: str
    type: str
    status: JobStatus
    ready: bool
    offset: int
    len: int
    busy: bool
    paused: bool
    speed: int
    error: str | None

    @classmethod
    def from_qmp(cls, job: Any) -> BlockJobInfo:
        return cls(
            device=member(job, "device", str),
            type=member(job, "type", str),
            status=JobStatus.parse(member(job, "status", str)),
            ready=member(job, "ready", bool),
            offset=member(job, "offset", int),
            len=member(job, "len", int),
            busy=member(job, "busy", bool),
            paused=member(job, "paused", bool),
            speed=member(job, "speed", int),
            error=optional_member(job, "error", str),
        )


async def query_jobs(monitor: Monitor) -> tuple[JobInfo, ...]:
    """``query-jobs``: every job, whatever its state."""
    return await query(
        monitor, "query-jobs", lambda reply: tuple(JobInfo.from_qmp(j) for j in json_array(reply))
    )


async def query_block_jobs(monitor: Monitor) -> tuple[BlockJobInfo, ...]:
    """``query-block-jobs``: the block jobs, with their ``ready`` flag and byte counts."""
    return await query(
        monitor,
        "query-block-jobs",
        lambda reply: tuple(BlockJobInfo.from_qmp(j) for j in json_array(reply)),
    )


async def block_job_cancel(monitor: Monitor, device: str, *, force: bool = False) -> None:
    """``block-job-cancel``. On a ready mirror the soft form stops it with the target
    consistent (``BLOCK_JOB_COMPLETED``, no pivot); ``force`` abandons it
    (``BLOCK_JOB_CANCELLED``)."""
    await monitor.execute("block-job-cancel", {"device": device, "force": force})


async def job_complete(monitor: Monitor, job_id: str) -> None:
    """``job-complete``: finish a ready job (a mirror pivots to its target; an active commit
    makes the base the active layer)."""
    await monitor.execute("job-complete", {"id": job_id})


async def job_cancel(monitor: Monitor, job_id: str) -> None:
    """``job-cancel``."""
    await monitor.execute("job-cancel", {"id": job_id})


async def job_dismiss(monitor: Monitor, job_id: str) -> None:
    """``job-dismiss``: forget a concluded job started with ``auto-dismiss: false``."""
    await monitor.execute("job-dismiss", {"id": job_id})
