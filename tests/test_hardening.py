"""Property-based input hardening: generated bad inputs to every loader and to the CLI
give only clean one-line user errors (never another exception, never a traceback).

Each property runs 1,000 generated inputs (hypothesis ``max_examples``). The inputs are the
same on every run (``derandomize``), so CI's verdict depends on the code, not on the draw;
``APAM_GOSSIP_FUZZ=random`` draws new ones, to hunt for bugs (each found one becomes an
``@example``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from apam_gossip.cli import _build_config, build_parser
from apam_gossip.config import ConfigError, RunConfig, load_config
from apam_gossip.errors import UserError
from apam_gossip.profiles import load_profile
from apam_gossip.topology import TopologyError, load_topology, validate_topology

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
N = 1000
SETTINGS = settings(max_examples=N, deadline=None, database=None,
                    derandomize=os.environ.get("APAM_GOSSIP_FUZZ") != "random",
                    suppress_health_check=list(HealthCheck))
TMP = Path(tempfile.mkdtemp(prefix="apam-hardening-"))

# text that looks a little like the real formats, so the parsers get past their first line
scalars = st.one_of(st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.text(max_size=12), st.none())
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), c,
                                                                    max_size=4)), max_leaves=8)
keys = st.sampled_from(["mode", "workers", "model", "epochs", "steps", "seed", "slowdown",
                        "evals", "device", "topology", "data", "optim", "network", "lr",
                        "batch_size", "dataset", "name", "beta1", "links", "x", ""])
nested = st.dictionaries(keys, st.one_of(values, st.dictionaries(keys, values, max_size=5)),
                         max_size=6)
graph_text = st.lists(st.one_of(
    st.text(alphabet="0123456789 -.\t{}:'\"weightabc#\n,[]", max_size=30),
    st.builds(lambda a, b, w: f"{a} {b} {w}", st.integers(-3, 12), st.integers(-3, 12),
              st.one_of(st.floats(), st.integers(-5, 5), st.text(max_size=4))),
), max_size=12).map("\n".join)


def _one_line(e: Exception) -> None:
    assert "\n" not in str(e), str(e)
    assert str(e)


@pytest.mark.parametrize("ext", [".edgelist", ".adjlist", ".json", ".gml", ".graphml"])
@SETTINGS
@given(text=st.one_of(graph_text, st.text(max_size=200)), n=st.integers(0, 12))
def test_topology_reader(ext, text, n):
    path = TMP / f"t{ext}"
    path.write_text(text)
    try:
        g = load_topology(path)
        validate_topology(g, n)
    except TopologyError as e:
        _one_line(e)


@SETTINGS
@given(d=nested)
def test_config_from_dict(d):
    try:
        RunConfig.from_dict(d)
    except ConfigError as e:
        _one_line(e)


@SETTINGS
@given(d=nested, fmt=st.sampled_from([".json", ".toml"]), raw=st.text(max_size=120))
@example(d={"data": {"\n": None}}, fmt=".json", raw="000")  # a key with a newline in it
def test_config_file_loader(d, fmt, raw):
    path = TMP / f"c{fmt}"
    if fmt == ".json":
        path.write_text(json.dumps(d, default=str) if len(raw) % 2 else raw)
    else:
        path.write_text(raw)
    try:
        load_config(path)
    except ConfigError as e:
        _one_line(e)


toml_line = st.builds(
    lambda k, v: f"{k} = {v}",
    st.sampled_from(["workers", "name", "slowdown", "latency_ms", "modes", "target",
                     "epochs", "lr", "model", "links", "straggler_prob", "x"]),
    st.sampled_from(["3", "-1", "0", "1e9", "nan", "'ring'", "[1, 2]", "[[0, 1, 2, 3]]",
                     "['centralized']", "true", "{ a = 1 }", "1.5", "[]", "'digits'"]))
profile_text = st.lists(st.one_of(toml_line, st.sampled_from(
    ["[compute]", "[network]", "[run]", "[smoke]", "[other]", "", "= broken"])),
    max_size=10).map("\n".join)


@SETTINGS
@given(text=st.one_of(profile_text, st.text(max_size=150)), smoke=st.booleans())
def test_profile_loader(text, smoke):
    path = TMP / "p.toml"
    path.write_text(text)
    try:
        load_profile(path, smoke=smoke)
    except ConfigError as e:
        _one_line(e)


flag_values = st.sampled_from(["0", "-1", "1", "4", "1e-3", "nan", "inf", "x", "", "1=2",
                               "a=b", "9=3", "ring", "digits", "mlp", "lenet5", "sgd"])
flags = st.sampled_from(["--workers", "--lr", "--beta1", "--beta2", "--eps", "--epochs",
                         "--steps", "--batch-size", "--model", "--dataset", "--mode",
                         "--slow", "--alpha", "--partition", "--evals", "--device",
                         "--seed", "--momentum", "--timeout", "--threads-per-worker",
                         "--topology", "--adaptive-state", "--train-limit", "--bogus"])
argv = st.lists(st.one_of(flags, flag_values), max_size=8)


@SETTINGS
@given(args=argv)
def test_cli_arguments(args, capsys):
    """Everything up to the start of training: parsing and the config."""
    parser = build_parser()
    try:
        ns = parser.parse_args(["train", *args])
        _build_config(ns)
    except SystemExit as e:
        assert e.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("apam-gossip: error: "), err
    except UserError as e:
        _one_line(e)
