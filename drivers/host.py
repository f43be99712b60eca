"""What a migration does on the host besides QMP: directories, files and ``qemu-img``.

The runner is given a :class:`Host`; :class:`LocalHost` is the real one. Fault campaigns pass a
host that fails on purpose (a full disk, an uncreatable overlay) or one backed by a model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import trio

from livemig.drivers import image, qcow2
from livemig.drivers.image import ImageFormat
from livemig.transports.endpoints import Endpoint, Tls

__all__ = ["Host", "LocalHost"]


class Host(Protocol):
    async def make_dir(self, path: Path) -> None:
        """Create ``path`` and its parents if missing."""

    async def create_image(self, path: Path, fmt: ImageFormat, size: int) -> None:
        """Create an image file of ``size`` bytes (virtual)."""

    async def copy_to_nbd(
        self,
        source: Path,
        fmt: ImageFormat,
        nbd: Endpoint,
        export: str,
        *,
        target_is_zero: bool,
        tls: Tls | None = None,
    ) -> None:
        """Copy a frozen image into an NBD export, sending no zeros (over TLS with ``tls``)."""

    async def remove(self, path: Path) -> None:
        """Remove a file, or an empty directory; a missing one is fine (and a directory that
        is not empty is left: it holds what livemig did not make)."""


class LocalHost:
    """This machine, with ``qemu-img`` from ``PATH``."""

    async def make_dir(self, path: Path) -> None:
        # 0700: the overlay holds the guest's writes, the sockets reach its QEMUs.
        await trio.Path(path).mkdir(mode=0o700, parents=True, exist_ok=True)

    async def create_image(self, path: Path, fmt: ImageFormat, size: int) -> None:
        if fmt == "qcow2":
            # The empty overlay: written here, no qemu-img process (see drivers/qcow2.py).
            await qcow2.write_empty_qcow2(path, size)
        else:
            await image.create(path, fmt, size)

    async def copy_to_nbd(
        self,
        source: Path,
        fmt: ImageFormat,
        nbd: Endpoint,
        export: str,
        *,
        target_is_zero: bool,
        tls: Tls | None = None,
    ) -> None:
        await image.copy_to_nbd(source, fmt, nbd, export, target_is_zero=target_is_zero, tls=tls)

    async def remove(self, path: Path) -> None:
        target = trio.Path(path)
        if await target.is_dir():
            with contextlib.suppress(OSError):
                await target.rmdir()
            return
        await target.unlink(missing_ok=True)
