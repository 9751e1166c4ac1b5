"""Regenerate the ready topology files in this folder (see README.md).

Run from the repository root: ``.venv/bin/python topologies/make_files.py``.
"""

from __future__ import annotations

from pathlib import Path

from apam_gossip.topology import make_topology, save_topology, validate_topology

HERE = Path(__file__).resolve().parent


def main() -> None:
    weighted = make_topology("ring", 4)
    for u, v, w in [(0, 1, 1), (1, 2, 3), (2, 3, 1), (0, 3, 3)]:
        weighted[u][v]["weight"] = w
    files = {
        "ring8.edgelist": (make_topology("ring", 8), "ring of 8 workers: i - (i+1) mod 8"),
        "ring4.edgelist": (make_topology("ring", 4), "ring of 4 workers"),
        "torus16.edgelist": (make_topology("torus", 16), "4 x 4 torus, node r*4 + c"),
        "exponential8.adjlist": (make_topology("exponential", 8),
                                 "exponential graph, 8 workers: i - (i +- 1, 2, 4) mod 8"),
        "complete8.json": (make_topology("complete", 8), None),
        "star8.graphml": (make_topology("star", 8), None),
        "weighted_ring4.edgelist": (
            weighted, "ring of 4; worker i picks neighbor j with probability "
                      "w_ij / sum_k w_ik (worker 0: 1 w.p. 1/4, 3 w.p. 3/4)"),
        "bipartite8.gml": (make_topology("bipartite", 8), None),
    }
    for name, (g, comment) in files.items():
        validate_topology(g, g.number_of_nodes())
        save_topology(g, HERE / name, comment=comment)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
