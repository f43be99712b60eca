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
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
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
    """

    checked: int
    first_seq: int
    missing_count: int
    missing: tuple[int, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether every acknowledged record that can still be on the disk is there."""
        return self.missing_count == 0


def _describe(found: bytes) -> str:
    record = decode_record(found)
    if record is not None:
        return f"seq {record.seq} of boot {record.boot_id:016x}"
    if found == bytes(len(found)):
        return "zeros"
    return "no intact record"


def check_raw(path: Path, *, boot_id: int, last_acked: int, slack: int = 1) -> RecordReport:
    """The synchronous check of a raw image; see :func:`verify_records`."""
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
    return RecordReport(
        checked=max(0, last_acked - first + 1),
        first_seq=first,
        missing_count=count,
        missing=tuple(missing),
        notes=tuple(notes),
    )


async def verify_records(
    image: Path,
    *,
    boot_id: int,
    last_acked: int,
    fmt: ImageFormat = "raw",
    slack: int = 1,
) -> RecordReport:
    """Check that every record the guest acknowledged is on the disk image.

    The workload writes seq ``s`` at sector ``s % nsectors`` and prints its heartbeat only after
    the write returned, so the last ``nsectors`` acknowledged seqs must all be on the disk, with
    this boot's id. ``slack`` leaves out the oldest few: writes after ``last_acked`` that were
    never acknowledged (the guest died or the console was lost) may have overwritten them. After
    a clean ``poweroff`` the last acked seq is the last write, and ``slack=0`` is exact.

    A qcow2 image is first converted to a temporary raw file (``qemu-img convert``).

    :raise UsageError: when the image is smaller than one sector.
    :raise ToolError: when the qcow2 image cannot be converted.
    """
    if fmt == "raw":
        return await trio.to_thread.run_sync(
            lambda: check_raw(image, boot_id=boot_id, last_acked=last_acked, slack=slack)
        )
    with tempfile.TemporaryDirectory(prefix="livemig-verify-") as tmp:
        raw = Path(tmp) / "disk.raw"
        await qemu_img.convert(image, raw, source_fmt=fmt, dest_fmt="raw")
        return await trio.to_thread.run_sync(
            lambda: check_raw(raw, boot_id=boot_id, last_acked=last_acked, slack=slack)
        )
