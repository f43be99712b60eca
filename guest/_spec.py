"""The QEMU spec of a test guest."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from livemig.drivers.image import ImageFormat
from livemig.drivers.process import DiskSpec, VmSpec
from livemig.guest._build import GuestImage
from livemig.transports.errors import UsageError

_KERNEL_RESERVE_MIB = 128  # guest RAM left for the kernel and initramfs beside the dirty buffer


def kernel_cmdline(*, tick_ms: int, dirty_mib_s: int | Literal["max"], dirty_buf_mib: int) -> str:
    """The guest kernel command line carrying the workload's settings.

    ``mitigations=off`` takes about half a second off a TCG boot; this guest runs nothing secret.
    """
    return (
        "console=ttyS0 quiet panic=-1 mitigations=off"
        f" livemig.tick_ms={tick_ms} livemig.dirty_mib_s={dirty_mib_s}"
        f" livemig.dirty_buf_mib={dirty_buf_mib}"
    )


def guest_vm_spec(
    image: GuestImage,
    *,
    disk: Path,
    qmp_socket: Path,
    name: str,
    memory_mib: int = 512,
    accel: Literal["tcg", "kvm"] = "tcg",
    dirty_mib_s: int | Literal["max"] = 0,
    dirty_buf_mib: int = 64,
    tick_ms: int = 20,
    incoming: bool = False,
    disk_fmt: ImageFormat = "raw",
) -> VmSpec:
    """The spec of a QEMU running the test guest on ``disk`` (node ``root``, device ``vda``).

    The serial console is on stdio; the guest's panic or reboot ends QEMU (``-no-reboot``), so a
    crashed guest can never pass for a live one. ``incoming=True`` gives the migration target's
    spec: the same machine, started ``-S -incoming defer``.

    :param dirty_mib_s: RAM the workload dirties per second; ``"max"``: as fast as it can.
    :param dirty_buf_mib: the buffer it dirties, page by page.
    :param tick_ms: the period of its disk writes and heartbeats.
    :raise UsageError: when a setting is out of range.
    """
    if dirty_mib_s != "max" and (isinstance(dirty_mib_s, bool) or dirty_mib_s < 0):
        raise UsageError(f"dirty_mib_s must be 'max' or a number >= 0, not {dirty_mib_s!r}")
    if tick_ms < 1:
        raise UsageError(f"tick_ms must be at least 1, not {tick_ms}")
    if not 0 <= dirty_buf_mib <= memory_mib - _KERNEL_RESERVE_MIB:
        raise UsageError(
            f"dirty_buf_mib must be between 0 and memory_mib - {_KERNEL_RESERVE_MIB},"
            f" not {dirty_buf_mib}"
        )
    return VmSpec(
        name=name,
        qmp_socket=qmp_socket,
        memory_mib=memory_mib,
        accel=accel,
        kernel=image.kernel,
        initrd=image.initrd,
        append=kernel_cmdline(
            tick_ms=tick_ms, dirty_mib_s=dirty_mib_s, dirty_buf_mib=dirty_buf_mib
        ),
        disks=(DiskSpec(path=disk, fmt=disk_fmt),),
        no_reboot=True,
        incoming="defer" if incoming else None,
        paused=incoming,
    )
