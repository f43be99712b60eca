"""Pictures of the migration machine, drawn from the table that drives it.

Every rendering builds a fresh ``transitions`` ``GraphMachine`` from
:func:`livemig.fsm.machine.machine_kwargs`, so a picture cannot drift from the code; the committed
copies in
``diagrams/`` are checked against :func:`render` by the tests.

How to read a picture (SVG/dot):

- solid black edges are forward steps, labelled ``trigger [guard]``; the non-shared path runs
  straight down, the shared-storage branch curves past ``snapshotted`` and ``mirroring``;
- dashed red edges are ``revert`` (every undo step ran: the guest is back on the source);
- dotted grey edges are ``fail`` (an undo step failed, or a fault came after the point of no
  return);
- the three outcomes share the bottom row: ``reverted`` (red), ``finalized`` (green), ``failed``
  (grey).

Mermaid's state diagrams cannot style single edges, so there the kinds are told apart by their
trigger names and by the colour of the outcome they lead to.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from transitions.extensions import GraphMachine

from livemig.fsm.machine import (
    FORWARD,
    TERMINAL,
    TRANSITIONS,
    Facts,
    State,
    StorageMode,
    Trigger,
    forward_trigger,
    machine_kwargs,
)

__all__ = ["FILENAMES", "TITLE", "Format", "render", "render_trace", "write_all"]

Format = Literal["svg", "mermaid", "dot"]

TITLE = "livemig migration machine"

#: The file :func:`write_all` writes each rendering to.
FILENAMES: Mapping[Format, str] = {
    "svg": "machine.svg",
    "mermaid": "machine.mmd",
    "dot": "machine.dot",
}

_RED = "#b22222"
_GREY = "#777777"
_BLUE = "#1f4e9e"

# transitions applies ``style_attributes["node"|"edge"][name]`` to each node or edge whose custom
# style is ``name``. Mermaid turns node styles into ``classDef s_<name>``: names are plain words
# and colours are valid in both languages.
_NODE_STYLES: dict[str, dict[str, str]] = {
    "default": {"shape": "rectangle", "style": "rounded,filled", "fillcolor": "white"},
    State.FINALIZED: {"fillcolor": "#dff0d8", "color": "#2e7d32"},
    State.REVERTED: {"fillcolor": "#f8d7da", "color": _RED},
    State.FAILED: {"fillcolor": "#e0e0e0", "color": "#555555"},
}
_EDGE_STYLES: dict[str, dict[str, str]] = {
    "default": {"fontsize": "11"},
    # The non-shared path pulls hard so it is drawn as one straight column...
    "forward": {"weight": "4"},
    # ...and the shared-storage shortcut does not pull it sideways.
    "branch": {"weight": "0"},
    "revert": {"color": _RED, "fontcolor": _RED, "style": "dashed", "fontsize": "9"},
    "fail": {"color": _GREY, "fontcolor": _GREY, "style": "dotted", "fontsize": "9"},
}
# A traced run: visited states get a thick blue border, the state a fault hit an orange fill,
# and the steps taken are drawn thick (revert and fail keep their colour and dash).
_VISITED = {"color": _BLUE, "penwidth": "2.5"}
_FAILED_AT = {"fillcolor": "#ffd8a8", "color": "#d9480f", "penwidth": "2.5"}
_TRACED = {"penwidth": "3"}

# Forward path top to bottom; graph attributes are graphviz-only (mermaid would print each one
# as a statement, so it gets the direction alone).
_GRAPHVIZ_LAYOUT = {
    "directed": "true",
    "strict": "false",
    "rankdir": "TB",
    "labelloc": "t",
    "fontsize": "18",
    "ranksep": "0.6",
}
_MERMAID_LAYOUT = {"rankdir": "TB"}
# The picture's title with a key to the edge styles (a graphviz HTML-like label).
_TITLE_WITH_KEY = (
    f'<{TITLE}<BR/><FONT POINT-SIZE="11">solid: forward'
    f' &#183; <FONT COLOR="{_RED}">dashed: revert</FONT>'
    f' &#183; <FONT COLOR="{_GREY}">dotted: fail</FONT></FONT>>'
)


def _edge_kinds() -> dict[tuple[str, str], str]:
    """Each edge's style, keyed by (source, dest) as transitions draws one arrow per pair."""
    main_path = set()
    state = State.IDLE
    for _ in State:  # one step per state at most
        trigger = forward_trigger(state, Facts(storage=StorageMode.NON_SHARED))
        if trigger is None:
            break
        (edge,) = (e for e in FORWARD if e.source is state and e.trigger is trigger)
        main_path.add(edge)
        state = edge.dest
    kinds = {}
    for e in TRANSITIONS:
        if e.trigger in (Trigger.REVERT, Trigger.FAIL):
            kind = e.trigger.value
        else:
            kind = "forward" if e in main_path else "branch"
        kinds[(e.source.value, e.dest.value)] = kind
    return kinds


_EDGE_KIND = _edge_kinds()


def _styles() -> dict[str, Any]:
    nodes = {str(name): attrs for name, attrs in _NODE_STYLES.items()}
    nodes |= {f"{name}_visited": {**attrs, **_VISITED} for name, attrs in nodes.items()}
    nodes["failed_at"] = {**_NODE_STYLES["default"], **_FAILED_AT}
    edges = dict(_EDGE_STYLES)
    for name, attrs in _EDGE_STYLES.items():
        colour = {} if name in ("revert", "fail") else {"color": _BLUE}
        edges[f"{name}_traced"] = {**attrs, **_TRACED, **colour}
    return {"node": nodes, "edge": edges, "graph": {"default": {}}}


def render(fmt: Format) -> str:
    """The whole machine with no state highlighted. Same table, same bytes."""
    return render_trace(fmt, visited=())


def render_trace(fmt: Format, visited: Sequence[str], failed_at: str | None = None) -> str:
    """The machine with one run's path drawn over it.

    :param visited: the states the run entered, in order; each consecutive pair must be an edge.
    :param failed_at: the state the run was in when a fault hit it, if one did.
    :raise ValueError: when a name is not a state, or a step is not an edge of the machine.
    """
    engine: Literal["graphviz", "mermaid"] = "mermaid" if fmt == "mermaid" else "graphviz"
    table: dict[str, Any] = dict(machine_kwargs())
    drawing = GraphMachine(title=TITLE, show_conditions=True, graph_engine=engine, **table)
    drawing.style_attributes = _styles()
    drawing.machine_attributes = _GRAPHVIZ_LAYOUT if engine == "graphviz" else _MERMAID_LAYOUT
    graph: Any = drawing.model_graphs[id(drawing)]
    # A fresh model still marks its initial state active: clear that before styling.
    graph.reset_styling()
    for state in TERMINAL:
        graph.set_node_style(state.value, state.value)
    for (source, dest), kind in _EDGE_KIND.items():
        graph.custom_styles["edge"][source][dest] = kind
    _style_trace(graph, [State(s).value for s in visited], failed_at)
    digraph: Any = graph.get_graph(title=TITLE)
    if engine == "mermaid":
        return _clean_mermaid(digraph.source)
    _arrange(digraph)
    if fmt == "dot":
        return str(digraph.source)
    return str(digraph.pipe(format="svg", encoding="utf-8"))


def _style_trace(graph: Any, visited: Sequence[str], failed_at: str | None) -> None:
    for state in visited:
        base = state if State(state) in TERMINAL else "default"
        graph.set_node_style(state, f"{base}_visited")
    for source, dest in itertools.pairwise(visited):
        kind = _EDGE_KIND.get((source, dest))
        if kind is None:
            raise ValueError(f"{source} -> {dest} is not an edge of the machine")
        graph.custom_styles["edge"][source][dest] = f"{kind}_traced"
    if failed_at is not None:
        graph.set_node_style(State(failed_at).value, "failed_at")


def _arrange(digraph: Any) -> None:
    """Lay out the revert/fail fans so a reviewer can follow them, and add a key to the title.

    The three outcomes go on the bottom row (reverted, finalized, failed: the revert fan on the
    left, the fail fan on the right). Revert and fail labels become ``xlabel``s, placed after
    routing: as ordinary labels, dot routes the seven identical labels of each fan as obstacles
    and tangles the edges near the bottom.
    """
    digraph.graph_attr["label"] = _TITLE_WITH_KEY
    row = [State.REVERTED.value, State.FINALIZED.value, State.FAILED.value]
    with digraph.subgraph(name="outcomes") as outcomes:
        outcomes.attr(rank="sink")
        for left, right in itertools.pairwise(row):
            outcomes.edge(left, right, style="invis")
    for outcome in (State.REVERTED.value, State.FAILED.value):
        old, new = f" -> {outcome} [label=", f" -> {outcome} [xlabel="
        digraph.body[:] = [line.replace(old, new) for line in digraph.body]


def _clean_mermaid(source: str) -> str:
    """Make transitions' mermaid text valid and stable.

    Mermaid ids may not contain ``-`` (the state names stay as the labels); front matter needs a
    ``title:`` key; trailing blanks would be stripped by editors and make the file look stale.
    """
    source = source.replace(f"---\n{TITLE}\n---", f"---\ntitle: {TITLE}\n---", 1)
    for state in State:
        if "-" in state.value:
            # Bare ids only, not the quoted label in ``state "pre-switchover" as …``.
            bare = rf'(?<!["\w-]){re.escape(state.value)}(?![\w"-])'
            source = re.sub(bare, state.value.replace("-", "_"), source)
    return "\n".join(line.rstrip() for line in source.splitlines()) + "\n"


def write_all(directory: Path) -> list[Path]:
    """Write every rendering into ``directory`` (created if missing); return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, name in FILENAMES.items():
        path = directory / name
        path.write_text(render(fmt), encoding="utf-8")
        written.append(path)
    return written
