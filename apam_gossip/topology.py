"""Gossip topologies as plain networkx graphs: generators, files, checks and spectral gap.

This module knows nothing about communication. Conventions (stated once, used everywhere):

* **Nodes are ranks.** Node ``i`` is worker (rank) ``i``; a valid topology for ``n``
  workers has exactly the nodes ``0 .. n-1`` (files may spell them ``"0"``, ``"1"``, ...;
  they are converted to ``int``).
* **Edges are allowed averages.** An undirected edge ``i - j`` means workers ``i`` and ``j``
  may average their models. No self-loops; the graph must be connected.
* **Weights are selection probabilities, not mixing weights.** The optional edge attribute
  ``weight`` (a finite number > 0, default 1) makes worker ``i`` pick neighbor ``j`` with
  probability ``p_ij = w_ij / sum_k w_ik`` (all weights 1 = uniform over neighbors).
  Every pairwise average uses mixing weight 1/2, ``x_i, x_j <- (x_i + x_j) / 2``, which is
  doubly stochastic: the average over all workers is conserved.
* **Expected gossip matrix.** Each gossip event activates a uniformly random worker ``i``,
  which picks ``j`` with ``p_ij``; so
  ``W_bar = (1/n) sum_i sum_j p_ij (I - (e_i - e_j)(e_i - e_j)^T / 2)``, symmetric, doubly
  stochastic, eigenvalues in ``[0, 1]`` with ``lambda_1 = 1``.
  **Spectral gap** ``= 1 - lambda_2(W_bar)`` (second largest eigenvalue): the expected
  contraction of the disagreement per event; bigger = faster consensus. For one worker it
  is defined as 1.0 (nothing to agree on).

Generators (:data:`GENERATORS`, spec ``"name"`` or ``"name:PARAM"``), for ``n`` workers:

* ``ring``: cycle ``i - (i+1) mod n`` (n=1: one node, n=2: one edge);
  ``chain`` / ``path``: the same without the closing edge;
* ``torus``: 2-D torus of ``rows x cols`` with ``rows`` the largest divisor of ``n`` that is
  ``<= sqrt(n)``; node ``r * cols + c``. Degree 4 when ``rows >= 3``; with ``rows = 2`` the
  duplicate wrap-around edges collapse (``2 x cols`` is a prism, degree 3; n=4 is a 4-cycle).
  No torus exists when ``rows < 2`` (n < 4 or n prime): :class:`TopologyError`;
* ``exponential``: ``i - (i +- 2^k) mod n`` for every ``2^k < n`` (n=8: degree 5);
* ``complete``; ``star`` (node 0 is the hub);
* ``regular:D``: a random connected ``D``-regular graph (``networkx.random_regular_graph``),
  seeded by ``seed``, redrawn until connected; needs ``D < n`` and ``n * D`` even;
* ``bipartite``: complete bipartite ``K(ceil(n/2), floor(n/2))``, even ranks on one side,
  odd ranks on the other.

Files (:func:`load_topology` / :func:`save_topology`, chosen by extension): ``.edgelist``,
``.edges``, ``.txt`` (networkx edge list: ``u v``, ``u v weight`` or ``u v {'weight': w}``;
``#`` comments; a line with one label adds an isolated node), ``.adjlist``, ``.graphml``,
``.gml``, ``.json`` (networkx node-link data, ``"links"`` or ``"edges"`` key). Directed
graphs become undirected (``u -> v`` and ``v -> u`` must then agree on the weight);
parallel edges are an error. Every problem raises :class:`TopologyError` with a one-line
message naming it and how to fix it.
"""

from __future__ import annotations

import ast
import io
import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from .errors import UserError
from .files import atomic_write_bytes

__all__ = [
    "FILE_FORMATS",
    "GENERATORS",
    "TopologyError",
    "describe",
    "describe_text",
    "draw_topology",
    "expected_gossip_matrix",
    "load_topology",
    "make_topology",
    "neighbor_probabilities",
    "save_topology",
    "spectral_gap",
    "validate_topology",
]

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


# --------------------------------------------------------------------------- generators


def _ranks(g: nx.Graph) -> nx.Graph:
    """A plain simple graph on the nodes 0..n-1 (networkx generators may label nodes
    with tuples or use other graph classes)."""
    out = nx.Graph()
    out.add_nodes_from(range(g.number_of_nodes()))
    out.add_edges_from((u, v) for u, v in g.edges() if u != v)
    return out


def _torus(n: int) -> nx.Graph:
    rows = max((d for d in range(1, math.isqrt(n) + 1) if n % d == 0), default=1)
    if rows < 2:
        why = "it is prime" if n > 3 else "a torus needs at least 2 x 2"
        raise TopologyError(f"no 2-D torus has {n} nodes ({why}); use a composite number of "
                            f"workers (4, 6, 8, 9, ...) or another topology such as 'ring'")
    cols = n // rows
    grid = nx.grid_2d_graph(rows, cols, periodic=True)  # nodes (r, c) -> rank r * cols + c
    return _ranks(nx.relabel_nodes(grid, {(r, c): r * cols + c for r, c in grid}))


def _exponential(n: int) -> nx.Graph:
    """Every worker linked to the ones 1, 2, 4, ... ranks away (both ways)."""
    offsets = [1 << k for k in range(max(1, (n - 1).bit_length())) if 1 << k < n]
    return _ranks(nx.circulant_graph(n, offsets))


def _bipartite(n: int) -> nx.Graph:
    """Complete bipartite between the even and the odd ranks (AD-PSGD's active/passive)."""
    g = nx.complete_bipartite_graph((n + 1) // 2, n // 2)  # sides 0..a-1 and a..n-1
    a = (n + 1) // 2
    return _ranks(nx.relabel_nodes(g, {k: 2 * k if k < a else 2 * (k - a) + 1 for k in g}))


def _regular(n: int, param: str | None, seed: int) -> nx.Graph:
    if param is None:
        raise TopologyError("generator 'regular' needs a degree: use regular:D, e.g. regular:3")
    if not re.fullmatch(r"[0-9]+", param.strip()):
        raise TopologyError(f"regular:D needs an integer degree D, got {_short(param)}; "
                            f"e.g. regular:3")
    d = int(param)
    if n == 1:
        if d != 0:
            raise TopologyError(f"regular:{d} needs more than {d} workers; one worker has no "
                                f"neighbors (use regular:0 or 'ring')")
        return _ranks(nx.empty_graph(1))
    if d >= n:
        raise TopologyError(f"regular:{d} needs more than {d} workers, there are {n}; use a "
                            f"degree below {n}")
    if (n * d) % 2:
        raise TopologyError(f"regular:{d} on {n} workers is impossible (n * D = {n * d} is odd); "
                            f"use an even degree or an even number of workers")
    if d == 0 or (d == 1 and n > 2):
        raise TopologyError(f"regular:{d} on {n} workers is never connected; use a degree >= 2")
    import random

    rng = random.Random(seed)
    for _ in range(_REGULAR_TRIES):
        g = nx.random_regular_graph(d, n, seed=rng)
        if nx.is_connected(g):
            return _ranks(g)
    raise TopologyError(f"no connected random {d}-regular graph on {n} workers in "
                        f"{_REGULAR_TRIES} draws; use a larger degree or 'ring'")


def _generate(name: str, param: str | None, n: int, seed: int) -> nx.Graph:
    if name != "regular" and param is not None:
        raise TopologyError(f"generator {name!r} takes no parameter (got {name}:{param}); "
                            f"use plain {name!r}")
    if name == "ring":
        return _ranks(nx.cycle_graph(n))
    if name in ("chain", "path"):
        return _ranks(nx.path_graph(n))
    if name == "torus":
        return _torus(n)
    if name == "exponential":
        return _exponential(n)
    if name == "complete":
        return _ranks(nx.complete_graph(n))
    if name == "star":
        return _ranks(nx.star_graph(n - 1))  # rank 0 in the centre
    if name == "bipartite":
        return _bipartite(n)
    assert name == "regular"
    return _regular(n, param, seed)


def make_topology(spec: str, n: int, seed: int = 0) -> nx.Graph:
    """The graph named by ``spec`` for ``n`` workers.

    ``spec`` is a topology file (an existing path, or any name with a graph-file
    extension, see :data:`FILE_FORMATS`) or a generator ``"name"`` / ``"name:PARAM"``
    (:data:`GENERATORS`). A file is returned as loaded; pass the result to
    :func:`validate_topology` to check it against the number of workers.
    """
    if not isinstance(spec, str | os.PathLike):
        raise TopologyError(f"topology must be a generator name or a file path, got "
                            f"{_short(spec)}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise TopologyError(f"a topology needs at least 1 worker, got {_short(n)}")
    n = int(n)
    path = Path(spec)
    text = os.fspath(spec).strip()
    if path.suffix.lower() in FILE_FORMATS or path.is_file():
        return load_topology(path)
    name, _, param = text.partition(":")
    name = name.strip().lower()
    if name not in GENERATORS:
        raise TopologyError(
            f"unknown topology {text!r}: not a file and not a generator; use one of "
            f"{', '.join(GENERATORS)} (regular as regular:D), or a topology file "
            f"({_EXTS})")
    return _generate(name, param if ":" in text else None, n, seed)


# --------------------------------------------------------------------------- files


def _format_of(path: Path) -> str:
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TopologyError(f"cannot parse topology file {path}: unknown extension "
                            f"{path.suffix or '(none)'!r}; use one of {_EXTS}")
    return fmt


def _parse_edgelist(text: str) -> nx.Graph:
    g = nx.Graph()
    where: dict[tuple[str, str], int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 2)
        if len(parts) == 1:
            g.add_node(parts[0])
            continue
        u, v = parts[0], parts[1]
        data: dict[str, Any] = {}
        if len(parts) == 3:
            rest = parts[2].strip()
            if rest.startswith("{"):
                d = ast.literal_eval(rest)
                if not isinstance(d, dict):
                    raise ValueError(f"line {lineno}: edge data must be a dict, got "
                                     f"{_short(rest)}")
                data = {str(k): val for k, val in d.items()}
            elif len(rest.split()) == 1:
                try:
                    data = {"weight": int(rest)}
                except ValueError:
                    try:
                        data = {"weight": float(rest)}
                    except ValueError:
                        raise ValueError(f"line {lineno}: weight {_short(rest)} is not a "
                                         f"number") from None
            else:
                raise ValueError(f"line {lineno}: expected 'u v', 'u v weight' or "
                                 f"\"u v {{'weight': w}}\", got {_short(line)}")
        key = (u, v) if u <= v else (v, u)
        if key in where:
            raise ValueError(f"line {lineno}: edge {u} {v} already given on line "
                             f"{where[key]}; give each edge once")
        where[key] = lineno
        g.add_edge(u, v, **data)
    return g


def _node_link_graph(data: Any) -> nx.Graph:
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object with 'nodes' and 'links', got "
                         f"{type(data).__name__}")
    key = "links" if "links" in data else "edges"
    if "nodes" not in data or key not in data:
        raise ValueError("expected node-link JSON with keys 'nodes' and 'links' (or 'edges')")
    try:
        return nx.node_link_graph(data, edges=key)
    except TypeError as e:  # networkx < 3.4 spells the keyword 'link'
        if "edges" not in str(e):
            raise
        return nx.node_link_graph(data, link=key)


def _read(path: Path, fmt: str) -> nx.Graph:
    if fmt == "edgelist":
        return _parse_edgelist(path.read_text(encoding="utf-8"))
    if fmt == "adjlist":
        return nx.read_adjlist(path, comments="#")
    if fmt == "graphml":
        return nx.read_graphml(path)
    if fmt == "gml":
        g = nx.read_gml(path, label=None)  # nodes keyed by GML id
        if all("label" in d for _, d in g.nodes(data=True)):  # networkx writes label = node
            g = nx.relabel_nodes(g, {v: d["label"] for v, d in g.nodes(data=True)})
            for _, d in g.nodes(data=True):
                d.pop("label", None)
        return g
    assert fmt == "json"
    return _node_link_graph(json.loads(path.read_text(encoding="utf-8")))


def load_topology(path: str | os.PathLike[str]) -> nx.Graph:
    """Read a topology file, format chosen by extension (see :data:`FILE_FORMATS`).

    Returns a simple undirected graph with int node labels (not yet checked against a
    number of workers: see :func:`validate_topology`).
    """
    p = Path(path)
    fmt = _format_of(p)
    if not p.exists():
        raise TopologyError(f"topology file {p} does not exist; give an existing file or a "
                            f"generator name ({', '.join(GENERATORS)})")
    if not p.is_file():
        raise TopologyError(f"topology file {p} is not a file; give a graph file ({_EXTS})")
    try:
        g = _read(p, fmt)
    except Exception as e:  # any parser failure is the file's fault
        raise TopologyError(f"cannot parse topology file {p} as {fmt}: {_first_line(e)}") from e
    try:
        return _simple_undirected(_int_labels(g))
    except TopologyError as e:
        raise TopologyError(f"topology file {p}: {e}") from e


def _atomic_write(path: Path, write) -> None:
    """``write(file_object)`` into memory, then :func:`~apam_gossip.files.atomic_write_bytes`."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise TopologyError(f"cannot write {path}: folder {folder} does not exist; create it "
                            f"first")
    buf = io.BytesIO()
    write(buf)
    atomic_write_bytes(path, buf.getvalue())


def _format_weight(w: Any) -> str:
    if isinstance(w, numbers.Integral):
        return str(int(w))
    w = float(w)
    return str(int(w)) if w.is_integer() and abs(w) < 2**53 else repr(w)


def _edgelist_text(g: nx.Graph, comment: str | None) -> str:
    lines = [f"# {c}".rstrip() for c in (comment.splitlines() if comment else [])]
    for v in g.nodes:
        if g.degree(v) == 0:
            lines.append(f"{v}")
    for u, v, d in g.edges(data=True):
        if not d:
            lines.append(f"{u} {v}")
        elif set(d) == {"weight"} and _is_number(d["weight"]):
            lines.append(f"{u} {v} {_format_weight(d['weight'])}")
        else:
            lines.append(f"{u} {v} {d!r}")
    return "\n".join(lines) + "\n"


def _adjlist_text(g: nx.Graph, comment: str | None) -> str:
    ws = {d["weight"] for _, _, d in g.edges(data=True) if "weight" in d}
    if ws - {1}:
        raise TopologyError("the .adjlist format cannot store edge weights; save a weighted "
                            "topology as .edgelist, .json, .graphml or .gml")
    lines = [f"# {c}".rstrip() for c in (comment.splitlines() if comment else [])]
    lines.extend(nx.generate_adjlist(g, delimiter=" "))
    return "\n".join(lines) + "\n"


def save_topology(g: nx.Graph, path: str | os.PathLike[str], *,
                  comment: str | None = None) -> None:
    """Write ``g`` to ``path`` in the format its extension names (atomically).

    ``comment`` is written as ``#`` lines at the top of ``.edgelist`` and ``.adjlist``
    files (ignored for the other formats). ``.adjlist`` cannot store weights other than 1.
    """
    p = Path(path)
    fmt = _format_of(p)
    g = _simple_undirected(g)
    if fmt in ("graphml", "gml"):  # one attribute type per key: store weights as floats
        g = g.copy()
        for _, _, d in g.edges(data=True):
            if _is_number(d.get("weight")):
                d["weight"] = float(d["weight"])
    try:
        if fmt == "edgelist":
            text = _edgelist_text(g, comment)
            _atomic_write(p, lambda fh: fh.write(text.encode("utf-8")))
        elif fmt == "adjlist":
            text = _adjlist_text(g, comment)
            _atomic_write(p, lambda fh: fh.write(text.encode("utf-8")))
        elif fmt == "graphml":
            _atomic_write(p, lambda fh: nx.write_graphml(g, fh))
        elif fmt == "gml":
            _atomic_write(p, lambda fh: fh.write(("\n".join(nx.generate_gml(g)) + "\n")
                                                 .encode("utf-8")))
        else:
            try:
                data = nx.node_link_data(g, edges="links")
            except TypeError:  # networkx < 3.4
                data = nx.node_link_data(g, link="links")
            text = json.dumps(data, indent=1, sort_keys=True) + "\n"
            _atomic_write(p, lambda fh: fh.write(text.encode("utf-8")))
    except (OSError, TypeError, ValueError, nx.NetworkXError) as e:
        if isinstance(e, TopologyError):
            raise
        raise TopologyError(f"cannot write topology file {p} as {fmt}: {_first_line(e)}") from e


# --------------------------------------------------------------------------- checks


def validate_topology(g: nx.Graph, n_workers: int) -> nx.Graph:
    """Check ``g`` is a usable topology for ``n_workers`` workers; return an int-labelled
    simple undirected copy (nodes in order 0..n-1, weights as floats)."""
    if not isinstance(g, nx.Graph):
        raise TopologyError(f"topology must be a networkx graph, got {type(g).__name__}")
    if isinstance(n_workers, bool) or not isinstance(n_workers, numbers.Integral) \
            or n_workers < 1:
        raise TopologyError(f"the number of workers must be >= 1, got {_short(n_workers)}")
    n_workers = int(n_workers)
    h = _simple_undirected(_int_labels(g))
    n = h.number_of_nodes()
    if n == 0:
        raise TopologyError(f"topology has no nodes; give a topology with {n_workers} nodes "
                            f"(ranks 0..{n_workers - 1})")
    if n != n_workers:
        raise TopologyError(f"topology has {n} nodes but there are {n_workers} workers; give "
                            f"--workers {n} or a topology with {n_workers} nodes")
    nodes = set(h.nodes)
    if nodes != set(range(n)):
        missing = sorted(set(range(n)) - nodes)
        extra = sorted(nodes - set(range(n)))
        raise TopologyError(f"topology nodes must be the ranks 0..{n - 1}: missing "
                            f"{_short(missing)}, unexpected {_short(extra)}; renumber the nodes")
    for v in sorted(nx.nodes_with_selfloops(h)):
        raise TopologyError(f"topology has a self-loop on node {v}; remove the edge {v}-{v} "
                            f"(a worker cannot average with itself)")
    for u, v, d in h.edges(data=True):
        if "weight" not in d:
            continue
        w = d["weight"]
        if not _is_number(w) or not math.isfinite(float(w)) or float(w) <= 0:
            raise TopologyError(f"edge {_edge_name(u, v)} has weight {_short(w)}; weights must "
                                f"be finite numbers > 0 (they set neighbor-selection "
                                f"probabilities)")
    if n > 1 and not nx.is_connected(h):
        comps = sorted(nx.connected_components(h), key=lambda c: (len(c), min(c)))
        raise TopologyError(f"topology is disconnected: {len(comps)} components (smallest: "
                            f"nodes {_short(sorted(comps[0]))}); add edges joining them")
    out = nx.Graph()
    out.graph.update(h.graph)
    out.add_nodes_from((v, h.nodes[v]) for v in range(n))
    for u, v, d in sorted(h.edges(data=True), key=lambda e: (min(e[:2]), max(e[:2]))):
        d = dict(d)
        if "weight" in d:
            d["weight"] = float(d["weight"])
        out.add_edge(min(u, v), max(u, v), **d)
    return out


def _checked(g: nx.Graph) -> nx.Graph:
    return validate_topology(g, g.number_of_nodes() if isinstance(g, nx.Graph) else 0)


# --------------------------------------------------------------------------- spectra


def neighbor_probabilities(g: nx.Graph) -> dict[int, tuple[list[int], list[float]]]:
    """For each rank ``i``: (sorted neighbors, probabilities ``w_ij / sum_k w_ik``)."""
    h = _checked(g)
    out: dict[int, tuple[list[int], list[float]]] = {}
    for i in range(h.number_of_nodes()):
        nb = sorted(h[i])
        w = [float(h[i][j].get("weight", 1.0)) for j in nb]
        s = math.fsum(w)
        out[i] = (nb, [x / s for x in w])
    return out


def expected_gossip_matrix(g: nx.Graph) -> np.ndarray:
    """``W_bar = (1/n) sum_i sum_j p_ij (I - (e_i - e_j)(e_i - e_j)^T / 2)`` ([n, n])."""
    probs = neighbor_probabilities(g)
    n = len(probs)
    lap = np.zeros((n, n))
    for i, (nb, p) in probs.items():
        for j, pij in zip(nb, p, strict=True):
            lap[i, i] += pij
            lap[j, j] += pij
            lap[i, j] -= pij
            lap[j, i] -= pij
    return np.eye(n) - lap / (2 * n)


def spectral_gap(g: nx.Graph) -> float:
    """``1 - lambda_2(W_bar)``; bigger = faster consensus (1.0 for a single worker)."""
    w = expected_gossip_matrix(g)
    if len(w) == 1:
        return 1.0
    ev = np.linalg.eigvalsh(w)  # ascending
    return float(min(1.0, max(0.0, 1.0 - ev[-2])))


# --------------------------------------------------------------------------- reports


def describe(g: nx.Graph) -> dict[str, Any]:
    """Summary numbers (JSON-serialisable): n, edges, degrees, spectral gap, bipartite,
    diameter, weighted."""
    h = _checked(g)
    degrees = [int(h.degree(v)) for v in range(h.number_of_nodes())]
    ws = [d["weight"] for _, _, d in h.edges(data=True) if "weight" in d]
    return {
        "n": h.number_of_nodes(),
        "edges": h.number_of_edges(),
        "degree_min": min(degrees),
        "degree_mean": sum(degrees) / len(degrees),
        "degree_max": max(degrees),
        "degrees": degrees,
        "spectral_gap": spectral_gap(h),
        "bipartite": bool(nx.is_bipartite(h)),
        "diameter": int(nx.diameter(h)) if len(h) > 1 else 0,
        "weighted": any(w != 1.0 for w in ws),
    }


def describe_text(g: nx.Graph, name: str) -> str:
    """A few human-readable lines about ``g`` (``name``: what to call it)."""
    d = describe(g)
    degs = " ".join(map(str, d["degrees"])) if d["n"] <= 32 else "(not listed: n > 32)"
    h = _checked(g)
    if d["weighted"]:
        ws = [dd.get("weight", 1.0) for _, _, dd in h.edges(data=True)]
        weights = (f"weighted (edge weights {min(ws):g} .. {max(ws):g}): worker i picks j "
                   f"with probability w_ij / sum_k w_ik")
    else:
        weights = "unweighted: each worker picks a neighbor uniformly"
    return "\n".join([
        f"topology {name}: {d['n']} workers, {d['edges']} edges",
        f"degree: min {d['degree_min']}, mean {d['degree_mean']:.2f}, max {d['degree_max']}",
        f"degrees: {degs}",
        f"spectral gap: {d['spectral_gap']:.4g}  (1 - lambda_2 of the expected gossip matrix; "
        f"bigger = faster consensus)",
        f"diameter: {d['diameter']}",
        f"bipartite: {'yes' if d['bipartite'] else 'no'}",
        f"neighbor choice: {weights}; each average mixes 1/2 : 1/2",
    ])


def draw_topology(g: nx.Graph, path: str | os.PathLike[str], name: str | None = None) -> None:
    """Save a PNG drawing of ``g`` (matplotlib Agg, no pyplot state; atomic write)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h = _checked(g)
    p = Path(path)
    n = h.number_of_nodes()
    if n <= 2 or all(deg == 2 for _, deg in h.degree()):
        pos = nx.circular_layout(h)
    else:
        pos = nx.spring_layout(h, seed=0)
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ws = [d.get("weight", 1.0) for _, _, d in h.edges(data=True)]
    wmax = max(ws, default=1.0)
    widths = [0.5 + 2.5 * w / wmax for w in ws]
    nx.draw_networkx_edges(h, pos, ax=ax, width=widths, edge_color="0.5")
    nx.draw_networkx_nodes(h, pos, ax=ax, node_size=300 if n <= 64 else 30,
                           node_color="tab:blue")
    if n <= 64:
        nx.draw_networkx_labels(h, pos, ax=ax, font_size=8, font_color="white")
    ax.set_title(f"{name or p.stem}: n={n}, gap={spectral_gap(h):.3g}")
    ax.set_axis_off()
    try:
        _atomic_write(p, lambda fh: fig.savefig(fh, format="png"))
    except OSError as e:
        raise TopologyError(f"cannot write {p}: {_first_line(e)}") from e


def metropolis_hastings_weights(g: nx.Graph) -> dict[int, list[tuple[int, float]]]:
    """Synchronous gossip weights (D-PSGD): W_ij = 1 / (1 + max(d_i, d_j)) for each edge,
    W_ii = 1 - sum_j W_ij. W is symmetric and doubly stochastic, so one synchronous mixing
    round keeps the mean of the models. Edge weights (selection probabilities of the
    asynchronous mode) are ignored. Returns, per node, ``(j, W_ij)`` pairs, self included.
    """
    deg = dict(g.degree())
    out: dict[int, list[tuple[int, float]]] = {}
    for i in sorted(g.nodes):
        pairs = [(int(j), 1.0 / (1 + max(deg[i], deg[j]))) for j in sorted(g.neighbors(i))]
        out[int(i)] = [(int(i), 1.0 - sum(w for _, w in pairs))] + pairs
    return out
