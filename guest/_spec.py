"""The QEMU spec of a test guest."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from livemig.drivers.image import ImageFormat
from livemig.drivers.process import DiskSpec, VmSpec
from livemig.guest._build import GuestImage
from livemig.transports.errors import UsageError

_KERNEL_RESERVE_MIB = 128  # guest RAM left for the kernel and initramfs beside the dirty buffer
_DEFAULT_DISKS = ("vda",)
_DISK_NAME = re.compile(r"[a-z][a-z0-9]*")  # what the guest's /init accepts


def kernel_cmdline(
    *,
    tick_ms: int,
    dirty_mib_s: int | Literal["max"],
    dirty_buf_mib: int,
    disks: Sequence[str] = _DEFAULT_DISKS,
) -> str:
    """The guest kernel command line carrying the workload's settings.

    ``mitigations=off`` takes about half a second off a TCG boot; this guest runs nothing secret.

    :param disks: the guest disks the workload writes its records to (``/dev/vda``, …), in the
        order the console acknowledges them; the first one's seq is the heartbeat's. The default,
        ``vda`` alone, adds nothing to the command line.
    :raise UsageError: when ``disks`` is empty, repeats a name or has one that is no plain
        device name.
    """
    disks = tuple(disks)
    if not disks or len(set(disks)) != len(disks):
        raise UsageError(f"disks must be distinct names, at least one, not {disks!r}")
    if bad := [d for d in disks if not _DISK_NAME.fullmatch(d)]:
        raise UsageError(f"disk names must be plain device names (vda), not {bad!r}")
    line = (
        "console=ttyS0 quiet panic=-1 mitigations=off"
        f" livemig.tick_ms={tick_ms} livemig.dirty_mib_s={dirty_mib_s}"
        f" livemig.dirty_buf_mib={dirty_buf_mib}"
    )
    if disks != _DEFAULT_DISKS:
        line += f" livemig.disks={','.join(disks)}"
    return line


def check_workload_settings(
    *, memory_mib: int, dirty_mib_s: int | Literal["max"], dirty_buf_mib: int, tick_ms: int
) -> None:
    """Refuse workload settings out of range (:raise UsageError:)."""
    if dirty_mib_s != "max" and (isinstance(dirty_mib_s, bool) or dirty_mib_s < 0):
        raise UsageError(f"dirty_mib_s must be 'max' or a number >= 0, not {dirty_mib_s!r}")
    if tick_ms < 1:
        raise UsageError(f"tick_ms must be at least 1, not {tick_ms}")
    if not 0 <= dirty_buf_mib <= memory_mib - _KERNEL_RESERVE_MIB:
        raise UsageError(
            f"dirty_buf_mib must be between 0 and memory_mib - {_KERNEL_RESERVE_MIB},"
            f" not {dirty_buf_mib}"
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
    check_workload_settings(
        memory_mib=memory_mib, dirty_mib_s=dirty_mib_s, dirty_buf_mib=dirty_buf_mib, tick_ms=tick_ms
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
