"""A user's own model, data, loss and metric, in every mode (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from user_models import DigitsBN, DigitsFrozen, blob_net, blobs, digits_net

from apam_gossip import run
from apam_gossip.checkpoint import load_checkpoint
from apam_gossip.cli import main
from apam_gossip.data import load_data
from apam_gossip.errors import UserError
from apam_gossip.procs import ChildFailed
from apam_gossip.task import Metric, make_task

from helpers import make_cfg

pytestmark = pytest.mark.timeout(240)
TESTS = Path(__file__).parent


@pytest.mark.parametrize("data", ["digits", "user_models:blobs"])
def test_one_worker_with_a_user_model_is_sequential_amsgrad(digits, data):
    """Nothing is special-cased for the built-ins: a user's model (and a user's
    TensorDataset read through a DataLoader) gives the sequential trajectory exactly."""
    model = "user_models:digits_net" if data == "digits" else "user_models:blob_net"
    kw = {"model": model, "workers": 1, "steps": 200, "data": {"dataset": data}}
    ds = digits if data == "digits" else None
    cen = run(make_cfg(kw, mode="centralized"), dataset=ds)
    seq = run(make_cfg(kw, mode="sequential"), dataset=ds)
    assert cen.staleness == {0: 200} and cen.task["model"] == model
    diff = (cen.final_params - seq.final_params).abs().max().item()
    assert diff <= 1e-6, diff
    x0, _ = make_task(make_cfg(kw), ds if ds is not None else load_data(make_cfg(kw)),
                      check=False).initial_state()
    assert (cen.final_params - x0).abs().max() > 1e-2  # it really trained


@pytest.mark.parametrize("mode", ["centralized", "decentralized",
                                  pytest.param("allreduce", marks=pytest.mark.slow)])
def test_python_objects_and_a_custom_metric_in_every_mode(mode):
    """run(model=callable, train_data=Dataset, test_data=Dataset, metric=Metric)."""
    train, test = blobs()
    err = Metric("error", lambda o, t: float((o.argmax(1) != t).float().mean()), False)
    r = run(make_cfg(mode=mode, workers=2, epochs=4, evals=2, optim={"lr": 1e-2}),
            model=blob_net, train_data=train, test_data=test, metric=err)
    assert r.metric == "error" and r.higher_is_better is False
    assert r.final_metric <= 0.05, [e.test_metric for e in r.evals]
    assert r.time_to_target(0.1) is not None  # lower is better: reached at or below
    assert r.task["model"].endswith("blob_net")


def test_the_default_metric_follows_the_model_accuracy_for_classes_else_the_loss():
    """metric "auto" (the default): a classifier is scored by accuracy; a regressor, which
    accuracy would score 0 without a word, by its own loss on the test set."""
    torch.manual_seed(0)
    x = torch.randn(96, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    reg = (torch.utils.data.TensorDataset(x[:64], y[:64]),
           torch.utils.data.TensorDataset(x[64:], y[64:]))
    head = lambda: torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0))  # noqa: E731
    r = run(make_cfg(mode="sequential", epochs=3, loss="mse", optim={"lr": 3e-2}),
            model=head, train_data=reg[0], test_data=reg[1])
    assert r.metric == "loss" and r.higher_is_better is False
    assert r.evals[-1].test_metric < r.evals[0].test_metric  # it is the loss, and it fell
    with torch.no_grad():  # the whole test set's loss of the final model
        model = head()
        torch.nn.utils.vector_to_parameters(r.final_params, model.parameters())
        want = torch.nn.functional.mse_loss(model(x[64:]), y[64:]).item()
    assert abs(r.final_metric - want) <= 1e-5 * max(1.0, want)
    train, test = blobs()
    cls = make_task(make_cfg(), load_data(make_cfg(data={"dataset": "digits"})), check=False)
    assert cls.metric_obj().name == "accuracy"
    from apam_gossip.data.user import UserData
    task = make_task(make_cfg(), UserData(train, test), model=blob_net, check=False)
    assert task.metric_obj().name == "accuracy"


def test_batchnorm_gossip_keeps_buffers_in_consensus(digits):
    """The BatchNorm statistics are averaged with the parameters: the workers' buffers
    agree about as closely as their parameters, and the averaged model scores well."""
    r = run(make_cfg(mode="decentralized", workers=4, epochs=15, evals=2, topology="ring",
                     optim={"lr": 4e-3}, data={"batch_size": 32}), dataset=digits,
            model=DigitsBN)
    x = r.evals[-1].extra
    assert r.final_metric >= 0.93, r.evals
    assert x["buffer_consensus_relative"] <= max(10 * x["consensus_relative"], 1e-3), x
    n = r.n_params
    assert r.final_params.numel() > n  # the state carries the buffers


@pytest.mark.parametrize("mode", ["centralized", pytest.param("allreduce", marks=pytest.mark.slow)])
def test_batchnorm_statistics_are_kept_by_the_master_and_reduced_in_allreduce(digits, mode):
    task_model = DigitsBN
    r = run(make_cfg(mode=mode, workers=2, epochs=8, evals=1, optim={"lr": 3e-3},
                     data={"batch_size": 32}), dataset=digits, model=task_model)
    x0, n = make_task(make_cfg(), digits, model=task_model, check=False).initial_state()
    moved = (r.final_params[n:] - x0[n:]).abs().max().item()
    assert moved > 1e-2  # running statistics were updated and reached the final model
    assert r.final_metric >= 0.9


def test_frozen_parameters_are_neither_trained_nor_counted(digits):
    r = run(make_cfg(mode="centralized", workers=2, steps=60), dataset=digits,
            model=DigitsFrozen)
    fresh = make_task(make_cfg(), digits, model=DigitsFrozen, check=False).build_model()
    assert r.n_params == sum(p.numel() for p in fresh.head.parameters())
    from apam_gossip.flat import flatten

    m = make_task(make_cfg(), digits, model=DigitsFrozen, check=False).build_model()
    flatten(m).state.copy_(r.final_params)
    assert torch.equal(m.project.weight, fresh.project.weight)  # same seed, never stepped
    assert not torch.equal(m.head.weight, fresh.head.weight)


@pytest.mark.parametrize("argv,needle", [
    (["--model", "nosuch.module:make"], "model 'nosuch.module:make': cannot import "
                                        "'nosuch.module' (ModuleNotFoundError"),
    (["--model", "user_models:nothere"], "'user_models' has no attribute 'nothere'"),
    (["--model", "user_models:broken_factory"], "model user_models:broken_factory raised "
                                                "ValueError: no such layer size"),
    (["--model", "user_models:not_a_module"], "returned int, not a torch.nn.Module"),
    (["--model", "user_models:complex_net"], "is complex (torch.complex64)"),
    (["--model", "user_models:blob_net"], "cannot take a batch of digits (inputs [2, 1, 8, 8])"),
    (["--data", "user_models:not_datasets"], "is a int, not a map-style"),
    (["--data", "user_models:one_dataset"], "returned a TensorDataset, not (train, test)"),
    (["--loss", "user_models:vector_loss"], "returned [2], not a scalar tensor"),
    (["--metric", "f1"],
     "--metric must be one of auto, accuracy, loss, mse, mae, rmse or an import"),
])
def test_bad_user_objects_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    out = tmp_path / "r.json"
    assert main(["train", *argv, "--workers", "2", "--steps", "5", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("apam-gossip: error: "), err
    assert needle in err, err
    assert not out.exists()


def test_a_loss_that_turns_nan_stops_the_run_naming_worker_and_step(tmp_path, digits):
    """Never a silent divergence: the worker that saw it and its step, and the last
    checkpoint (written while the model was finite) stays whole."""
    ckpt = tmp_path / "c.ckpt"
    cfg = make_cfg(mode="centralized", workers=2, steps=400, loss="user_models:nan_after_60",
                   checkpoint=str(ckpt), checkpoint_every_s=0.05, slowdown=[3, 3])
    with pytest.raises(ChildFailed, match=r"worker \d: the loss is nan at its step 61"):
        run(cfg, dataset=digits)
    if ckpt.exists():
        ck = load_checkpoint(ckpt)
        assert torch.isfinite(ck["x"]).all()


def test_user_data_by_import_string_from_the_command_line(tmp_path):
    """train --model/--data/--loss/--metric with import strings, real processes, and the
    RunResult records them."""
    import json

    out = tmp_path / "r.json"
    p = subprocess.run(
        [sys.executable, "-m", "apam_gossip", "train", "--mode", "decentralized",
         "--workers", "2", "--model", "user_models:blob_net", "--data", "user_models:blobs",
         "--metric", "user_models:error_rate", "--no-metric-higher-is-better",
         "--epochs", "4", "--lr", "1e-2", "-o", str(out), "-q"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(TESTS)})
    assert p.returncode == 0, p.stderr
    d = json.loads(out.read_text())
    assert d["metric"] == "user_models:error_rate" and d["higher_is_better"] is False
    assert d["task"]["model"] == "user_models:blob_net"
    assert d["final_metric"] <= 0.05
    assert "final_accuracy" not in d  # the metric is not accuracy


def test_datasets_must_be_given_together():
    train, _ = blobs()
    with pytest.raises(UserError, match="give both train_data and test_data"):
        run(make_cfg(), model=blob_net, train_data=train)


@pytest.mark.slow
def test_saved_user_model_loads_back(tmp_path, digits):
    from apam_gossip.model_io import load_model, save_model

    cfg = make_cfg(model="user_models:digits_net", mode="centralized", workers=2, steps=80)
    r = run(cfg, dataset=digits)
    path = tmp_path / "m.pt"
    save_model(path, r.final_params, make_task(cfg, digits, check=False))
    net = load_model(path)
    acc = float((net(digits.x_test).argmax(1) == digits.y_test).float().mean())
    assert acc == pytest.approx(r.final_metric, abs=1e-6)
    assert isinstance(net, digits_net().__class__)
