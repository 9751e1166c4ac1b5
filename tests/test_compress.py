"""Compressed pairwise averaging (apam_gossip.core.compress), in-process against exact
references: the packets, the exchange's conservation of the sum, and consensus on
held-in graphs."""

from __future__ import annotations

import random
import re

import networkx as nx
import pytest
import torch

from apam_gossip.core.compress import (
    Compressor,
    Int8,
    TopK,
    default_gamma,
    encode_change,
    exchange_pair,
    mix,
    packet,
    parse_compress,
)


def decoded(comp: Compressor, v: torch.Tensor) -> torch.Tensor:
    q = packet(comp, v.numel())
    comp.encode(v, q)
    out = torch.zeros_like(v)
    comp.decode_add(q, out)
    return out


@pytest.mark.parametrize("n", [1, 1023, 1024, 1025, 5000])
def test_int8_is_within_half_a_step_per_block_and_4x_smaller(n):
    torch.manual_seed(n)
    v = torch.randn(n) * torch.logspace(-3, 3, n)  # blocks of very different scales
    got = decoded(Int8(), v)
    for b in range(0, n, 1024):
        blk = v[b:b + 1024]
        step = blk.abs().max() / 127
        assert (got[b:b + 1024] - blk).abs().max() <= step / 2 + 1e-6 * step
    assert Int8().nbytes(n) == n + 4 * (-(-n // 1024))
    assert 4 * 10**6 / Int8().nbytes(10**6) > 3.98


def test_int8_of_zeros_and_of_a_nan():
    assert torch.equal(decoded(Int8(), torch.zeros(10)), torch.zeros(10))
    v = torch.ones(10)
    v[3] = float("nan")
    assert torch.isnan(decoded(Int8(), v)).any()  # a diverged model is not hidden


def test_topk_sends_the_largest_entries_exactly():
    v = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, 0.05])
    comp = TopK(0.375)  # 3 of 8
    got = decoded(comp, v)
    assert torch.equal(got, torch.tensor([0, -5.0, 0, 3.0, 0, 0, 4.0, 0]))
    assert comp.nbytes(8) == 24 and TopK(0.01).nbytes(10**6) == 8 * 10**4


def test_a_packet_decodes_to_the_same_floats_everywhere():
    torch.manual_seed(0)
    v = torch.randn(3000)
    for comp in (Int8(), TopK(0.1), Compressor()):
        q = packet(comp, 3000)
        comp.encode(v, q)
        a, b = torch.randn(3000), None
        b = a.clone()
        comp.decode_add(q, a)
        comp.decode_add(q.clone(), b)
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec,err", [("int4", "none, int8 or topk:F"),
                                      ("topk:0", "fraction F in (0, 1]"),
                                      ("topk:1.5", "fraction F in (0, 1]"),
                                      ("topk:x", "fraction F in (0, 1]"),
                                      ("topk:nan", "fraction F in (0, 1]")])
def test_bad_specs_name_themselves(spec, err):
    with pytest.raises(ValueError, match=re.escape(err)):
        parse_compress(spec)
    assert parse_compress("none") is None and parse_compress("TopK:0.5").fraction == 0.5


@pytest.mark.parametrize("spec", ["int8", "topk:0.1", "topk:0.01"])
def test_an_exchange_moves_the_two_sides_by_opposite_amounts(spec):
    """x_i + x_j is conserved (to float rounding), the two sides' copies of the edge stay
    bit-identical when each side runs its own half (the MPI way), and that equals the
    one-process exchange bit for bit."""
    comp = parse_compress(spec)
    torch.manual_seed(1)
    n, g = 4000, default_gamma(comp)
    x0 = torch.randn(n)
    xi, xj = x0 + torch.randn(n), x0 + torch.randn(n)
    # one process holds the edge's one pair of copies
    a_i, a_j, p_ij, p_ji = xi.clone(), xj.clone(), x0.clone(), x0.clone()
    # two sides, each with its own copies of the pair
    b_i, b_j = xi.clone(), xj.clone()
    i_mine, i_theirs, j_mine, j_theirs = x0.clone(), x0.clone(), x0.clone(), x0.clone()
    for _ in range(20):
        s_ij, s_ji = a_i + a_j, None
        exchange_pair(comp, g, a_i, a_j, p_ij, p_ji)
        assert torch.allclose(a_i + a_j, s_ij, atol=1e-5)
        q_i, q_j = packet(comp, n), packet(comp, n)
        encode_change(comp, b_i, i_mine, q_i)  # i sends q_i ...
        encode_change(comp, b_j, j_mine, q_j)  # ... j answers q_j
        mix(comp, b_j, j_mine, j_theirs, q_j, q_i, g)
        mix(comp, b_i, i_mine, i_theirs, q_i, q_j, g)
        assert torch.equal(i_mine, j_theirs) and torch.equal(i_theirs, j_mine)
        assert torch.equal(b_i, a_i) and torch.equal(b_j, a_j) and torch.equal(i_mine, p_ij)
        del s_ji


def test_exact_compression_with_gamma_1_is_the_pairwise_average():
    torch.manual_seed(2)
    x0 = torch.randn(100)
    xi, xj = torch.randn(100), torch.randn(100)
    mean = (xi + xj) / 2
    exchange_pair(Compressor(), 1.0, xi, xj, x0.clone(), x0.clone())
    assert torch.allclose(xi, mean, atol=1e-6) and torch.allclose(xj, mean, atol=1e-6)


def _gossip(graph: nx.Graph, spec: str, exchanges: int, naive: bool = False, n: int = 2000,
            seed: int = 0) -> tuple[float, float]:
    """Random pairwise exchanges on ``graph`` from models around a common start: (the
    consensus distance's ratio to the start's, the mean's largest drift)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    comp = parse_compress(spec)
    g = default_gamma(comp)
    x0 = torch.randn(n)
    x = [x0 + torch.randn(n) for _ in graph]
    mean0 = torch.stack(x).mean(0)
    pub = {(i, j): x0.clone() for i, j in graph.edges()}
    pub.update({(j, i): x0.clone() for i, j in graph.edges()})

    def spread() -> float:
        m = torch.stack(x).mean(0)
        return float(sum(((xi - m) ** 2).sum() for xi in x))

    d0 = spread()
    for _ in range(exchanges):
        i = rng.randrange(len(x))
        j = rng.choice(list(graph.neighbors(i)))
        if naive:  # compress the models themselves and average: no copies, no feedback
            qi, qj = decoded(comp, x[i]), decoded(comp, x[j])
            x[i], x[j] = (x[i] + qj) / 2, (x[j] + qi) / 2
        else:
            exchange_pair(comp, g, x[i], x[j], pub[(i, j)], pub[(j, i)])
    drift = float((torch.stack(x).mean(0) - mean0).abs().max())
    return spread() / d0, drift


@pytest.mark.parametrize("graph", ["ring", "torus"])
@pytest.mark.parametrize("spec,exchanges", [("int8", 1500), ("topk:0.1", 3000),
                                            ("topk:0.01", 25000)])
def test_compressed_gossip_reaches_consensus_and_keeps_the_mean(graph, spec, exchanges):
    """On a 16-node ring and a 4x4 torus, with the default gamma: the consensus distance
    falls at least 1000x and the mean stays where it was (float rounding only); top-k
    without the public copies (compressing the models themselves) moves the mean."""
    g = nx.cycle_graph(16) if graph == "ring" else \
        nx.convert_node_labels_to_integers(nx.grid_2d_graph(4, 4, periodic=True))
    ratio, drift = _gossip(g, spec, exchanges)
    assert ratio < 1e-3, ratio
    assert drift < 1e-4, drift
    if spec.startswith("topk"):
        _, naive_drift = _gossip(g, spec, 300, naive=True)
        assert naive_drift > 100 * drift, (naive_drift, drift)


# ---------------------------------------------------- real workers on shared memory
@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec", ["int8", "topk:0.1"])
def test_compressed_gossip_on_shared_memory_keeps_the_sum_and_trains(digits, spec):
    """4 worker processes on a ring, each average a compressed exchange: the audit (sum of
    the models = the start + every local step) holds as for exact averaging, the run
    trains, and the result says what an average put on the wire."""
    from apam_gossip.runner import run

    from helpers import make_cfg

    base = dict(mode="decentralized", workers=4, steps=300, audit=True, evals=2)
    r = run(make_cfg(base, compress=spec), dataset=digits)
    extra = r.evals[-1].extra
    assert extra["audit_error"] <= 1e-5, extra["audit_error"]
    assert r.final_metric >= 0.8 and extra["averages"] >= 0.9 * r.updates
    numel = r.final_params.numel()
    assert extra["bytes_per_average"] == 2 * parse_compress(spec).nbytes(numel)
    exact = run(make_cfg(base, evals=1), dataset=digits).evals[-1].extra
    assert exact["bytes_per_average"] == 8 * numel
    assert exact["bytes_per_average"] / extra["bytes_per_average"] >= (
        3.98 if spec == "int8" else 4.99)  # top-10%: 8 bytes for each of n / 10 entries


@pytest.mark.timeout(300)
def test_fast_neighbour_choice_prefers_the_fast_link_and_keeps_the_floor(digits):
    """Worker 0's link to worker 1 is fast, to worker 3 slow (20 ms each way, emulated):
    with --neighbour-choice fast worker 0 averages mostly with 1, yet still with 3 at
    least at the floor share; uniform splits about evenly."""
    from apam_gossip.algorithms.adpsgd import NeighborPicker
    from apam_gossip.runner import run

    from helpers import make_cfg

    net = {"links": [[0, 3, 20.0, 10.0], [2, 3, 20.0, 10.0]]}
    cfgs = {c: make_cfg(mode="decentralized", workers=4, steps=160, network=net, evals=1,
                        neighbour_choice=c, overlap=False) for c in ("uniform", "fast")}
    chosen = {c: run(cfg, dataset=digits).workers[0].neighbours for c, cfg in cfgs.items()}
    fast, uniform = chosen["fast"], chosen["uniform"]
    share3 = fast.get("3", 0) / sum(fast.values())
    assert share3 < 0.35, chosen  # mostly the fast neighbour
    assert share3 >= 0.5 * NeighborPicker.FLOOR * 0.5, chosen  # never cut off
    assert 0.3 < uniform.get("3", 0) / sum(uniform.values()) < 0.7, chosen


# ----------------------------------------------------------------- under a real mpirun
@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec", ["int8", "topk:0.1"])
def test_compressed_gossip_under_mpirun_keeps_the_sum_and_trains(tmp_path, spec):
    """4 ranks: each average is one packet each way between the two ranks' server and
    training threads (refusals as for exact averaging); the audit holds, the run trains,
    and the result records the bytes of an average."""
    import json

    from test_mpi import cli, mpirun

    out = tmp_path / "r.json"
    p = mpirun(4, *cli("train", "--mode", "decentralized", "--epochs", "5", "--audit",
                       "--compress", spec, "-o", str(out)), timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(out.read_text())
    extra = d["evals"][-1]["extra"]
    assert extra["audit_error"] <= 1e-5 and d["final_accuracy"] >= 0.85, extra
    numel = d["n_params"]  # the MLP has no buffers: its state is its parameters
    assert extra["bytes_per_average"] == 2 * parse_compress(spec).nbytes(numel)


# --------------------------------------------------------------------- the simulator
SIM_COSTS = {"gradient_s": 1e-3, "master_update_s": 1e-4, "worker_update_s": 1e-4}


@pytest.mark.parametrize("spec", ["int8", "topk:0.1"])
def test_simulated_compressed_gossip_conserves_the_mean_and_reaches_consensus(digits, spec):
    """lr ~ 0 from 6 different starts on a ring (the copies start at each worker's own
    model, held once per edge): the simulator's compressed exchanges keep the mean and
    drive the models together, as the transports' do."""
    from apam_gossip.sim.run import simulate

    from helpers import make_cfg

    cfg = make_cfg(mode="decentralized", workers=6, steps=4000, evals=2, topology="ring",
                   optim={"lr": 1e-12}, compress=spec)
    probe = simulate(cfg.replace(steps=1), dataset=digits, compress_s=0.0, **SIM_COSTS)
    n = probe.final_params.numel()
    starts = torch.randn(6, n, generator=torch.Generator().manual_seed(0))
    r = simulate(cfg, dataset=digits, initial_models=starts, compress_s=0.0, **SIM_COSTS)
    assert (r.final_params - starts.mean(0)).abs().max() <= 1e-5
    first, last = r.evals[0].extra["consensus_distance"], r.evals[-1].extra["consensus_distance"]
    assert last <= 1e-4 * first, (first, last)


def test_simulated_packets_are_faster_on_a_slow_link_until_the_compression_costs_more():
    """A 25M-parameter model on 1 Gb/s between 8 workers, timing only: int8 packets cut
    the exchange, so the run is shorter than uncompressed; charged 2 s of compression per
    side, longer. The result records the bytes and the compression time used."""
    from apam_gossip.sim.run import simulate

    from helpers import make_cfg

    def wall(compress: str, **kw) -> object:
        cfg = make_cfg(mode="decentralized", workers=8, steps=400, evals=1,
                       topology="exponential", compress=compress, overlap=False,
                       network={"bandwidth_gbps": 1.0, "latency_ms": 0.05})
        return simulate(cfg, timing_only=True, gradient_s=0.05, worker_update_s=0.01,
                        master_update_s=0.01, model_params=25_000_000, gradient_cv=0.0,
                        **kw)

    plain, packed, costly = wall("none"), wall("int8", compress_s=0.0), \
        wall("int8", compress_s=2.0)
    assert packed.wall_time < 0.5 * plain.wall_time < costly.wall_time
    assert packed.evals[-1].extra["bytes_per_average"] == 2 * Int8().nbytes(25_000_000)
    assert plain.evals[-1].extra["bytes_per_average"] == 8 * 25_000_000
    assert costly.simulation["compress_s"] == 2.0


def test_simulated_fast_neighbour_choice_prefers_the_fast_link(digits):
    """Worker 0's link to 3 is slow (ring of 4): with fast choice it picks 1 most of the
    time and 3 at least at the floor; uniform splits evenly (virtual exchange times)."""
    from apam_gossip.sim.run import simulate

    from helpers import make_cfg

    net = {"links": [[0, 3, 50.0, 1.0], [2, 3, 50.0, 1.0]]}

    def share3(choice: str) -> float:
        cfg = make_cfg(mode="decentralized", workers=4, steps=2000, evals=1, network=net,
                       neighbour_choice=choice, overlap=False)
        got = simulate(cfg, timing_only=True, dataset=digits, gradient_cv=0.0,
                       **SIM_COSTS).workers[0].neighbours
        return got.get("3", 0) / sum(got.values())

    fast, uniform = share3("fast"), share3("uniform")
    assert 0.1 <= fast < 0.25 and 0.4 < uniform < 0.6, (fast, uniform)


def test_the_compiled_int8_and_the_cut_topk_match_the_plain_torch_ones(monkeypatch):
    """From FUSED_MIN_NUMEL entries int8 runs compiled loops and top-k cuts the vector at
    a sampled threshold first: the int8 packet is torch's byte for byte and decodes to
    the same floats (so a GPU rank and a CPU rank agree), and top-k picks the same
    entries as a full torch.topk."""
    from apam_gossip.core import compress as C

    n = C.FUSED_MIN_NUMEL + 777
    g = torch.Generator().manual_seed(3)
    x, pub = torch.randn(n, generator=g) * 3, torch.randn(n, generator=g)
    fast_pkt, plain_pkt = packet(Int8(), n), packet(Int8(), n)
    encode_change(Int8(), x, pub, fast_pkt)
    Int8().encode(x - pub, plain_pkt)  # (encode alone is torch's at any size)
    # into non-zero copies: a fused multiply-add would round differently there
    fast_dec = torch.randn(n, generator=g)
    plain_dec = fast_dec.clone()
    Int8().decode_add(fast_pkt, fast_dec)
    monkeypatch.setattr(C, "FUSED_MIN_NUMEL", 1 << 40)
    Int8().decode_add(fast_pkt, plain_dec)
    assert torch.equal(fast_pkt, plain_pkt) and torch.equal(fast_dec, plain_dec)
    monkeypatch.undo()
    comp = TopK(0.01)
    q = packet(comp, n)
    comp.encode(x, q)
    k = comp.k(n)
    got = torch.sort(q[:4 * k].view(torch.int32).long()).values
    assert torch.equal(got, torch.sort(torch.topk(x.abs(), k).indices).values)


def test_compress_settings_are_checked_where_they_apply():
    """A bad spec is a one-line config error naming it; tracked + compress only in the
    decentralized mode (elsewhere both are ignored settings); the spelling is normalised,
    so an upper-case none still makes --compress-gamma an ignored setting."""
    from apam_gossip.config import ConfigError, OptimConfig, RunConfig, ignored_settings

    with pytest.raises(ConfigError, match="topk:F needs a fraction"):
        RunConfig.from_dict({"mode": "decentralized", "compress": "topk:2"})
    with pytest.raises(ConfigError, match="use adaptive_state local"):
        RunConfig.from_dict({"mode": "decentralized", "compress": "int8",
                             "adaptive_state": "tracked"})
    RunConfig.from_dict({"mode": "centralized", "compress": "int8",
                         "adaptive_state": "tracked"})  # both ignored there: no error
    cfg = RunConfig.from_dict({"mode": "decentralized", "compress": " NONE",
                               "compress_gamma": 0.5})
    assert cfg.compress == "none"
    assert [k for k, _ in ignored_settings({"compress_gamma"}, ["decentralized"],
                                           OptimConfig(), cfg)] == ["compress_gamma"]


@pytest.mark.timeout(300)
def test_a_compressed_checkpoint_carries_the_copies_and_resumes_with_them(tmp_path, digits,
                                                                         monkeypatch):
    """SIGTERM mid-run (shared memory, int8): the checkpoint holds every edge's public
    copies with the models, from one instant under every lock; the resume takes them
    back (not a restart from the models) and the audit still holds to the end."""
    from apam_gossip.checkpoint import load_checkpoint
    from apam_gossip.runner import RunInterrupted, run
    from apam_gossip.transport.shm import ShmGossip

    from helpers import make_cfg, sigterm_at

    cfg = make_cfg(mode="decentralized", workers=4, epochs=20, evals=2, compress="int8",
                   audit=True, slowdown=[3, 3, 3, 3], checkpoint=str(tmp_path / "run.ckpt"))
    with pytest.raises(RunInterrupted, match="--resume"):
        run(cfg, dataset=digits, callback=sigterm_at(0.4))
    ck = load_checkpoint(cfg.checkpoint)
    ring_rows = 2 * 4  # a ring of 4: 4 edges, both directions
    assert ck["public"].shape == (ring_rows, ck["x"].shape[1])
    assert ck["public_edges"].shape == (ring_rows, 2)
    # the copies moved with the run: not the models' start any more
    assert not torch.equal(ck["public"][0], ck["public"][1])
    taken = []
    real = ShmGossip.start_public

    def spy(self, saved=None, edges=None):
        taken.append(real(self, saved, edges))
        return taken[-1]

    monkeypatch.setattr(ShmGossip, "start_public", spy)
    r = run(cfg, dataset=digits, resume=cfg.checkpoint)
    assert taken == [True]
    assert r.evals[-1].extra["audit_error"] <= 1e-5
