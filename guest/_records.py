"""The workload's disk records, and the check that every acknowledged one is on a disk image.

Layout of one 512-byte record (little endian), written by ``workload.c`` at sector
``seq % nsectors``:

====== ====== =========================================================
offset size   field
====== ====== =========================================================
0      8      magic ``LVMGREC1``
8      8      seq (1, 2, 3, …)
16     8      boot id (random per boot)
24     4      CRC-32 (zlib) of bytes 0..24 followed by bytes 28..512
28     484    zero padding
====== ====== =========================================================

A guest writing to several disks keeps one ring per disk, each with its own seqs:
:func:`verify_disks` checks each disk against what the console acknowledged for it.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import attrs
import trio

from livemig.drivers import image as qemu_img
from livemig.drivers.image import ImageFormat
from livemig.transports.errors import UsageError

RECORD_SIZE = 512
RECORD_MAGIC = b"LVMGREC1"
_HEAD = struct.Struct("<8sQQ")  # magic, seq, boot id
_CRC = struct.Struct("<I")
_CRC_AT = _HEAD.size
_MAX_LISTED = 20  # missing seqs and notes kept in a report


@attrs.frozen
class Record:
    """One decoded record."""

    seq: int
    boot_id: int


def _crc(data: bytes) -> int:
    return zlib.crc32(data[_CRC_AT + _CRC.size :], zlib.crc32(data[:_CRC_AT]))


def encode_record(seq: int, boot_id: int) -> bytes:
    """The 512 bytes the workload writes for ``seq`` (tests use it to build disk images)."""
    body = bytearray(RECORD_SIZE)
    _HEAD.pack_into(body, 0, RECORD_MAGIC, seq, boot_id)
    _CRC.pack_into(body, _CRC_AT, _crc(bytes(body)))
    return bytes(body)


def decode_record(data: bytes) -> Record | None:
    """The record in one sector, or ``None`` when it holds no intact record."""
    if len(data) != RECORD_SIZE:
        return None
    magic, seq, boot_id = _HEAD.unpack_from(data)
    if magic != RECORD_MAGIC or _CRC.unpack_from(data, _CRC_AT)[0] != _crc(data):
        return None
    return Record(seq, boot_id)


@attrs.frozen
class RecordReport:
    """The result of :func:`verify_records`.

    :param checked: how many seqs were looked for.
    :param first_seq: the first seq looked for (the last is the ``last_acked`` asked for).
    :param missing_count: how many of them were not found intact.
    :param missing: the first few missing seqs.
    :param notes: what was found instead, for the first few missing seqs.
    :param fixed_checked: how many fixed records (:attr:`DiskImage.fixed`) were looked for.
    :param fixed_missing: what was found instead of each fixed record not found intact.
    """

    checked: int
    first_seq: int
    missing_count: int
    missing: tuple[int, ...]
    notes: tuple[str, ...]
    fixed_checked: int = 0
    fixed_missing: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every acknowledged record that can still be on the disk is there, and every
        fixed record the workload cannot have overwritten."""
        return self.missing_count == 0 and not self.fixed_missing

    def summary(self) -> str:
        """One line saying what is missing (``"ok"`` when nothing is)."""
        if self.ok:
            return "ok"
        parts = []
        if self.missing_count:
            parts.append(f"{self.missing_count} acknowledged records missing: {list(self.notes)}")
        if self.fixed_missing:
            parts.append(f"fixed records missing: {list(self.fixed_missing)}")
        return "; ".join(parts)


def _describe(found: bytes) -> str:
    record = decode_record(found)
    if record is not None:
        return f"seq {record.seq} of boot {record.boot_id:016x}"
    if found == bytes(len(found)):
        return "zeros"
    return "no intact record"


def _ring_reached(sector: int, nsectors: int, last_written: int) -> bool:
    """Whether a ring of seqs 1..``last_written`` over ``nsectors`` sectors wrote ``sector``."""
    return last_written >= (sector if sector else nsectors)


def check_raw(
    path: Path,
    *,
    boot_id: int,
    last_acked: int,
    slack: int = 1,
    fixed: Iterable[tuple[int, Record]] = (),
) -> RecordReport:
    """The synchronous check of a raw image; see :func:`verify_records`.

    :param fixed: records at fixed sectors, see :attr:`DiskImage.fixed`.
    """
    with path.open("rb") as f:
        nsectors = os.fstat(f.fileno()).st_size // RECORD_SIZE
        if nsectors == 0:
            raise UsageError(f"{path} is smaller than one sector")
        first = max(1, last_acked - nsectors + 1 + slack)
        missing: list[int] = []
        notes: list[str] = []
        count = 0
        for seq in range(first, last_acked + 1):
            sector = seq % nsectors
            data = os.pread(f.fileno(), RECORD_SIZE, sector * RECORD_SIZE)
            if decode_record(data) == Record(seq, boot_id):
                continue
            count += 1
            if len(missing) < _MAX_LISTED:
                missing.append(seq)
                notes.append(f"seq {seq}: sector {sector} holds {_describe(data)}")
        fixed_checked = 0
        fixed_missing: list[str] = []
        for sector, record in fixed:
            if sector >= nsectors or _ring_reached(sector, nsectors, last_acked + slack):
                continue
            fixed_checked += 1
            data = os.pread(f.fileno(), RECORD_SIZE, sector * RECORD_SIZE)
            if decode_record(data) != record:
                fixed_missing.append(
                    f"sector {sector}: seq {record.seq} of boot {record.boot_id:016x} expected,"
                    f" holds {_describe(data)}"
                )
    return RecordReport(
        checked=max(0, last_acked - first + 1),
        first_seq=first,
        missing_count=count,
        missing=tuple(missing),
        notes=tuple(notes),
        fixed_checked=fixed_checked,
        fixed_missing=tuple(fixed_missing[:_MAX_LISTED]),
    )


async def verify_records(
    image: Path,
    *,
    boot_id: int,
    last_acked: int,
    fmt: ImageFormat = "raw",
    slack: int = 1,
    scratch_dir: Path | None = None,
    fixed: Iterable[tuple[int, Record]] = (),
) -> RecordReport:
    """Check that every record the guest acknowledged is on the disk image.

    The workload writes seq ``s`` at sector ``s % nsectors`` and prints its heartbeat only after
    the write returned, so the last ``nsectors`` acknowledged seqs must all be on the disk, with
    this boot's id. ``slack`` leaves out the oldest few: writes after ``last_acked`` that were
    never acknowledged (the guest died or the console was lost) may have overwritten them. After
    a clean ``poweroff`` the last acked seq is the last write, and ``slack=0`` is exact.

    A qcow2 image is first converted to a temporary raw file (``qemu-img convert``, in
    ``scratch_dir`` if given, else in the system's temporary directory; removed afterwards): what
    is checked is what the guest sees, read through the image's whole backing chain. The image
    must not be open in a running QEMU then.

    :param fixed: records at fixed sectors the image must show too, see :attr:`DiskImage.fixed`.
    :raise UsageError: when the image is smaller than one sector.
    :raise ToolError: when the qcow2 image cannot be converted.
    """
    fixed = tuple(fixed)

    def check(raw: Path) -> RecordReport:
        return check_raw(raw, boot_id=boot_id, last_acked=last_acked, slack=slack, fixed=fixed)

    if fmt == "raw":
        return await trio.to_thread.run_sync(check, image)
    with tempfile.TemporaryDirectory(prefix="livemig-verify-", dir=scratch_dir) as tmp:
        raw = Path(tmp) / "disk.raw"
        await qemu_img.convert(image, raw, source_fmt=fmt, dest_fmt="raw")
        return await trio.to_thread.run_sync(check, raw)


def _fixed_tuple(fixed: Iterable[tuple[int, Record]]) -> tuple[tuple[int, Record], ...]:
    return tuple(fixed)


@attrs.frozen
class DiskImage:
    """One guest disk to check: the guest's name for it, its image, and what else it holds.

    :param name: the guest's name for the disk (``vda``), the one its console acknowledges.
    :param path: the image; a qcow2 one is read through its backing chain.
    :param fixed: records the image holds besides the workload's ring, as ``(sector, record)``
        pairs: one put into each backing file before boot proves that the guest-visible data was
        read through the whole chain (and, after a migration, that it was copied). One whose
        sector the ring has written by then is not checked.
    """

    name: str
    path: Path = attrs.field(converter=Path)
    fmt: ImageFormat = "raw"
    fixed: tuple[tuple[int, Record], ...] = attrs.field(default=(), converter=_fixed_tuple)


@attrs.frozen
class DisksReport:
    """What :func:`verify_disks` found: one report per disk, in the order asked for."""

    reports: tuple[tuple[str, RecordReport], ...]

    @property
    def ok(self) -> bool:
        """Whether every disk holds every record it should."""
        return all(report.ok for _, report in self.reports)

    def __getitem__(self, disk: str) -> RecordReport:
        for name, report in self.reports:
            if name == disk:
                return report
        raise KeyError(disk)

    def problems(self) -> tuple[str, ...]:
        """One line for each disk that misses records, naming it."""
        return tuple(f"{name}: {r.summary()}" for name, r in self.reports if not r.ok)


async def verify_disks(
    disks: Iterable[DiskImage],
    *,
    boot_id: int,
    acked: Mapping[str, int] | Callable[[str], int],
    slack: int = 1,
    scratch_dir: Path | None = None,
) -> DisksReport:
    """:func:`verify_records` for each disk of a guest writing to several (or one).

    ``acked`` gives each disk's last acknowledged seq by the guest's name for it: a mapping, or
    :meth:`SerialConsole.acked <livemig.guest.SerialConsole.acked>` itself. After a clean
    ``poweroff`` the console's acks are each disk's last write, and ``slack=0`` is exact.

    :raise UsageError: when ``acked`` has no seq for a disk, or an image is smaller than one
        sector.
    :raise ToolError: when a qcow2 image cannot be converted.
    """
    reports: list[tuple[str, RecordReport]] = []
    for disk in disks:
        if callable(acked):
            last = acked(disk.name)
        elif disk.name in acked:
            last = acked[disk.name]
        else:
            raise UsageError(f"no acknowledged seq for disk {disk.name!r}")
        report = await verify_records(
            disk.path,
            boot_id=boot_id,
            last_acked=last,
            fmt=disk.fmt,
            slack=slack,
            scratch_dir=scratch_dir,
            fixed=disk.fixed,
        )
        reports.append((disk.name, report))
    return DisksReport(tuple(reports))
