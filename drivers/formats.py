"""Disk image formats, as names: pure (the prechecks read it; no I/O is imported here)."""

from __future__ import annotations

from typing import Literal

__all__ = ["COPIED_FORMATS", "ImageFormat"]

ImageFormat = Literal["raw", "qcow2", "qed", "vdi", "vhdx", "vmdk", "vpc"]
#: The formats livemig copies: the target writes its own image through its NBD export, so any
#: format ``qemu-img`` reads and QEMU writes will do (the last four block live migration).
COPIED_FORMATS: tuple[ImageFormat, ...] = ("raw", "qcow2", "qed", "vdi", "vhdx", "vmdk", "vpc")
