"""The fake's files: disk images as sets of record numbers, sockets, and a `FakeHost`.

An image holds the sequence numbers of the guest records written to it (each record has its own
place on the disk, so an image is just the set of records on it). A socket file is whatever a
QEMU listens on; the fake, like QEMU, leaves it behind when the listener goes.

`FakeHost` implements `livemig.drivers.host.Host` on these files, with no filesystem underneath.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from livemig.drivers.image import ImageFormat
from livemig.transports.endpoints import Endpoint, Tls, UnixEndpoint
from livemig.transports.errors import ToolError

__all__ = ["RECORD_BYTES", "FakeHost", "ImageFile", "SocketFile", "StateFile"]

#: Bytes one guest record takes on disk (a node's ``actual-size``).
RECORD_BYTES = 4096


@attrs.define(eq=False)
class ImageFile:
    """A disk image. ``records`` are the guest writes it holds."""

    path: str
    fmt: str
    size: int
    records: set[int] = attrs.field(factory=set)


@attrs.define(eq=False)
class SocketFile:
    """A unix socket's file; ``owner`` names the QEMU that created it."""

    path: str
    owner: str


@attrs.define(eq=False)
class StateFile:
    """A saved guest state (``migrate file:``); ``guest`` is what a load restores."""

    path: str
    guest: Any


File = ImageFile | SocketFile | StateFile

#: Finds the image behind an NBD export: ``(socket path, export name) -> image``, or ``None``
#: when nothing serves it (or the NBD link is cut).
NbdResolver = Callable[[str, str], ImageFile | None]


@attrs.define(eq=False)
class FakeHost:
    """This machine's files, as the runner sees them through `livemig.drivers.host.Host`.

    :param copy_seconds: how long copying the base to the target takes (trio time).
    """

    resolve_nbd: NbdResolver
    copy_seconds: float = 0.03
    files: dict[str, File] = attrs.field(factory=dict)
    dirs: set[str] = attrs.field(factory=set)

    def image(self, path: str | Path) -> ImageFile | None:
        found = self.files.get(str(path))
        return found if isinstance(found, ImageFile) else None

    def add_image(self, path: str | Path, fmt: str, size: int) -> ImageFile:
        image = ImageFile(str(path), fmt, size)
        self.files[image.path] = image
        return image

    # -- livemig.drivers.host.Host --

    async def make_dir(self, path: Path) -> None:
        await trio.lowlevel.checkpoint()
        self.dirs.add(str(path))

    async def create_image(self, path: Path, fmt: ImageFormat, size: int) -> None:
        await trio.lowlevel.checkpoint()
        if str(path.parent) not in self.dirs:
            raise ToolError(["qemu-img", "create", str(path)], 1, "No such file or directory")
        self.add_image(path, fmt, size)  # like qemu-img create, replaces what was there

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
        del tls  # the model has no TLS: its plans use unix sockets
        argv = ["qemu-img", "convert", "-f", fmt, str(source), f"nbd+unix:///{export}"]
        if not isinstance(nbd, UnixEndpoint):
            raise ToolError(argv, 1, "the model serves NBD on unix sockets only")
        nbd_socket = nbd.path
        image = self.image(source)
        if image is None:
            raise ToolError(argv, 1, f"Could not open '{source}': No such file or directory")
        if self.resolve_nbd(str(nbd_socket), export) is None:
            raise ToolError(argv, 1, "Failed to connect to the NBD server")
        await trio.sleep(self.copy_seconds)
        # Read at the end: a base that is not frozen loses what is written after this.
        target = self.resolve_nbd(str(nbd_socket), export)
        if target is None:
            raise ToolError(argv, 1, "error while writing: Input/output error")
        target.records |= image.records

    async def remove(self, path: Path) -> None:
        await trio.lowlevel.checkpoint()
        self.files.pop(str(path), None)
