"""CLI: bad input gives one line and exit 2; a real run writes its RunResult JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from apam_gossip.cli import main
from apam_gossip.result import RunResult

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("argv,needle", [
    (["train", "--lr", "0"], "--lr must be > 0, got 0"),
    (["train", "--optim.lr", "-0.1"], "--optim.lr must be > 0"),
    (["train", "--beta1", "1.0"], "--beta1 must be < 1, got 1.0"),
    (["train", "--beta2", "-0.5"], "--beta2 must be >= 0"),
    (["train", "--workers", "0"], "--workers must be >= 1"),
    (["train", "--model", "resnet"], "--model must be one of mlp, lenet5, allcnn or an import "
                                     "string 'package.module:attribute', got 'resnet'"),
    (["train", "--dataset", "imagenet"], "--dataset must be one of digits, fashion-mnist"),
    (["train", "--lr", "abc"], "invalid float value: 'abc'"),
    (["train", "--slow", "3"], "use WORKER=FACTOR"),
    (["train", "--workers", "2", "--slow", "5=10"], "--slow names worker 5"),
    (["train", "--epochs", "1", "--steps", "3"], "--epochs and --steps both set the budget"),
    (["train", "--config", "/nonexistent/run.toml"], "cannot read config file"),
    (["train", "--dataset", "mnist", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    (["train", "--model", "lenet5", "--dataset", "digits"], "lenet5 needs images"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "--seed", "-1"], "--seed must be >= 0"),
    (["train", "--seed", "100000000000000000000000"], "--seed must be <= 4294967295"),
    (["train", "--threads-per-worker", "100000"], "--threads-per-worker must be <= 1024"),
    (["train", "--timeout", "1e300"], "--timeout must be <="),
    (["train", "--lr", "1e300"], "--lr must be <="),
    (["train", "--slow", "0=1e300"], "--slow (slowdown[0]) must be in [1, 1e6]"),
    (["train", "--lrr", "0.1"], "unrecognized arguments: --lrr 0.1; did you mean --lr?"),
    # a known flag plus a word: the flag, not a look-alike (--simulate was suggested)
    (["train", "--lr-rate", "0.1"], "--lr-rate 0.1; did you mean --lr?"),
    (["train", "--data.batch-size", "x"],
     "argument --data.batch-size/--batch-size: invalid int value"),
    (["compare", "--modes", "centralized,gossip"], "unknown mode 'gossip'"),
    (["compare", "--modes", "centralized,decentralized", "--workers", "4", "--topology",
      "topologies/ring8.edgelist"], "8 nodes but there are 4 workers"),
    (["compare", "--resume", "x.ckpt"], "unrecognized arguments: --resume"),
    (["compare", "--save-model", "m.pt"], "unrecognized arguments: --save-model"),
    (["compare", "--checkpoint", "c.ckpt"], "unrecognized arguments: --checkpoint"),
])
def test_bad_input_one_line_exit_2(argv, needle, capsys, tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        code = main([*argv, "-o", str(out)] if argv[0] in ("train", "compare") else argv)
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("apam-gossip: error: ")
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()  # nothing half-written


def test_bad_config_file_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[optim]\nlr = -3\n")
    assert main(["train", "--config", str(cfg), "-o", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optim.lr must be > 0" in err and str(cfg) in err


def test_missing_fashion_mnist_folder_exit_2(tmp_path, capsys):
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nope"),
                 "-o", str(tmp_path / "r.json")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err


def test_train_writes_result_json_via_console_entry(tmp_path):
    """The real entry point (`python -m apam_gossip`) in a subprocess, real processes."""
    out = tmp_path / "run.json"
    model = tmp_path / "model.pt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "apam_gossip", "train", "--mode", "centralized",
         "--workers", "2", "--steps", "60", "--evals", "3", "--slow", "1=3",
         "-o", str(out), "--save-model", str(model)],
        capture_output=True, text=True, timeout=100, env=env,
    )
    assert p.returncode == 0, p.stderr
    d = json.loads(out.read_text())
    assert d["mode"] == "centralized" and d["updates"] == 60
    assert d["config"]["slowdown"] == [1.0, 3.0]
    assert len(d["evals"]) >= 3 and {"wall_time", "samples", "train_loss", "test_acc"} <= set(
        d["evals"][-1])
    assert sum(d["staleness"].values()) == 60
    assert [w["worker"] for w in d["workers"]] == [0, 1]
    # where and how it ran, for a result read months later
    prov = d["provenance"]
    assert {"apam_gossip", "python", "torch", "numpy", "host", "started"} <= set(prov)
    assert prov["argv"][1:4] == ["train", "--mode", "centralized"]
    assert RunResult.from_dict(d).provenance == prov
    old = {k: v for k, v in d.items() if k != "provenance"}  # a result from before
    assert RunResult.from_dict(old).provenance == {}
    assert "final test accuracy" in p.stdout and str(out) in p.stdout
    # not on a terminal: plain progress lines, starting with the start-up
    assert "starting the worker processes" in p.stderr
    # outputs get the usual mode (0666 less the umask), not mkstemp's 0600
    mask = os.umask(0o022)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~mask
    assert (model.stat().st_mode & 0o777) == 0o666 & ~mask
    # the saved model is a ready nn.Module that scores what the run reported
    from apam_gossip import load_model
    from apam_gossip.data import load_dataset
    from apam_gossip.model_io import read_saved_model

    net = load_model(model)
    ds = load_dataset("digits")
    acc = float((net(ds.x_test).argmax(1) == ds.y_test).float().mean())
    assert acc == pytest.approx(d["final_accuracy"], abs=1e-6)
    meta = read_saved_model(model)
    assert meta["model"] == "mlp" and meta["model_args"]["in_shape"] == [1, 8, 8]
    assert meta["normalization"]["scale"] == 16.0 and len(meta["normalization"]["mean"]) == 1


def test_help_is_fast_and_clean():
    p = subprocess.run([sys.executable, "-m", "apam_gossip", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "train" in p.stdout and "demo" in p.stdout
    # fast because the command line imports torch only when a command needs it (a check
    # of what is imported, not of wall time)
    p = subprocess.run([sys.executable, "-c", "import sys, apam_gossip.cli.commands; "
                        "print('torch' in sys.modules)"], capture_output=True, text=True,
                       timeout=60)
    assert p.stdout.strip() == "False", p.stdout + p.stderr


def test_every_relative_import_in_the_package_resolves():
    """Function-local imports run only on their path (a stop under mpirun, say): resolve
    every one here, so a moved module is found at once, not by a user."""
    import ast
    import importlib.util
    from pathlib import Path

    import apam_gossip

    root = Path(apam_gossip.__file__).parent
    bad = []
    for f in root.rglob("*.py"):
        pkg = ".".join(("apam_gossip", *f.relative_to(root).with_suffix("").parts))
        if f.name != "__init__.py":
            pkg = pkg.rsplit(".", 1)[0]
        elif pkg.endswith(".__init__"):
            pkg = pkg[: -len(".__init__")]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), pkg)
                if importlib.util.find_spec(base) is None:
                    bad.append(f"{f.relative_to(root)}:{node.lineno}: {base}")
    assert not bad, bad


@pytest.mark.slow
def test_compare_prints_table_and_writes_plot(tmp_path):
    out, plot = tmp_path / "cmp.json", tmp_path / "cmp.png"
    p = subprocess.run(
        [sys.executable, "-m", "apam_gossip", "compare", "--workers", "2", "--steps", "80",
         "--evals", "3", "--topology", "ring", "--target", "0.5", "-o", str(out),
         "--plot", str(plot), "--quiet"],
        capture_output=True, text=True, timeout=110,
    )
    assert p.returncode == 0, p.stderr
    for mode in ("centralized", "decentralized", "sequential"):
        assert mode in p.stdout
    assert "time to acc>=50.00%" in p.stdout
    d = json.loads(out.read_text())
    assert [r["mode"] for r in d["runs"]] == ["centralized", "decentralized", "sequential"]
    # the same budget for every mode
    assert {r["updates"] for r in d["runs"]} == {80}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("spec,content,needle", [
    ("bad.edgelist", "0 1\n1 x y z\n", "cannot parse topology file"),
    ("disc.edgelist", "0 1\n2 3\n", "disconnected"),
    ("self.edgelist", "0 1\n1 1\n1 2\n2 3\n", "self-loop"),
    ("neg.edgelist", "0 1 -1\n1 2 1\n2 3 1\n", "weight"),
    ("three.edgelist", "0 1\n1 2\n", "3 nodes but there are 4 workers"),
    ("hexagon", None, "unknown topology 'hexagon'"),
])
def test_bad_topology_one_line_exit_2(tmp_path, capsys, spec, content, needle):
    if content is not None:
        (tmp_path / spec).write_text(content)
        spec = str(tmp_path / spec)
    out = tmp_path / "r.json"
    code = main(["train", "--mode", "decentralized", "--workers", "4", "--topology", spec,
                 "--steps", "5", "-o", str(out), "-q"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("apam-gossip: error: ") and needle in err, err
    assert not out.exists()
    assert main(["topology", spec, "--workers", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err


def test_topology_command_describes_and_draws(tmp_path, capsys):
    png = tmp_path / "t.png"
    assert main(["topology", "topologies/torus16.edgelist", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "16 workers" in out and "spectral gap" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_resume_refuses_training_flags_it_would_ignore(tmp_path, capsys):
    from apam_gossip.checkpoint import save_checkpoint
    from apam_gossip.config import RunConfig

    ck = tmp_path / "c.ckpt"
    save_checkpoint(ck, {"config": RunConfig().to_dict()})
    out = tmp_path / "r.json"
    assert main(["train", "--resume", str(ck), "--epochs", "3", "--lr", "0.1",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "drop --epochs, --lr" in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    (["--mode", "centralized", "--topology", "ring", "--audit"],
     "--topology (applies to the decentralized and dpsgd modes); --audit (applies to the "
     "decentralized mode)"),
    (["--data-dir", "/somewhere"], "--data-dir (digits ships with scikit-learn)"),
    (["--momentum", "0.9"], "--momentum (applies to the sgd optimizer)"),
    (["--mode", "sequential", "--gossip-lr", "workers", "--staleness-lr", "sqrt"],
     "--gossip-lr (applies to the decentralized mode); --staleness-lr (applies to the "
     "centralized mode)"),
    (["--mode", "centralized", "--optimizer", "sgd", "--staleness-momentum", "none"],
     "--staleness-momentum (applies to amsgrad and adam)"),
    (["--mode", "centralized", "--lookahead", "1", "--staleness-momentum", "workers"],
     "--staleness-momentum (off with a lookahead, which follows beta1 as given)"),
])
def test_flags_that_do_not_apply_are_named_in_one_warning(tmp_path, capsys, argv, needle):
    out = tmp_path / "r.json"
    assert main(["train", *argv, "--workers", "1", "--steps", "5", "-q", "-o", str(out)]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and needle in warnings[0], warnings
    assert warnings[0].startswith("apam-gossip: warning: ignored: ")


def test_plain_progress_lines_when_not_on_a_terminal(capsys):
    from apam_gossip.cli import _ProgressUI
    from apam_gossip.runner import Event

    ui = _ProgressUI(quiet=False, plain=True, every_s=0.0)
    ui(Event("start", 0, 1000))
    for k in range(1, 4):
        ui(Event("progress", 250 * k, 1000))
    ui.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("  starting the worker processes")
    assert [ln.split()[1] for ln in err[1:]] == ["25.0%", "50.0%", "75.0%"]


@pytest.mark.slow
def test_the_readme_demo_runs_and_ends_near_its_best(tmp_path):
    """The front door: `apam-gossip demo` on the embedded digits, real processes."""
    out = tmp_path / "demo.json"
    p = subprocess.run([sys.executable, "-m", "apam_gossip", "demo", "-o", str(out)],
                       capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stderr
    d = json.loads(out.read_text())
    accs = [e["test_acc"] for e in d["evals"]]
    assert d["final_accuracy"] >= 0.95, accs
    assert accs[-1] >= max(accs) - 0.01, accs  # a first impression should not end on a drop
    assert "demo: centralized APAM" in p.stdout and "final test accuracy" in p.stdout


def test_print_config_round_trips_and_flags_are_the_keys(tmp_path, capsys):
    """Every config key is a flag; --print-config writes TOML that --config reads back."""
    from apam_gossip.config import RunConfig, load_config, schema_fields

    argv = ["train", "--workers", "3", "--optim.lr", "0.01", "--batch-size", "8",
            "--network.latency-ms", "2.5", "--slowdown", "1,2,3", "--no-optim.bias-correction",
            "--straggler-prob", "0.1", "--network.links", "[[0, 1, 5, 1]]", "--print-config"]
    assert main(argv) == 0
    path = tmp_path / "printed.toml"
    path.write_text(capsys.readouterr().out)
    cfg = load_config(path)
    assert cfg == RunConfig.from_dict({
        "workers": 3, "optim": {"lr": 0.01, "bias_correction": False},
        "data": {"batch_size": 8}, "slowdown": [1, 2, 3], "straggler_prob": 0.1,
        "network": {"latency_ms": 2.5, "links": [[0, 1, 5, 1]]}})
    from apam_gossip.cli import build_parser

    flags = {o for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
             for o in a.option_strings}
    assert {spec.flag for spec in schema_fields()} <= flags  # no key without its flag


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("apam-gossip 0.1.0")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--optim.lr X, --lr X" in out and "(default: 0.001)" in out


def test_a_closed_pipe_ends_quietly():
    """`apam-gossip bench master | head -1`: the reader leaving is no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "apam_gossip", "bench", "master", "--size-mb",
                          "0.01"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    try:
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) in (0, 141) and "Traceback" not in err, err
    finally:
        p.kill()
        p.wait()


def test_compare_help_names_every_mode_and_its_default():
    from apam_gossip.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["compare"].format_help()
    text = " ".join(text.split())
    assert "all three" not in text
    assert "centralized, decentralized, sequential, allreduce, dpsgd and syncps" in text


def _result(mode: str, **cfg):
    from apam_gossip.result import EvalRecord, WorkerStats

    from helpers import make_cfg

    c = make_cfg(mode=mode, **cfg).to_dict()
    evals = [EvalRecord(t, 100 * t, t, 1.0, 1.0, acc, {"eval_samples": 500 if t < 3 else 10_000})
             for t, acc in ((0, 0.1), (1, 0.8), (2, 0.85), (3, 0.9))]
    return RunResult.of(c, mode, "shm", 10, 3.0, 3, evals, {0: 3},
                        [WorkerStats.of(0, "cpu", 1.0, 3, 300, 3.0, 1.0)], None)


def test_compare_labels_runs_of_one_mode_by_what_differs_and_plots_the_final_point_apart(
        tmp_path):
    from apam_gossip.compare import comparison_table, plot_comparison, run_labels

    rs = [_result("decentralized", topology="ring"), _result("decentralized",
                                                            topology="complete"),
          _result("centralized"), _result("sequential"), _result("sequential")]
    assert run_labels(rs) == ["decentralized topology=ring", "decentralized topology=complete",
                              "centralized", "sequential #1", "sequential #2"]
    table = comparison_table(rs, 0.85)
    assert "decentralized topology=complete" in table and "sequential #2" in table
    plot_comparison(rs, tmp_path / "p.png", target=0.85)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
