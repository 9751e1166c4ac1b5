"""Cluster profiles and `apam-gossip bench PROFILE` (the smoke size, real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from apam_gossip.cli import main
from apam_gossip.config import ConfigError
from apam_gossip.profiles import BENCH_MODES, load_profile

LAUNCH = Path(__file__).parent.parent / "launch"
PROFILES = sorted(LAUNCH.glob("profile_*.toml")) + sorted(LAUNCH.glob("study/*.toml"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("smoke", [False, True])
def test_shipped_profiles_load(path, smoke):
    p = load_profile(path, smoke=smoke)
    assert p.modes and all(m in BENCH_MODES for m in p.modes)
    for m in p.modes:
        cfg = p.config_for(m)
        cfg.validate()
        assert cfg.workers == p.base.workers
    if smoke:
        assert p.base.data.dataset == "digits"


@pytest.mark.timeout(30)
def test_profile_modes_map_to_configs():
    p = load_profile(LAUNCH / "profile_one_slow_worker.toml")
    assert p.config_for("allreduce-sgd").optim.name == "sgd"
    assert p.config_for("allreduce-sgd").optim.momentum == 0.9
    assert p.config_for("async-sgd").mode == "centralized"
    assert p.config_for("async-sgd").optim.lr == 0.01  # lr_overrides
    assert p.config_for("dpsgd").optim.lr == 3e-3  # lr_overrides
    gossip = p.config_for("decentralized").optim
    assert (gossip.lr, gossip.gossip_lr) == (1e-3, "workers")  # n x 1e-3 on the workers
    assert p.config_for("centralized").optim.name == "amsgrad"
    assert p.config_for("centralized").slowdown[7] == 20


@pytest.mark.timeout(30)
@pytest.mark.parametrize("content,needle", [
    (None, "cannot read cluster profile"),
    ("workers = = 2", "not valid TOML"),
    ("colour = 'red'", "unknown key 'colour'"),
    ("[compute]\nspeed = 2", "unknown [compute] key 'speed'"),
    ("[run]\nmodes = ['fastest']", "modes must be a non-empty list"),
    ("[run]\ntarget = 1.5", "target must be an accuracy"),
    ("workers = 2\n[compute]\nslowdown = [1, 0.5]", "slowdown[1] must be in [1, 1e6]"),
    ("workers = 2\n[network]\nlatency_ms = -1", "network.latency_ms must be >= 0"),
    ("[network]\nmaster_bandwidth_gbps = -1", "network.master_bandwidth_gbps must be >= 0"),
    ("[simulate]\ngradient_ms = 0", "[simulate] gradient_ms must be milliseconds > 0"),
    ("workers = 2\n[network]\nlinks = [[0, 5, 1, 1]]", "5 is not a worker"),
    ("[run]\nlr_overrides = { centralized = -1 }", "lr_overrides.centralized must be > 0"),
    ("[run]\nsgd_lr = 0", "optim.lr must be > 0"),
])
def test_bad_profiles_are_one_line_errors(tmp_path, capsys, content, needle):
    path = tmp_path / "p.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=None) as e:
        load_profile(path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    out = tmp_path / "r.json"
    assert main(["bench", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.timeout(170)
def test_bench_smoke_runs_every_mode(tmp_path):
    """The CI smoke size: every mode of the 8-worker one-slow-worker profile, real
    processes, on the digits data; a table, a JSON and two PNGs."""
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "apam_gossip", "bench",
                        str(LAUNCH / "profile_one_slow_worker.toml"), "--smoke", "-q",
                        "-o", str(out)], capture_output=True, text=True, timeout=160)
    assert p.returncode == 0, p.stderr
    d = json.loads(out.read_text())
    modes = [r["mode"] for r in d["rows"]]
    assert modes == list(load_profile(LAUNCH / "profile_one_slow_worker.toml").modes)
    for mode in modes:
        assert mode in p.stdout
    rows = {r["mode"]: r for r in d["rows"]}
    assert rows["allreduce-amsgrad"]["speedup_vs_allreduce"] == pytest.approx(1.0)
    # the same budget for every mode
    assert len({d["runs"][m]["samples"] // 1000 for m in modes}) == 1
    # APAM's master keeps the 7 fast workers busy while the slow one computes (10x slower
    # by sleeping). The ratio depends on the machine's load (2.4x with the full suite and
    # a bench beside it on 2 cores, 3x+ alone): check the order, which load cannot flip
    cen = d["runs"]["centralized"]["workers"]
    assert min(w["updates"] for w in cen[:7]) > cen[7]["updates"], [w["updates"] for w in cen]
    for png in ("bench-accuracy.png", "bench-throughput.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
