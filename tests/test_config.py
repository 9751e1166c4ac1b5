"""Pure tier: config validation and loading."""

from __future__ import annotations

import json

import pytest

from apam_gossip.config import ConfigError, RunConfig, load_config

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("d,field", [
    ({"optim": {"lr": 0}}, "optim.lr"),
    ({"optim": {"lr": -1e-3}}, "optim.lr"),
    ({"optim": {"beta1": 1.0}}, "optim.beta1"),
    ({"optim": {"beta2": -0.1}}, "optim.beta2"),
    ({"optim": {"eps": -1}}, "optim.eps"),
    ({"optim": {"name": "lamb"}}, "optim.name"),
    ({"workers": 0}, "workers"),
    ({"model": "resnet"}, "model"),
    ({"mode": "federated"}, "mode"),
    ({"data": {"dataset": "imagenet"}}, "data.dataset"),
    ({"data": {"batch_size": 0}}, "data.batch_size"),
    ({"data": {"partition": "dirichlet", "dirichlet_alpha": 0}}, "data.dirichlet_alpha"),
    ({"epochs": 0}, "epochs"),
    ({"steps": 0}, "steps"),
    ({"slowdown": [1, 0.5]}, "slowdown[1]"),
    ({"workers": 2, "slowdown": [1, 1, 1]}, "slowdown"),
    ({"lr": 0.1}, "unknown config key lr"),
    ({"optim": {"learning_rate": 0.1}}, "optim.learning_rate"),
    ({"workers": "4"}, "workers must be an integer"),
    ({"workers": 2.5}, "workers must be an integer"),
    ({"optim": {"bias_correction": "no"}}, "optim.bias_correction must be true or false"),
    ({"optim": {"lr": float("nan")}}, "optim.lr"),
    ({"data": 3}, "data must be a table"),
])
def test_invalid_values_name_the_field(d, field):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(d)
    assert field in str(e.value)
    assert "\n" not in str(e.value)


def test_defaults_valid_and_round_trip():
    c = RunConfig()
    c.validate()
    assert RunConfig.from_dict(c.to_dict()) == c
    c2 = c.replace(workers=3, optim={"lr": 0.5})
    assert c2.workers == 3 and c2.optim.lr == 0.5 and c2.optim.beta1 == c.optim.beta1


def test_ints_accepted_for_floats():
    assert RunConfig.from_dict({"optim": {"lr": 1}}).optim.lr == 1.0


def test_slowdown_of_pads_with_one():
    c = RunConfig.from_dict({"workers": 4, "slowdown": [10]})
    assert [c.slowdown_of(i) for i in range(4)] == [10, 1, 1, 1]


def test_load_toml_and_json(tmp_path):
    t = tmp_path / "c.toml"
    t.write_text('mode = "centralized"\nworkers = 3\n[optim]\nlr = 0.01\n[data]\nbatch_size = 8\n')
    c = load_config(t, {"optim": {"beta1": 0.5}})
    assert (c.workers, c.optim.lr, c.optim.beta1, c.data.batch_size) == (3, 0.01, 0.5, 8)
    j = tmp_path / "c.json"
    j.write_text(json.dumps(c.to_dict()))
    assert load_config(j) == c


@pytest.mark.parametrize("name,content,msg", [
    ("missing.toml", None, "cannot read config file"),
    ("bad.toml", "workers = = 3", "is not valid TOML"),
    ("bad.json", "{workers: 3", "is not valid JSON"),
    ("c.yaml", "workers: 3", "must end in .toml or .json"),
    ("list.json", "[1, 2]", "must hold a table"),
    ("bin.toml", b"\xff\xfe\x00", "not UTF-8"),
    ("v.toml", "workers = -2", "workers must be >= 1"),
])
def test_unreadable_configs(tmp_path, name, content, msg):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(p)
    assert "\n" not in str(e.value)


def test_an_error_quoting_a_key_with_control_characters_stays_on_one_line(tmp_path):
    # found by test_hardening's fuzzing: a JSON key "\n" under [data] printed a two-line error
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"data": {"\n\x1b[2J": None}}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    assert "unknown config key data.\\n\\x1b[2J" in str(e.value)
