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

from .common import FILE_FORMATS, GENERATORS, TopologyError
from .files import load_topology, save_topology
from .graphs import (
    describe,
    describe_text,
    draw_topology,
    expected_gossip_matrix,
    make_topology,
    metropolis_hastings_weights,
    neighbor_probabilities,
    spectral_gap,
    validate_topology,
)

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
    "metropolis_hastings_weights",
    "neighbor_probabilities",
    "save_topology",
    "spectral_gap",
    "validate_topology",
]
