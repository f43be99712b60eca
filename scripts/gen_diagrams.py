"""Regenerate the committed pictures of the migration machine in ``diagrams/``.

Run from anywhere: ``.venv/bin/python scripts/gen_diagrams.py``. The tests fail until the files
match the machine table again.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Runnable before the project is installed into the venv: import it from this checkout.
sys.path.insert(0, str(ROOT))

from livemig.fsm.diagram import write_all  # noqa: E402


def main() -> None:
    for path in write_all(ROOT / "diagrams"):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
