"""Checkpoint / resume (centralized mode): SIGTERM, periodic, atomic, code-free loading."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from apam_gossip.checkpoint import load_checkpoint, save_checkpoint
from apam_gossip.cli import main
from apam_gossip.config import RunConfig
from apam_gossip.errors import UserError
from apam_gossip.runner import RunInterrupted, run

from helpers import make_cfg, sigterm_at

pytestmark = pytest.mark.timeout(240)


RUN = {"mode": "centralized", "workers": 4, "epochs": 40, "evals": 4, "slowdown": [3, 3, 3, 3],
       "data": {"batch_size": 32}, "optim": {"lr": 2e-3}}


def _cfg(tmp_path, **kw) -> RunConfig:
    return make_cfg(RUN, {"checkpoint": str(tmp_path / "run.ckpt")}, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["centralized", "decentralized"])
def test_sigterm_checkpoints_and_resume_reaches_the_target(tmp_path, digits, mode):
    cfg = _cfg(tmp_path, mode=mode, optim={"lr": 2e-3 if mode == "centralized" else 4e-3},
               audit=mode == "decentralized")
    with pytest.raises(RunInterrupted, match="--resume"):
        run(cfg, dataset=digits, callback=sigterm_at(0.4))
    ck = load_checkpoint(cfg.checkpoint)
    total = -(-40 * len(digits.y_train) // 32)
    assert set(ck["opt_state"]) == {"step", "m", "v", "vhat"}
    if mode == "centralized":
        done = ck["version"]
        assert ck["samples"] == 32 * done
        assert int(ck["opt_state"]["step"]) == done
    else:
        done = ck["completed"]
        assert ck["x"].shape[0] == 4  # every worker's model ...
        assert int(ck["opt_state"]["step"].sum()) == done  # ... and its own AMSGrad state
        assert int(ck["done_by"].sum()) == done
    assert 0.3 * total < done < total
    r = run(cfg, dataset=digits, resume=cfg.checkpoint)
    if mode == "centralized":
        assert r.updates == total
        assert sum(r.staleness.values()) == total  # the histogram carried over
        # and the resumed updates' staleness continues from the checkpoint's version: a
        # worker's first gradient after the resume is not counted as `done` versions old
        assert max(r.staleness) < 50 < done, sorted(r.staleness.items())[-3:]
    else:
        # the whole run's counts, as centralized reports them (and as its evaluations
        # and wall time are): before the checkpoint plus since
        assert r.updates == sum(w.updates for w in r.workers) == total
        assert r.samples == 32 * total
        # the staleness histogram too: the checkpoint carries the part before it
        assert sum(r.staleness.values()) == total
        # the audit starts from the checkpoint's models, not the fresh initial model
        assert r.evals[-1].extra["audit_error"] <= 1e-5
    assert r.final_accuracy >= 0.95
    assert r.evals[0].updates >= done  # the resumed run continues, not restarts


@pytest.mark.slow
def test_periodic_checkpoints(tmp_path, digits):
    cfg = _cfg(tmp_path, epochs=15, checkpoint_every_s=0.05)
    r = run(cfg, dataset=digits)
    ck = load_checkpoint(cfg.checkpoint)
    assert 0 < ck["version"] <= r.updates
    assert RunConfig.from_dict(ck["config"]) == cfg


def test_decentralized_periodic_checkpoints_agree_with_their_counters(tmp_path, digits):
    """Checkpoints written during a run, loaded as they appear: the update count, the
    per-worker counts and the optimizer states' step counters describe the same instant
    (a resume would otherwise redo or skip updates)."""
    cfg = _cfg(tmp_path, mode="decentralized", epochs=20, checkpoint_every_s=0.05,
               slowdown=[], data={"batch_size": 8}, optim={"lr": 4e-3})
    seen: list[tuple[int, int, int]] = []

    def inspect(ev):
        if os.path.exists(cfg.checkpoint):
            ck = load_checkpoint(cfg.checkpoint)
            seen.append((ck["completed"], int(ck["done_by"].sum()),
                         int(ck["opt_state"]["step"].sum())))

    run(cfg, dataset=digits, callback=inspect)
    distinct = set(seen)
    bad = [s for s in distinct if len(set(s)) != 1]
    assert len(distinct) >= 5, f"only {len(distinct)} checkpoints seen"
    assert not bad, f"{len(bad)} of {len(distinct)} checkpoints inconsistent: {bad[:3]}"


_WRITER = """
import sys, torch
from apam_gossip.checkpoint import save_checkpoint
path = sys.argv[1]
k = 0
while True:
    k += 1
    save_checkpoint(path, {"config": {}, "k": k, "x": torch.full((3_000_000,), float(k))})
"""


@pytest.mark.slow
def test_checkpoint_survives_a_kill_during_its_own_write(tmp_path):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, {"config": {}, "k": 0, "x": torch.zeros(3_000_000)})
    for delay in (0.3, 0.7, 1.1, 1.6, 2.2):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)])
        time.sleep(delay)
        p.kill()  # SIGKILL: no cleanup, possibly in the middle of a write
        p.wait()
        ck = load_checkpoint(path)  # always a whole checkpoint, old or new
        assert torch.all(ck["x"] == float(ck["k"]))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/apam-gossip-pwned",))


def test_loading_never_runs_code_from_the_file(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"format": 1, "config": {}, "x": _Evil()}))
    if os.path.exists("/tmp/apam-gossip-pwned"):
        os.remove("/tmp/apam-gossip-pwned")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert not os.path.exists("/tmp/apam-gossip-pwned")


def test_resume_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "none.ckpt"), "-o",
                 str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(tmp_path / "junk.ckpt"), "-o",
                 str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot read checkpoint" in err
    assert main(["train", "--mode", "allreduce", "--checkpoint", str(tmp_path / "c"),
                 "-o", str(tmp_path / "r.json")]) == 2
    assert "only the centralized and decentralized modes" in capsys.readouterr().err


def test_a_checkpoint_from_before_the_momentum_rule_resumes_as_it_was_trained(tmp_path):
    """A checkpoint whose config has no staleness_momentum (written before the rule) goes
    on with beta1 as given ("none"), not with today's default."""
    from apam_gossip.checkpoint import FORMAT, load_checkpoint
    from apam_gossip.config import RunConfig

    cfg = RunConfig().to_dict()
    del cfg["optim"]["staleness_momentum"]
    torch.save({"format": FORMAT, "config": cfg}, tmp_path / "old.pt")
    d = load_checkpoint(tmp_path / "old.pt")
    assert RunConfig.from_dict(d["config"]).optim.staleness_momentum == "none"
    assert RunConfig().optim.staleness_momentum == "workers"


def _train_cmd(tmp_path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "apam_gossip", "train", "--mode", "centralized",
            "--workers", "3", "--epochs", "400", "--lr", "2e-3", "--slow", "1=3",
            "--evals", "2", "--checkpoint", str(tmp_path / "run.ckpt"),
            "-o", str(tmp_path / "never.json"), *extra]


def test_sigusr1_to_the_whole_process_group_stops_in_order(tmp_path):
    """Slurm's `--signal=USR1@T` (and `kill -USR1 -PGID`) reaches the workers too: they
    leave it to the coordinator, which checkpoints and stops (the workers used to die of
    it, so the run failed with 'worker 0 killed by signal 10')."""
    p = subprocess.Popen(_train_cmd(tmp_path, "--checkpoint-every", "0.5"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run.ckpt").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.1)
        os.killpg(p.pid, signal.SIGUSR1)
        out, err = p.communicate(timeout=90)
        assert p.returncode == 143, out + err
        assert "killed by signal" not in err and "Traceback" not in err, err
        assert err.count("run interrupted after") == 1, err
        assert f"--resume {tmp_path / 'run.ckpt'}" in err
        assert not (tmp_path / "never.json").exists()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_a_stop_request_while_the_data_loads_stops_the_run_when_it_starts(
        tmp_path, digits, monkeypatch, capsys):
    """A request before the run's own handler is up (data loading, say) is held, not
    fatal: the run then stops at once, in order, with its checkpoint."""
    import apam_gossip.data

    def load_and_get_a_signal(cfg, *a, **kw):
        os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning, early
        return digits

    monkeypatch.setattr(apam_gossip.data, "load_data", load_and_get_a_signal)
    old = signal.getsignal(signal.SIGUSR1)
    rc = main(["train", "--mode", "centralized", "--workers", "2", "--epochs", "400",
               "--checkpoint", str(tmp_path / "run.ckpt"), "-o", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 143, err
    assert "run interrupted after" in err and "--resume" in err, err
    assert load_checkpoint(tmp_path / "run.ckpt")["version"] < 10
    assert not (tmp_path / "r.json").exists()
    assert signal.getsignal(signal.SIGUSR1) is old  # the handlers were put back


def test_sequential_stops_on_request(tmp_path, digits, monkeypatch, capsys):
    """The sequential mode stops too (one line, 143), saying it writes no checkpoint."""
    import apam_gossip.data

    monkeypatch.setattr(apam_gossip.data, "load_data", lambda cfg, *a, **kw: digits)
    sent = []

    class Term:
        def __call__(self, ev) -> None:
            if ev.kind == "progress" and not sent:
                os.kill(os.getpid(), signal.SIGTERM)
                sent.append(ev.samples)

    r = None
    with pytest.raises(RunInterrupted, match="this mode writes no checkpoints"):
        r = run(make_cfg(mode="sequential", epochs=400), dataset=digits, callback=Term())
    assert r is None and sent
