"""livemig.drivers.image against the real qemu-img, and copy_to_nbd against a real qemu-nbd
export."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from support.guest_fixtures import require_qemu

from livemig.drivers import image
from livemig.drivers.image import ImageInfo
from livemig.transports.errors import ToolError, UsageError

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _needs_qemu_img() -> None:
    require_qemu()


def write_at(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_info_from_qemu_img_json() -> None:
    data = {
        "format": "qcow2",
        "virtual-size": 1024,
        "actual-size": 512,
        "backing-filename": "base.raw",
        "full-backing-filename": "/d/base.raw",
        "backing-filename-format": "raw",
    }
    assert ImageInfo.from_qemu_img(data) == ImageInfo(
        "qcow2", 1024, 512, Path("/d/base.raw"), "raw"
    )
    assert ImageInfo.from_qemu_img({"format": "raw", "virtual-size": 7}) == ImageInfo("raw", 7, 0)


async def test_create_raw_is_sparse(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    with trio.fail_after(10):
        await image.create(path, "raw", 64 * MIB)
        got = await image.info(path)
    assert (got.format, got.virtual_size, got.backing) == ("raw", 64 * MIB, None)
    assert got.actual_size < MIB


async def test_create_overlay_takes_backing_size(tmp_path: Path) -> None:
    base, overlay = tmp_path / "base.raw", tmp_path / "over.qcow2"
    with trio.fail_after(10):
        await image.create(base, "raw", 16 * MIB)
        await image.create(overlay, "qcow2", None, backing=base, backing_fmt="raw")
        got = await image.info(overlay)
    assert got == ImageInfo("qcow2", 16 * MIB, got.actual_size, base, "raw")


async def test_create_refuses_incomplete_arguments(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        await image.create(tmp_path / "a.raw", "raw", None)
    with pytest.raises(UsageError):
        await image.create(tmp_path / "a.qcow2", "qcow2", None, backing=tmp_path / "b.raw")


async def test_failures_carry_argv_and_stderr(tmp_path: Path) -> None:
    with trio.fail_after(10), pytest.raises(ToolError) as info:
        await image.info(tmp_path / "missing.raw")
    assert info.value.argv[:2] == ("qemu-img", "info")
    assert "missing.raw" in info.value.stderr
    with trio.fail_after(10), pytest.raises(ToolError, match="cannot run"):
        await image.info(tmp_path / "x", qemu_img=str(tmp_path / "no-qemu-img"))


async def test_convert_round_trip(tmp_path: Path) -> None:
    raw, qcow2, back = tmp_path / "a.raw", tmp_path / "a.qcow2", tmp_path / "b.raw"
    with trio.fail_after(20):
        await image.create(raw, "raw", 8 * MIB)
        write_at(raw, 3 * MIB + 512, b"livemig" * 100)
        await image.convert(raw, qcow2, source_fmt="raw", dest_fmt="qcow2")
        assert (await image.info(qcow2)).format == "qcow2"
        await image.convert(qcow2, back, source_fmt="qcow2")
    assert back.read_bytes() == raw.read_bytes()
    assert allocated(back) < MIB  # zeros stayed holes


@contextlib.asynccontextmanager
async def nbd_export(target: Path, sock: Path, export: str) -> AsyncIterator[None]:
    """``qemu-nbd`` serving ``target`` (raw, writable) on a unix socket until the block ends."""
    proc = await trio.lowlevel.open_process(
        ["qemu-nbd", "-f", "raw", "-x", export, "-k", str(sock), "--persistent", str(target)],
        stderr=subprocess.DEVNULL,
    )
    try:
        while not await trio.Path(sock).is_socket():  # qemu-nbd tells nobody: poll
            assert proc.returncode is None, "qemu-nbd exited"
            await trio.sleep(0.02)
        yield
    finally:
        with trio.CancelScope(shield=True):
            proc.terminate()
            await proc.wait()


@pytest.mark.parametrize("target_is_zero", [True, False])
async def test_copy_to_nbd_is_sparse_aware(tmp_path: Path, target_is_zero: bool) -> None:
    source, target, sock = tmp_path / "src.raw", tmp_path / "dst.raw", tmp_path / "nbd.sock"
    with trio.fail_after(20):
        await image.create(source, "raw", 64 * MIB)
        for offset in (0, 10 * MIB, 63 * MIB):
            write_at(source, offset, os.urandom(MIB))
        await image.create(target, "raw", 64 * MIB)
        async with nbd_export(target, sock, "root"):
            await image.copy_to_nbd(source, "raw", sock, "root", target_is_zero=target_is_zero)
    assert target.read_bytes() == source.read_bytes()
    if target_is_zero:
        assert allocated(target) < 4 * MIB  # zero areas skipped
    else:
        assert allocated(target) >= 60 * MIB  # zero areas written (as WRITE_ZEROES)


async def test_copy_to_nbd_from_qcow2(tmp_path: Path) -> None:
    raw, source, target = tmp_path / "a.raw", tmp_path / "a.qcow2", tmp_path / "dst.raw"
    sock = tmp_path / "n,bd.sock"  # a comma must survive the option string
    with trio.fail_after(20):
        await image.create(raw, "raw", 4 * MIB)
        write_at(raw, MIB, b"x" * 4096)
        await image.convert(raw, source, source_fmt="raw", dest_fmt="qcow2")
        await image.create(target, "raw", 4 * MIB)
        async with nbd_export(target, sock, "disk"):
            await image.copy_to_nbd(source, "qcow2", sock, "disk", target_is_zero=True)
    assert target.read_bytes() == raw.read_bytes()


async def test_copy_to_nbd_without_server(tmp_path: Path) -> None:
    source = tmp_path / "src.raw"
    with trio.fail_after(10):
        await image.create(source, "raw", MIB)
        with pytest.raises(ToolError):
            await image.copy_to_nbd(source, "raw", tmp_path / "none.sock", "root")
