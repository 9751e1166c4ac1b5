"""Metrics where users look (issue 22, item 5): a TensorBoard event file and a JSON-lines
stream written as the run goes, read back here; the library's messages through Python
logging; run() showing progress unless quiet."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from apam_gossip import run
from apam_gossip.cli import main
from apam_gossip.errors import UserError
from apam_gossip.runlog import MetricsLog, open_sink, say, spec_for

from helpers import make_cfg

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).parent.parent
MPIRUN = Path(sys.executable).parent / "mpirun"


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of ``folder``: tag -> [(step, value)], read with
    the TFRecord framing (length, its CRC, the record, its CRC) and the Event protobuf."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for f in files:
        data, i = f.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_a_run_writes_its_metrics_to_tensorboard_and_jsonl_as_it_goes(tmp_path, digits):
    tb, jl = tmp_path / "tb", tmp_path / "m.jsonl"
    r = run(make_cfg(mode="decentralized", workers=2, steps=150, evals=3), dataset=digits,
            quiet=True, log=[f"tensorboard:{tb}", f"jsonl:{jl}"])
    scalars = read_tensorboard(tb)
    assert [v for _, v in scalars["test/accuracy"]] == pytest.approx(
        [e.test_metric for e in r.evals], rel=1e-6)
    assert [s for s, _ in scalars["test/accuracy"]] == [e.samples for e in r.evals]
    assert "train/loss" in scalars and "consensus/distance" in scalars
    assert scalars["final/accuracy"] == [(r.samples, pytest.approx(r.final_metric, rel=1e-6))]
    assert scalars["staleness/mean"][0][1] == pytest.approx(r.staleness_mean(), rel=1e-6)
    rows = [json.loads(line) for line in jl.read_text().splitlines()]
    evals = [row for row in rows if row["event"] == "eval"]
    assert [row["test/accuracy"] for row in evals] == [e.test_metric for e in r.evals]
    end = rows[-1]
    assert end["event"] == "end" and end["final/accuracy"] == r.final_metric
    assert {int(k): v for k, v in end["staleness"].items()} == r.staleness


def test_compare_logs_each_mode_apart(tmp_path, digits):
    from apam_gossip.compare import compare

    compare(make_cfg(workers=2, steps=40, evals=1), ["centralized", "sequential"],
            dataset=digits, quiet=True, log=[f"jsonl:{tmp_path / 'm.jsonl'}"])
    for mode in ("centralized", "sequential"):
        rows = (tmp_path / f"m-{mode}.jsonl").read_text().splitlines()
        assert json.loads(rows[-1])["event"] == "end"
    assert spec_for("tensorboard:runs/tb", "decentralized") == "tensorboard:runs/tb/decentralized"


@pytest.mark.parametrize("spec,needle", [
    ("csv:x", "unknown kind 'csv'; give tensorboard:DIR or jsonl:PATH"),
    ("jsonl:", "give tensorboard:DIR or jsonl:PATH"),
    ("tensorboard", "give tensorboard:DIR or jsonl:PATH"),
])
def test_a_bad_log_spec_is_one_line(spec, needle):
    with pytest.raises(UserError, match=needle):
        open_sink(spec)


def test_the_cli_log_flag_and_its_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = main(["train", "--steps", "5", "--log", f"tensorboard:{tmp_path / 'file'}",
                 "-o", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is a file, not a folder" in err[0]
    assert not (tmp_path / "r.json").exists()
    code = main(["train", "--mode", "sequential", "--steps", "20", "-q", "--log",
                 f"jsonl:{tmp_path / 'm.jsonl'}", "-o", str(tmp_path / "r.json")])
    assert code == 0
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])["event"] == "end"


def test_run_shows_progress_unless_quiet(capsys, digits):
    run(make_cfg(mode="sequential", steps=20, evals=1), dataset=digits)
    shown = capsys.readouterr()
    assert "test_accuracy=" in shown.out + shown.err
    run(make_cfg(mode="sequential", steps=20, evals=1), dataset=digits, quiet=True)
    quiet = capsys.readouterr()
    assert "test_accuracy=" not in quiet.out + quiet.err


def test_messages_go_through_python_logging_when_the_script_configured_it(monkeypatch):
    """Nobody configured logging: printed as the CLI prints. A root handler: the
    messages reach it in the user's format, and are not printed twice."""
    lib = logging.getLogger("apam_gossip")
    monkeypatch.setattr(lib, "handlers", [])
    monkeypatch.setattr(lib, "propagate", True)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    root = logging.getLogger()
    keep = Keep()
    monkeypatch.setattr(root, "handlers", [keep])
    monkeypatch.setattr(lib, "level", logging.INFO)
    say("hello from the library")
    assert [r.getMessage() for r in seen] == ["hello from the library"]
    assert not lib.handlers  # the user's handler, not ours


def test_the_library_prints_as_the_cli_when_logging_is_not_configured(tmp_path):
    code = ("import logging, apam_gossip.runlog as r\n"
            "r.say('an info line'); r.warn('a warning line')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert p.stdout == "an info line\n"
    assert p.stderr == "apam-gossip: warning: a warning line\n"
    setup = ("import logging; logging.basicConfig(level=logging.INFO, "
             "format='%(name)s|%(levelname)s|%(message)s')\n")
    p = subprocess.run([sys.executable, "-c", setup + code],
                       capture_output=True, text=True, timeout=60)
    assert p.stdout == "" and p.stderr.splitlines() == ["apam_gossip|INFO|an info line",
                                                        "apam_gossip|WARNING|a warning line"]


def test_metrics_log_without_sinks_is_a_no_op():
    m = MetricsLog([])
    assert not m
    m.end(None)


@pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun not in the venv")
@pytest.mark.parametrize("mode", ["centralized", "decentralized"])
def test_the_loop_api_logs_from_rank_0(tmp_path, mode):
    tb, jl = tmp_path / "tb", tmp_path / "m.jsonl"
    p = subprocess.run([sys.executable, "-m", "apam_gossip", "launch", "-n", "3",
                        "--timeout", "150", str(ROOT / "tests" / "loop_script.py"),
                        "--mode", mode, "--steps", "20",
                        "--log", f"tensorboard:{tb}", "--log", f"jsonl:{jl}"],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [json.loads(line) for line in jl.read_text().splitlines()]
    assert rows[-1]["event"] == "end" and "final/accuracy" in rows[-1]
    assert "final/accuracy" in read_tensorboard(tb)
