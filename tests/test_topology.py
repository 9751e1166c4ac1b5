"""Topologies: generators, file formats, validation messages, expected gossip matrix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apam_gossip.errors import UserError
from apam_gossip.topology import (
    FILE_FORMATS,
    GENERATORS,
    TopologyError,
    describe,
    describe_text,
    draw_topology,
    expected_gossip_matrix,
    load_topology,
    make_topology,
    neighbor_probabilities,
    save_topology,
    spectral_gap,
    validate_topology,
)

pytestmark = pytest.mark.timeout(60)

READY = Path(__file__).resolve().parent.parent / "topologies"


def degrees(g: nx.Graph) -> list[int]:
    return [d for _, d in sorted(g.degree())]


def raises_one_line(match: str | None = None):
    """pytest.raises(TopologyError) that also checks the message is one line."""

    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(TopologyError, match=match)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self.cm.__exit__(*exc)
            msg = str(self.info.value)
            assert msg and "\n" not in msg, msg
            return out

    return _Ctx()


# --------------------------------------------------------------------------- generators


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,n,expected", [
    ("ring", 8, [2] * 8),
    ("ring", 3, [2] * 3),
    ("chain", 5, [1, 2, 2, 2, 1]),
    ("path", 5, [1, 2, 2, 2, 1]),
    ("complete", 8, [7] * 8),
    ("exponential", 8, [5] * 8),
    ("exponential", 16, [7] * 16),
    ("star", 8, [7] + [1] * 7),
    ("regular:3", 10, [3] * 10),
    ("regular:4", 9, [4] * 9),
    ("torus", 16, [4] * 16),
    ("torus", 9, [4] * 9),
    ("torus", 8, [3] * 8),  # 2 x 4: the duplicate wrap-around edges collapse (a prism)
    ("torus", 4, [2] * 4),  # 2 x 2: a 4-cycle
    ("bipartite", 8, [4] * 8),
    ("bipartite", 7, [3, 4, 3, 4, 3, 4, 3]),
])
def test_generators(name, n, expected):
    g = make_topology(name, n, seed=1)
    assert sorted(g.nodes) == list(range(n))
    assert nx.is_connected(g)
    assert nx.number_of_selfloops(g) == 0
    assert degrees(g) == expected
    validate_topology(g, n)


@pytest.mark.timeout(60)
def test_generator_details():
    assert set(GENERATORS) >= {"ring", "torus", "exponential", "complete", "star", "regular",
                               "bipartite", "chain", "path"}
    ring1 = make_topology("ring", 1)
    assert list(ring1.nodes) == [0] and ring1.number_of_edges() == 0
    ring2 = make_topology("ring", 2)
    assert list(ring2.edges) == [(0, 1)]
    assert validate_topology(ring2, 2).number_of_edges() == 1
    assert sorted(make_topology("star", 8)[0]) == list(range(1, 8))
    torus = make_topology("torus", 16)
    assert sorted(torus[5]) == [1, 4, 6, 9]  # (1,1): up, left, right, down
    assert sorted(torus[0]) == [1, 3, 4, 12]
    assert sorted(make_topology("exponential", 8)[0]) == [1, 2, 4, 6, 7]
    bip = make_topology("bipartite", 8)
    assert nx.is_bipartite(bip)
    assert all((u - v) % 2 == 1 for u, v in bip.edges)  # even side - odd side
    assert bip.number_of_edges() == 16
    assert make_topology("RING", 4).number_of_edges() == 4
    # regular: seeded, reproducible, different seeds differ
    a, b = make_topology("regular:3", 12, seed=5), make_topology("regular:3", 12, seed=5)
    assert sorted(a.edges) == sorted(b.edges)
    others = {tuple(sorted(make_topology("regular:3", 12, seed=s).edges)) for s in range(6)}
    assert len(others) > 1
    two = make_topology("regular:2", 30, seed=0)  # needs redraws until it is one cycle
    assert nx.is_connected(two) and degrees(two) == [2] * 30


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spec,n,match", [
    ("hypercube", 8, "unknown topology 'hypercube'.*ring.*file"),
    ("regular", 8, "regular:D"),
    ("regular:x", 8, "integer degree"),
    ("regular:3", 7, "odd"),
    ("regular:8", 8, "more than 8 workers"),
    ("regular:1", 6, "never connected"),
    ("regular:0", 6, "never connected"),
    ("ring:3", 8, "takes no parameter"),
    ("torus", 7, "no 2-D torus has 7 nodes"),
    ("torus", 3, "no 2-D torus has 3 nodes"),
    ("ring", 0, "at least 1 worker"),
])
def test_bad_generator_specs(spec, n, match):
    with raises_one_line(match):
        make_topology(spec, n)


@pytest.mark.timeout(60)
def test_topology_error_is_user_error():
    assert issubclass(TopologyError, UserError)


# --------------------------------------------------------------------------- files


def _weighted_example() -> nx.Graph:
    g = nx.Graph()
    g.add_edge(0, 1, weight=1.0)
    g.add_edge(1, 2, weight=2.5)
    g.add_edge(2, 3, weight=3.0)
    g.add_edge(3, 0, weight=0.125)
    g.add_edge(0, 2, weight=7.0)
    return g


def _edges(g: nx.Graph) -> dict:
    return {(min(u, v), max(u, v)): d.get("weight", 1) for u, v, d in g.edges(data=True)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ext", sorted(FILE_FORMATS))
def test_round_trip(tmp_path, ext):
    g = _weighted_example() if ext != ".adjlist" else make_topology("exponential", 8)
    path = tmp_path / f"g{ext}"
    save_topology(g, path)
    h = load_topology(path)
    assert sorted(h.nodes) == sorted(g.nodes)
    assert all(isinstance(v, int) for v in h.nodes)
    assert _edges(h) == _edges(g)
    h = validate_topology(h, g.number_of_nodes())
    assert np.allclose(expected_gossip_matrix(h), expected_gossip_matrix(g))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file
    assert make_topology(str(path), 99).number_of_edges() == g.number_of_edges()


@pytest.mark.timeout(60)
def test_round_trip_single_node(tmp_path):
    for ext in sorted(FILE_FORMATS):
        path = tmp_path / f"one{ext}"
        save_topology(make_topology("ring", 1), path)
        h = validate_topology(load_topology(path), 1)
        assert list(h.nodes) == [0] and h.number_of_edges() == 0


@pytest.mark.timeout(60)
def test_adjlist_refuses_weights(tmp_path):
    with raises_one_line("cannot store edge weights"):
        save_topology(_weighted_example(), tmp_path / "w.adjlist")
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(60)
def test_edgelist_spellings(tmp_path):
    path = tmp_path / "g.edges"
    path.write_text("# a comment\n0 1\n1 2 3  # trailing comment\n\n2 3 {'weight': 2}\n"
                    "3 0 {'weight': 0.5, 'colour': 'red'}\n")
    g = load_topology(path)
    assert _edges(g) == {(0, 1): 1, (1, 2): 3, (2, 3): 2, (0, 3): 0.5}
    assert g[3][0]["colour"] == "red"
    # what networkx itself writes is accepted
    nx.write_edgelist(_weighted_example(), tmp_path / "nx.edgelist", data=True)
    assert _edges(load_topology(tmp_path / "nx.edgelist")) == _edges(_weighted_example())
    nx.write_weighted_edgelist(_weighted_example(), tmp_path / "nxw.txt")
    assert _edges(load_topology(tmp_path / "nxw.txt")) == _edges(_weighted_example())


@pytest.mark.timeout(60)
def test_json_edges_key_and_directed(tmp_path):
    data = {"directed": True, "multigraph": False, "graph": {},
            "nodes": [{"id": "0"}, {"id": "1"}, {"id": "2"}],
            "edges": [{"source": "0", "target": "1", "weight": 2},
                      {"source": "1", "target": "0", "weight": 2},
                      {"source": "1", "target": "2"}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    g = load_topology(path)
    assert not g.is_directed() and _edges(g) == {(0, 1): 2, (1, 2): 1}
    data["edges"][1]["weight"] = 5
    path.write_text(json.dumps(data))
    with raises_one_line("0->1 has weight 2 but 1->0 has weight 5"):
        load_topology(path)


@pytest.mark.timeout(60)
def test_multigraph_parallel_edges(tmp_path):
    path = tmp_path / "m.gml"
    path.write_text("graph [ multigraph 1 node [ id 0 ] node [ id 1 ] "
                    "edge [ source 0 target 1 ] edge [ source 0 target 1 ] ]")
    with raises_one_line("edge 0-1 appears 2 times"):
        load_topology(path)
    m = nx.MultiGraph([(0, 1), (1, 2), (1, 2)])
    with raises_one_line("appears 2 times"):
        validate_topology(m, 3)
    assert _edges(validate_topology(nx.MultiGraph([(0, 1), (1, 2)]), 3)) == {(0, 1): 1,
                                                                                (1, 2): 1}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,n", [
    ("ring8.edgelist", 8), ("ring4.edgelist", 4), ("torus16.edgelist", 16),
    ("exponential8.adjlist", 8), ("complete8.json", 8), ("star8.graphml", 8),
    ("weighted_ring4.edgelist", 4), ("bipartite8.gml", 8),
])
def test_ready_files(name, n):
    g = validate_topology(make_topology(str(READY / name), n), n)
    assert g.number_of_nodes() == n
    kind = name.split(".")[0].rstrip("0123456789")
    if kind != "weighted_ring":
        assert _edges(g) == _edges(make_topology(kind, n))
    else:
        assert describe(g)["weighted"]
        assert neighbor_probabilities(g)[0] == ([1, 3], [0.25, 0.75])
    with raises_one_line(f"topology has {n} nodes but there are {n + 1} workers; give "
                         f"--workers {n} or a topology with {n + 1} nodes"):
        validate_topology(g, n + 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ext,text", [
    (".edgelist", "0 1 2 3 4\n"),
    (".edgelist", "0 1 {'weight': \n"),
    (".edgelist", "0 1 {'weight': 1}\n1 0\n"),
    (".edges", "0 1 [1, 2]\n"),
    (".txt", "0 1 abc\n"),
    (".adjlist", b"\xff\xfe\x00 0 1\n"),
    (".graphml", "<graphml><graph><node id='0'></graph>"),
    (".gml", "graph [ node [ id 0 ] edge [ source 0 "),
    (".gml", "this is not gml"),
    (".json", "{\"nodes\": [}"),
    (".json", "[1, 2, 3]"),
    (".json", "{\"nodes\": [{\"id\": 0}], \"links\": [{\"source\": 0}]}"),
])
def test_malformed_files(tmp_path, ext, text):
    path = tmp_path / f"bad{ext}"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    fmt = FILE_FORMATS[ext]
    with raises_one_line(f"cannot parse topology file .*bad\\{ext} as {fmt}: "):
        load_topology(path)
    with raises_one_line("cannot parse topology file"):
        make_topology(str(path), 2)


@pytest.mark.timeout(60)
def test_file_errors(tmp_path):
    with raises_one_line("unknown extension '.csv'.*\\.edgelist"):
        load_topology(tmp_path / "g.csv")
    (tmp_path / "g.csv").write_text("0 1\n")
    with raises_one_line("unknown extension '.csv'"):
        make_topology(str(tmp_path / "g.csv"), 2)
    with raises_one_line("does not exist"):
        load_topology(tmp_path / "missing.edgelist")
    with raises_one_line("does not exist"):
        make_topology(str(tmp_path / "missing.json"), 2)
    (tmp_path / "dir.gml").mkdir()
    with raises_one_line("is not a file"):
        load_topology(tmp_path / "dir.gml")
    with raises_one_line("folder .* does not exist"):
        save_topology(make_topology("ring", 4), tmp_path / "no" / "such" / "ring.edgelist")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ext,text,match", [
    (".edgelist", "a b\n", "node label 'a' is not a rank.*0..n-1"),
    (".edgelist", "0 1\n1 01\n", "both mean rank 1"),
    (".adjlist", "x y\n", "node label 'x' is not a rank"),
    (".adjlist", "0 -1\n", "node label '-1' is not a rank"),
    (".json", json.dumps({"nodes": [{"id": 1}, {"id": "1"}], "links": []}),
     "labels 1 and '1' both mean rank 1"),
    (".json", json.dumps({"nodes": [{"id": 0.5}, {"id": 1}],
                          "links": [{"source": 0.5, "target": 1}]}), "0.5 is not a rank"),
])
def test_non_integer_labels(tmp_path, ext, text, match):
    path = tmp_path / f"labels{ext}"
    path.write_text(text)
    with raises_one_line(match):
        load_topology(path)


# --------------------------------------------------------------------------- validation


@pytest.mark.timeout(60)
def test_validate_messages():
    ring = make_topology("ring", 5)
    with raises_one_line("topology has 5 nodes but there are 8 workers; give --workers 5 or a "
                         "topology with 8 nodes"):
        validate_topology(ring, 8)
    with raises_one_line("no nodes"):
        validate_topology(nx.Graph(), 3)
    with raises_one_line("ranks 0..2: missing \\[2\\], unexpected \\[7\\]"):
        validate_topology(nx.Graph([(0, 1), (1, 7)]), 3)
    loop = make_topology("ring", 4)
    loop.add_edge(2, 2)
    with raises_one_line("self-loop on node 2"):
        validate_topology(loop, 4)
    disc = nx.Graph([(0, 1), (1, 2), (2, 0), (3, 4)])
    with raises_one_line("disconnected: 2 components \\(smallest: nodes \\[3, 4\\]\\)"):
        validate_topology(disc, 5)
    iso = make_topology("ring", 3)
    iso.add_node(3)
    with raises_one_line("disconnected: 2 components \\(smallest: nodes \\[3\\]\\)"):
        validate_topology(iso, 4)
    for bad in (-1.0, 0, 0.0, "abc", "2", float("nan"), float("inf"), None, True, [1]):
        g = make_topology("ring", 4)
        g[1][2]["weight"] = bad
        with raises_one_line("edge 1-2 has weight .*finite numbers > 0"):
            validate_topology(g, 4)
    with raises_one_line("networkx graph"):
        validate_topology([(0, 1)], 2)
    with raises_one_line("workers must be >= 1"):
        validate_topology(ring, 0)
    one = nx.Graph()
    one.add_node(0)
    assert validate_topology(one, 1).number_of_nodes() == 1


@pytest.mark.timeout(60)
def test_validate_returns_int_labelled_copy():
    g = nx.Graph()
    g.add_edge("1", "0", weight=2)
    g.add_edge("1", "2")
    h = validate_topology(g, 3)
    assert list(h.nodes) == [0, 1, 2]
    assert h[0][1]["weight"] == 2.0 and isinstance(h[0][1]["weight"], float)
    h[0][1]["weight"] = 9
    assert g["0"]["1"]["weight"] == 2  # a copy
    d = validate_topology(nx.DiGraph([(0, 1), (1, 2), (2, 0)]), 3)
    assert not d.is_directed() and d.number_of_edges() == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ext,text,match", [
    (".edgelist", "0 1 -1\n1 2\n", "edge 0-1 has weight -1"),
    (".edgelist", "0 1 0\n1 2\n", "edge 0-1 has weight 0"),
    (".edgelist", "0 1 {'weight': 'heavy'}\n1 2\n", "edge 0-1 has weight 'heavy'"),
    (".edgelist", "0 1\n1 1\n", "self-loop on node 1"),
    (".edgelist", "0 1\n2 3\n", "disconnected"),
    (".json", json.dumps({"nodes": [{"id": 0}, {"id": 1}],
                          "links": [{"source": 0, "target": 1, "weight": "x"}]}),
     "edge 0-1 has weight 'x'"),
])
def test_bad_file_contents_fail_validation(tmp_path, ext, text, match):
    path = tmp_path / f"g{ext}"
    path.write_text(text)
    with raises_one_line(match):
        validate_topology(load_topology(path), len(load_topology(path)))


# --------------------------------------------------------------------------- spectra


@pytest.mark.timeout(60)
def test_neighbor_probabilities():
    p = neighbor_probabilities(make_topology("star", 5))
    assert p[0] == ([1, 2, 3, 4], [0.25] * 4)
    assert p[3] == ([0], [1.0])
    g = make_topology("ring", 4)
    g[0][1]["weight"] = 1
    g[0][3]["weight"] = 3
    nb, pr = neighbor_probabilities(g)[0]
    assert nb == [1, 3] and pr == pytest.approx([0.25, 0.75])
    nb, pr = neighbor_probabilities(g)[1]  # edge 1-2 has the default weight 1
    assert nb == [0, 2] and pr == pytest.approx([0.5, 0.5])
    for i, (nb, pr) in neighbor_probabilities(make_topology("regular:3", 10)).items():
        assert nb == sorted(nb) and i not in nb and math.isclose(sum(pr), 1.0)
    assert neighbor_probabilities(make_topology("ring", 1)) == {0: ([], [])}


def _simulated_mean_matrix(g: nx.Graph, events: int, seed: int) -> np.ndarray:
    """Mean of the actual averaging operators over random events (worker i uniform, j with
    p_ij), each applied to the identity: the empirical expected gossip matrix."""
    rng = np.random.default_rng(seed)
    probs = neighbor_probabilities(g)
    n = len(probs)
    ii = rng.integers(0, n, size=events)
    counts = np.zeros((n, n))
    for i in range(n):
        nb, p = probs[i]
        picked = rng.choice(nb, size=int((ii == i).sum()), p=p)
        np.add.at(counts[i], picked, 1)
    total = np.zeros((n, n))
    for i, j in zip(*np.nonzero(counts), strict=True):
        x = np.eye(n)
        x[[i, j]] = (x[i] + x[j]) / 2  # x_i, x_j <- (x_i + x_j) / 2
        total += counts[i, j] * x
    return total / events


@pytest.mark.timeout(60)
@pytest.mark.parametrize("g", [
    make_topology("ring", 6), make_topology("star", 5),
    validate_topology(load_topology(READY / "weighted_ring4.edgelist"), 4),
], ids=["ring6", "star5", "weighted_ring4"])
def test_expected_matrix_matches_simulation(g):
    w = expected_gossip_matrix(g)
    emp = _simulated_mean_matrix(g, 200_000, seed=0)
    assert np.abs(emp - w).max() < 4e-3
    n = len(w)
    assert np.allclose(w, w.T) and np.allclose(w.sum(0), 1) and np.allclose(w.sum(1), 1)
    ev = np.linalg.eigvalsh(w)
    assert ev.min() > -1e-12 and math.isclose(ev.max(), 1.0)
    assert spectral_gap(g) == pytest.approx(1 - ev[-2])
    assert 0 < spectral_gap(g) <= 1 and n == g.number_of_nodes()


@pytest.mark.timeout(60)
def test_spectral_gap_closed_forms():
    for n in (3, 5, 8, 16):  # ring: L eigenvalues 2 - 2cos(2 pi k / n), p_ij = 1/2
        assert spectral_gap(make_topology("ring", n)) == pytest.approx(
            (1 - math.cos(2 * math.pi / n)) / n)
    for n in (2, 4, 8):  # complete: 1 / (n - 1)
        assert spectral_gap(make_topology("complete", n)) == pytest.approx(1 / (n - 1))
    assert spectral_gap(make_topology("ring", 2)) == pytest.approx(1.0)
    assert spectral_gap(make_topology("ring", 1)) == 1.0
    gaps = [spectral_gap(make_topology("ring", n)) for n in (4, 6, 8, 12, 16, 32)]
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False))
    assert spectral_gap(make_topology("complete", 8)) > spectral_gap(
        make_topology("exponential", 8)) > spectral_gap(make_topology("ring", 8))


@pytest.mark.timeout(60)
def test_weights_change_the_matrix():
    g = make_topology("ring", 4)
    w = expected_gossip_matrix(g)
    g[0][1]["weight"] = 3.0
    wv = expected_gossip_matrix(g)
    # p_01 = 3/4, p_10 = 3/4 -> W_01 = (p_01 + p_10) / (2 n) = 1.5 / 8
    assert wv[0, 1] == pytest.approx(1.5 / 8) and w[0, 1] == pytest.approx(1 / 8)
    assert np.allclose(wv.sum(0), 1) and np.allclose(wv, wv.T)
    g[0][1]["weight"] = 6.0  # scaling all weights of a node's edges changes nothing...
    g[0][3]["weight"] = 2.0
    g[1][2]["weight"] = 2.0
    g[2][3]["weight"] = 2.0
    assert np.allclose(expected_gossip_matrix(g), wv)


# --------------------------------------------------------------------------- reports


@pytest.mark.timeout(60)
def test_describe_and_draw(tmp_path):
    d = describe(make_topology("ring", 8))
    assert d["n"] == 8 and d["edges"] == 8 and d["degrees"] == [2] * 8
    assert (d["degree_min"], d["degree_mean"], d["degree_max"]) == (2, 2.0, 2)
    assert d["bipartite"] is True and d["diameter"] == 4 and not d["weighted"]
    assert d["spectral_gap"] == pytest.approx(spectral_gap(make_topology("ring", 8)))
    json.dumps(d)
    s = describe(make_topology("star", 8))
    assert s["degree_max"] == 7 and s["diameter"] == 2
    assert describe(make_topology("ring", 1))["diameter"] == 0
    assert describe(make_topology("complete", 5))["bipartite"] is False
    text = describe_text(make_topology("ring", 8), "ring8")
    assert "ring8" in text and "spectral gap" in text and len(text.splitlines()) >= 4
    assert "weighted" in describe_text(load_topology(READY / "weighted_ring4.edgelist"), "w")
    png = tmp_path / "t.png"
    draw_topology(make_topology("torus", 16), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    draw_topology(make_topology("ring", 1), png)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.png"]
    with raises_one_line("does not exist"):
        draw_topology(make_topology("ring", 4), tmp_path / "nope" / "t.png")


# --------------------------------------------------------------------------- fuzzing

_TOKENS = st.sampled_from([
    "0", "1", "2", "-1", "1.5", "x", "{", "}", "[", "]", "'weight'", ":", ",", "\"", "'",
    "#", "\n", " ", "graph", "node", "edge", "id", "label", "source", "target", "weight",
    "multigraph", "directed", "nodes", "links", "edges", "null", "true", "nan", "1e999",
    "\"id\"", "\"source\"", "\"target\"", "\"nodes\"", "\"links\"", "\"weight\"", "\\",
])
_SOUP = st.lists(_TOKENS, max_size=40).map("".join)
_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=False)
    | st.sampled_from(["0", "1", "a", "id", "source", "target"]),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["nodes", "links", "edges", "id", "source", "target", "weight",
                         "directed", "multigraph", "graph", "key"]), kids, max_size=5),
    max_leaves=20,
).map(json.dumps)


@pytest.mark.timeout(60)
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ext=st.sampled_from([".edgelist", ".json", ".gml"]),
       text=st.one_of(st.text(max_size=200), _SOUP, _JSONISH))
def test_fuzz_loaders_raise_only_topology_error(tmp_path, ext, text):
    path = tmp_path / f"fuzz{ext}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        g = load_topology(path)
        validate_topology(g, max(1, g.number_of_nodes()))
        describe(g)
    except TopologyError as e:
        assert str(e) and "\n" not in str(e)
