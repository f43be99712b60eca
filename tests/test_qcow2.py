"""livemig.drivers.qcow2: the empty overlay written without qemu-img is qemu-img's, byte for
byte, and QEMU uses it as one (checked with the real qemu-img and qemu-io)."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
import trio
from support.guest_fixtures import require_qemu

from livemig.drivers import host, qcow2
from livemig.transports.errors import UsageError

MIB = 1 << 20
SIZES = [1, 511, 1000, 64 * MIB, 512 * MIB + 512, (1 << 30) + 1, 3 << 40, 100 << 40]


@pytest.mark.parametrize("size", SIZES)
async def test_the_overlay_is_what_qemu_img_creates(tmp_path: Path, size: int) -> None:
    require_qemu()
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    await qcow2.write_empty_qcow2(ours, size)
    await trio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", theirs, str(size)])
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.stat().st_blocks == theirs.stat().st_blocks  # allocated alike, not sparser
    await _consistent(ours)
    assert stat.S_IMODE(ours.stat().st_mode) == 0o600


async def test_guest_writes_through_the_overlay_land_in_it_and_it_stays_consistent(
    tmp_path: Path,
) -> None:
    require_qemu()
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed")
    base, overlay = tmp_path / "base.raw", tmp_path / "overlay.qcow2"
    base.write_bytes(b"\xaa" * (4 * MIB))
    await host.LocalHost().create_image(overlay, "qcow2", 4 * MIB)
    opts = (
        f"driver=qcow2,file.driver=file,file.filename={overlay},"
        f"backing.driver=raw,backing.file.driver=file,backing.file.filename={base}"
    )
    io = ["qemu-io", "--image-opts", opts]
    await trio.run_process([*io, "-c", "write -P 0x55 1M 256k"], capture_stdout=True)
    read = await trio.run_process(
        [*io, "-c", "read -P 0x55 1M 256k", "-c", "read -P 0xaa 0 1M"], capture_stdout=True
    )
    assert b"Pattern verification failed" not in read.stdout
    assert read.stdout.count(b"read 262144/262144 bytes") == 1
    assert base.read_bytes() == b"\xaa" * (4 * MIB)  # the base stayed frozen
    await _consistent(overlay)


async def _consistent(image: Path) -> None:
    check = await trio.run_process(
        ["qemu-img", "check", image], capture_stdout=True, capture_stderr=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


async def test_no_room_for_the_overlay_fails_at_once_and_says_where(tmp_path: Path) -> None:
    where = tmp_path / "full"
    where.mkdir()
    mount = await trio.run_process(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", where],
        check=False,
        capture_stderr=True,
    )
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(OSError, match=r"cannot write the overlay .*No space left on device"):
            await qcow2.write_empty_qcow2(where / "overlay.qcow2", 64 * MIB)
    finally:
        await trio.run_process(["umount", where], check=False)


@pytest.mark.parametrize("size", [0, -1, qcow2.MAX_SIZE + 1])
def test_sizes_it_cannot_make_are_refused(size: int) -> None:
    with pytest.raises(UsageError):
        qcow2.empty_qcow2(size)
