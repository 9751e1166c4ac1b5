"""Topology files: read and write every format :data:`FILE_FORMATS` names (by extension)."""

from __future__ import annotations

import ast
import io
import json
import numbers
import os
from pathlib import Path
from typing import Any

import networkx as nx

from ..files import atomic_write_bytes
from .common import (
    _EXTS,
    FILE_FORMATS,
    GENERATORS,
    TopologyError,
    _first_line,
    _int_labels,
    _is_number,
    _short,
    _simple_undirected,
)

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


