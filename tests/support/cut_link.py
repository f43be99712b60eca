"""``python -m support.cut_link ARGS…``: ``livemig ARGS…`` with the link to the target host cut
the moment the migration enters a state: fault injection for the cross-host tests.

``LIVEMIG_CUT_AT`` names the state; ``LIVEMIG_CUT`` is a JSON list of commands that cut the link
(``ip -n NS link set IF down``…). They run inside livemig's event callback, which the runner
calls synchronously on entering the state: the migration goes on only once the link is down, so
the fault lands in that state every time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import livemig.remote
from livemig.cli import main
from livemig.fsm.events import Event, StateEntered
from livemig.fsm.runner import migrate as _real


async def _cutting(*args: Any, on_event: Callable[[Event], None] | None = None, **kw: Any) -> Any:
    at = os.environ["LIVEMIG_CUT_AT"]
    commands = json.loads(os.environ["LIVEMIG_CUT"])
    done = False

    def hook(event: Event) -> None:
        nonlocal done
        if not done and isinstance(event, StateEntered) and event.state == at:
            done = True
            for argv in commands:
                subprocess.run(argv, check=True)
            print(json.dumps({"event": "link-cut", "state": at}), flush=True)
        if on_event is not None:
            on_event(event)

    return await _real(*args, on_event=hook, **kw)


vars(livemig.remote)["migrate"] = _cutting  # what livemig.remote runs the migration with

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
