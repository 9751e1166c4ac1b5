"""What the topology modules share: the generator and file-format names, the error type,
and the graph clean-up every loaded or generated graph goes through."""

from __future__ import annotations

import numbers
import re
from typing import Any

import networkx as nx

from ..errors import UserError

GENERATORS: tuple[str, ...] = (
    "ring", "torus", "exponential", "complete", "star", "regular", "bipartite", "chain", "path",
)

#: file extension -> format name
FILE_FORMATS: dict[str, str] = {
    ".edgelist": "edgelist", ".edges": "edgelist", ".txt": "edgelist",
    ".adjlist": "adjlist", ".graphml": "graphml", ".gml": "gml", ".json": "json",
}

_EXTS = ", ".join(FILE_FORMATS)
_RANK_RE = re.compile(r"[0-9]+")
_REGULAR_TRIES = 200


class TopologyError(UserError):
    """A bad topology (generator spec, file, or graph); the message names the problem."""


# --------------------------------------------------------------------------- helpers


def _short(x: Any, limit: int = 60) -> str:
    """``repr(x)`` on one line, truncated."""
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = str(e).strip().splitlines()
    msg = lines[0].strip() if lines else ""
    msg = msg or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _is_number(w: Any) -> bool:
    return isinstance(w, numbers.Real) and not isinstance(w, bool)


def _rank(label: Any) -> int | None:
    """The rank a node label stands for: an int, or a string of decimal digits."""
    if isinstance(label, bool):
        return None
    if isinstance(label, numbers.Integral):
        return int(label)
    if isinstance(label, str) and _RANK_RE.fullmatch(label.strip()):
        return int(label.strip())
    return None


def _int_labels(g: nx.Graph) -> nx.Graph:
    """``g`` relabelled with int ranks (a copy); bad or colliding labels -> TopologyError."""
    mapping: dict[Any, int] = {}
    seen: dict[int, Any] = {}
    for v in g.nodes:
        r = _rank(v)
        if r is None:
            raise TopologyError(
                f"node label {_short(v)} is not a rank: topology node labels must be the "
                f"ranks 0..n-1 (integers, or strings of digits such as \"3\")")
        if r in seen:
            raise TopologyError(f"node labels {_short(seen[r])} and {_short(v)} both mean rank "
                                f"{r}; give each rank once")
        seen[r] = v
        mapping[v] = r
    return nx.relabel_nodes(g, mapping, copy=True)


def _edge_name(u: Any, v: Any) -> str:
    return f"{u}-{v}"


def _simple_undirected(g: nx.Graph) -> nx.Graph:
    """A simple undirected copy of ``g``; parallel edges or reciprocal directed edges with
    different weights -> TopologyError."""
    if not g.is_directed() and not g.is_multigraph():
        return g.copy()
    if g.is_multigraph():
        for u, v in {(u, v) for u, v in g.edges()}:
            k = g.number_of_edges(u, v)
            if k > 1:
                raise TopologyError(f"edge {_edge_name(u, v)} appears {k} times; a topology "
                                    f"is a simple graph, give each edge once")
    out = nx.Graph()
    out.graph.update(g.graph)
    out.add_nodes_from(g.nodes(data=True))
    for u, v, d in g.edges(data=True):
        if out.has_edge(u, v):
            if g.is_directed() and u != v:
                w0, w1 = out[u][v].get("weight", 1), d.get("weight", 1)
                if w0 != w1:
                    raise TopologyError(
                        f"edge {v}->{u} has weight {_short(w0)} but {u}->{v} has weight "
                        f"{_short(w1)}; edges are undirected, give each edge once")
                continue
            raise TopologyError(f"edge {_edge_name(u, v)} appears twice; a topology is a "
                                f"simple graph, give each edge once")
        out.add_edge(u, v, **d)
    return out


