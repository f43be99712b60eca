"""Building the guest's kernel and initramfs (``build.sh``) into a cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import trio

from livemig.transports.errors import ToolError

_BUILD_SCRIPT = Path(__file__).with_name("build.sh")


@attrs.frozen
class GuestImage:
    """A built guest: boot ``kernel`` (an ELF vmlinux, PVH entry) with ``initrd``.

    :param kernel_version: the Debian kernel package and version it came from.
    """

    kernel: Path
    initrd: Path
    kernel_version: str

    @classmethod
    def from_cache_dir(cls, cache_dir: Path) -> GuestImage:
        """The guest that ``build.sh`` left in ``cache_dir``."""
        version = (cache_dir / "kernel-version").read_text().strip()
        return cls(cache_dir / "vmlinux", cache_dir / "initrd.img", version)


def default_cache_dir() -> Path:
    """``$LIVEMIG_CACHE_DIR``, else ``~/.cache/livemig/guest``."""
    configured = os.environ.get("LIVEMIG_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "livemig" / "guest"


async def ensure_built(cache_dir: Path | None = None) -> GuestImage:
    """Build the guest into ``cache_dir`` unless it is already there and up to date.

    ``build.sh`` decides: it rebuilds when ``workload.c``, ``init``, itself or the Debian kernel
    version changed (about 10 s cold, the kernel comes from ``apt-get download``); otherwise it
    returns after one ``apt-cache`` query (about 1 s). Concurrent builds of one cache are
    serialised by the script.

    :raise ToolError: when the build fails (its stderr is in the error).
    """
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    argv = ["bash", str(_BUILD_SCRIPT), str(cache)]
    try:
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    except OSError as err:
        raise ToolError(argv, 127, f"cannot run bash: {err}") from err
    if result.returncode != 0:
        raise ToolError(argv, result.returncode, result.stderr.decode(errors="replace"))
    return await trio.to_thread.run_sync(GuestImage.from_cache_dir, cache)
