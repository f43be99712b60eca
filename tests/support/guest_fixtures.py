"""Fixtures and launchers for tests that boot the real test guest.

Import what you use::

    from support.guest_fixtures import booted_guest, guest_image_fixture  # noqa: F401

    @pytest.mark.qemu
    async def test_x(guest_image: GuestImage, tmp_path: Path) -> None:
        with trio.fail_after(30):
            async with booted_guest(guest_image, tmp_path) as guest:
                await guest.console.wait_heartbeat(5)

The guest is built once per session into the default cache (``$LIVEMIG_CACHE_DIR`` or
``~/.cache/livemig/guest``), so only the first run on a machine pays for the build.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Literal

import attrs
import pytest
import trio

from livemig.drivers import image
from livemig.drivers.process import DEFAULT_QEMU, QemuProcess, VmSpec, launched
from livemig.guest import (
    GuestImage,
    RealisticImages,
    SerialConsole,
    Syntax,
    ensure_built,
    guest_vm_spec,
    make_realistic_images,
    realistic_vm_spec,
    verify_disks,
)

__all__ = [
    "RunningGuest",
    "RunningRealisticVm",
    "booted_guest",
    "booted_realistic_vm",
    "guest_image_fixture",
    "require_qemu",
]

DEFAULT_DISK_BYTES = 8 << 20


def require_qemu() -> None:
    """Skip the calling test when QEMU is not installed."""
    for tool in (DEFAULT_QEMU, "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.fixture(name="guest_image", scope="session")
def guest_image_fixture() -> GuestImage:
    """The built test guest (built on first use; skipped without QEMU)."""
    require_qemu()
    return trio.run(ensure_built)


@attrs.frozen
class RunningGuest:
    """A booted test guest: its QEMU, console (being read), disk and spec."""

    qemu: QemuProcess
    console: SerialConsole
    disk: Path
    spec: VmSpec
    boot_id: int


@contextlib.asynccontextmanager
async def booted_guest(
    guest_image: GuestImage,
    work_dir: Path,
    *,
    name: str = "guest",
    dirty_mib_s: int | Literal["max"] = 0,
    dirty_buf_mib: int = 64,
    memory_mib: int = 512,
    disk_bytes: int = DEFAULT_DISK_BYTES,
) -> AsyncIterator[RunningGuest]:
    """Create a sparse raw disk in ``work_dir``, boot the guest on it and wait for its boot id.

    The console is read in the background for the whole block; on the way out QEMU is stopped
    (shielded from cancellation). Guard the block with :func:`trio.fail_after`: booting under
    TCG takes about 4 s.
    """
    disk = work_dir / f"{name}.raw"
    await image.create(disk, "raw", disk_bytes)
    spec = guest_vm_spec(
        guest_image,
        disk=disk,
        qmp_socket=work_dir / f"{name}.qmp",
        name=name,
        memory_mib=memory_mib,
        dirty_mib_s=dirty_mib_s,
        dirty_buf_mib=dirty_buf_mib,
    )
    async with launched(spec, work_dir=work_dir) as qemu, trio.open_nursery() as nursery:
        console = SerialConsole.of(qemu)
        nursery.start_soon(console.run)
        boot_id = await console.wait_boot()
        yield RunningGuest(qemu, console, disk, spec, boot_id)
        nursery.cancel_scope.cancel()


@attrs.frozen
class RunningRealisticVm:
    """A booted realistic VM (`livemig.guest.realistic_vm_spec`): its QEMU, console (being
    read), images and spec."""

    qemu: QemuProcess
    console: SerialConsole
    images: RealisticImages
    spec: VmSpec
    boot_id: int


@contextlib.asynccontextmanager
async def booted_realistic_vm(
    guest_image: GuestImage,
    work_dir: Path,
    *,
    name: str = "vm",
    syntax: Syntax = "blockdev",
    depth: int = 1,
    dirty_mib_s: int | Literal["max"] = 0,
    extra_args: Sequence[str] = (),
    wrapper: Sequence[str] = (),
) -> AsyncIterator[RunningRealisticVm]:
    """Create a realistic VM's images in ``work_dir`` (file names start with ``name-``), boot
    it and wait for its boot id. ``extra_args`` go last on its command line (e.g. a device
    QEMU cannot migrate); ``wrapper`` goes first (``ip netns exec NAME``: a source on another
    "host").

    As :func:`booted_guest`: the console is read for the whole block, QEMU is stopped on the way
    out. Booting under TCG takes about 4 s.
    """
    images = await make_realistic_images(work_dir, depth=depth, prefix=f"{name}-")
    spec = realistic_vm_spec(
        guest_image,
        images,
        qmp_socket=work_dir / f"{name}.qmp",
        name=name,
        syntax=syntax,
        dirty_mib_s=dirty_mib_s,
        extra_args=extra_args,
    )
    async with (
        launched(spec, work_dir=work_dir, wrapper=wrapper) as qemu,
        trio.open_nursery() as nursery,
    ):
        console = SerialConsole.of(qemu)
        nursery.start_soon(console.run)
        boot_id = await console.wait_boot()
        yield RunningRealisticVm(qemu, console, images, spec, boot_id)
        nursery.cancel_scope.cancel()


async def power_off_with_every_record(vm: RunningRealisticVm, scratch_dir: Path) -> None:
    """A realistic VM that stayed on its source (a revert): its heartbeat goes on, it powers
    off cleanly, and every record it acknowledged on every disk is on its own images."""
    await vm.console.wait_heartbeat(vm.console.last_acked + 3)
    await vm.console.send_line("poweroff")
    await vm.console.wait_poweroff()
    assert await vm.qemu.wait() == 0
    report = await verify_disks(
        vm.images.disk_images(),
        boot_id=vm.boot_id,
        acked=vm.console.acked,
        slack=0,
        scratch_dir=scratch_dir,
    )
    assert report.ok, report.problems()
