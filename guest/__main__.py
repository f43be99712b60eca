"""``python -m livemig.guest build``: build the test guest into its cache (skipped when up to
date)."""

from __future__ import annotations

import sys

import trio

from livemig.guest._build import default_cache_dir, ensure_built
from livemig.transports.errors import LivemigError


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print("usage: python -m livemig.guest build", file=sys.stderr)
        return 2
    try:
        image = trio.run(ensure_built)
    except LivemigError as err:
        print(f"guest build failed: {err}", file=sys.stderr)
        return 1
    print(f"test guest ready in {default_cache_dir()}: {image.kernel.name}, {image.initrd.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
