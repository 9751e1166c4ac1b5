"""The ends of jobs under mpirun and `launch`: SIGTERM to the launcher, an orderly stop
of a `train` job on SIGTERM/SIGUSR1, a resume with another number of workers. Every job
runs in its own session and is stopped and reaped however the test ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apam_gossip.mpirun import _process_tree, mpi_env, stop_job

HERE = Path(__file__).parent
ROOT = HERE.parent
MPIRUN = Path(sys.executable).parent / "mpirun"

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun not in the venv: pip install "
                       "'apam_gossip[mpi]' (launch/setup.sh does)"),
]

ENV = {**mpi_env(), "PYTHONUNBUFFERED": "1"}


def _ranks(root: int, marker: str) -> dict[int, str]:
    """The processes under ``root`` whose command line holds ``marker``, with the
    segment folder each was given (from its environment)."""
    out = {}
    for pid in _process_tree(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmd and b"prterun" not in cmd:
            folder = next((e.split(b"=", 1)[1].decode() for e in env
                           if e.startswith(b"OMPI_MCA_btl_sm_backing_directory=")), "")
            out[pid] = folder
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _default_signals() -> None:
    # a suite started in the background (`cmd &` in a script, nohup) inherits SIGINT
    # ignored, and a shell cannot trap a signal ignored when it starts: the launcher
    # under test gets the dispositions a terminal would give it
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def _start(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=kw.pop("env", ENV),
                            preexec_fn=_default_signals, **kw)


def _reap(p: subprocess.Popen) -> None:
    """However the test ended: the launcher and everything under it, gone."""
    if p.poll() is None:
        tree = _process_tree(p.pid)
        stop_job(p, grace=2.0)
        for pid in tree:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_to_launch_stops_every_rank_and_removes_the_segment_folder():
    """Slurm's time limit on `apam-gossip launch`: the whole job ends, nothing is left
    (it used to exit at once and leave mpirun and its ranks training under PID 1)."""
    p = _start([sys.executable, "-m", "apam_gossip", "launch", "-n", "3",
                str(HERE / "loop_script.py"), "--steps", "1000000"])
    try:
        ranks: dict[int, str] = {}

        def started() -> bool:
            ranks.update(_ranks(p.pid, "loop_script.py"))
            return len(ranks) == 3 and all(Path(f).is_dir() for f in ranks.values())

        _wait_for(started, 90, "3 ranks")
        folders = set(ranks.values())
        assert len(folders) == 1 and all(folders)  # the job's own folder
        time.sleep(3.0)  # into the training loop (or still starting: either must end)
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        took = time.monotonic() - t
        assert p.returncode == 143, err
        assert "launch stopped by SIGTERM" in err
        _wait_for(lambda: not any(_alive(r) for r in ranks), 10, "the ranks to end")
        assert took < 10, took
        assert not any(Path(f).exists() for f in folders)
    finally:
        _reap(p)


def test_sigusr1_to_launch_reaches_every_rank():
    """SIGUSR1 is passed on (mpirun forwards it to every rank): a rank without a handler
    ends, so the job ends; launch itself does not die of it (it used to: mpirun orphaned)."""
    p = _start([sys.executable, "-m", "apam_gossip", "launch", "-n", "2",
                str(HERE / "loop_script.py"), "--steps", "1000000"])
    try:
        ranks: dict[int, str] = {}

        def started() -> bool:
            ranks.update(_ranks(p.pid, "loop_script.py"))
            return len(ranks) == 2

        _wait_for(started, 90, "2 ranks")
        time.sleep(3.0)
        p.send_signal(signal.SIGUSR1)
        _, err = p.communicate(timeout=60)
        assert p.returncode > 0, err  # the job's code, not launch killed by the signal
        _wait_for(lambda: not any(_alive(r) for r in ranks), 10, "the ranks to end")
    finally:
        _reap(p)


def _train(ckpt: Path, *extra: str) -> list[str]:
    return ["train", "--mode", "centralized", "--epochs", "400", "--lr", "2e-3",
            "--slow", "1=3", "--evals", "2", "--checkpoint", str(ckpt),
            "--checkpoint-every", "0.5", *extra]


@pytest.mark.parametrize("how", ["sigterm-mpirun.sh", "sigint-mpirun.sh", "sigusr1-launch"])
def test_an_mpi_train_job_stops_in_order_with_a_checkpoint(tmp_path, how):
    """README: a stop request checkpoints and exits 143 with one line, under mpirun too
    (it used to end with rc 1 in half a second, no checkpoint of the stop, no word).
    launch/mpirun.sh turns SIGTERM into the orderly stop; SIGUSR1 to `launch` or mpirun
    is passed to every rank."""
    from apam_gossip.checkpoint import load_checkpoint

    ckpt = tmp_path / "run.ckpt"
    out = tmp_path / "never.json"
    if how.endswith("mpirun.sh"):
        cmd = ["bash", str(ROOT / "launch" / "mpirun.sh"), "-n", "3",
               *_train(ckpt, "-o", str(out))]
        sig = signal.SIGTERM if how == "sigterm-mpirun.sh" else signal.SIGINT
        env = {**ENV, "APAM": str(Path(sys.executable).parent / "apam-gossip"),
               "MPIRUN": str(MPIRUN)}
    else:
        cmd = [sys.executable, "-m", "apam_gossip", "launch", "-n", "3",
               str(Path(sys.executable).parent / "apam-gossip"), *_train(ckpt, "-o", str(out))]
        sig = signal.SIGUSR1
        env = ENV
    p = _start(cmd, env=env)
    try:
        _wait_for(ckpt.exists, 120, "the first periodic checkpoint")
        first = load_checkpoint(ckpt)["version"]
        p.send_signal(sig)
        stdout, err = p.communicate(timeout=90)
        assert p.returncode == (130 if sig == signal.SIGINT else 143), stdout + err
        lines = [ln for ln in err.splitlines() if "interrupted" in ln]
        assert len(lines) == 1, err  # one line, from rank 0
        assert "prterun detected" not in err  # the ranks stopped in order: no kill notice
        ck = load_checkpoint(ckpt)
        # the stop's own checkpoint: the master's state when it stopped, named in the line
        assert ck["version"] >= first and f"after {ck['version']} updates" in lines[0]
        assert f"--resume {ckpt}" in lines[0]
        assert not out.exists()
    finally:
        _reap(p)


@pytest.mark.parametrize("before,ranks", [(2, 5), (4, 3)])
def test_a_centralized_checkpoint_resumes_under_mpirun_with_another_number_of_workers(
        tmp_path, digits, before, ranks):
    """The master's state does not depend on the number of workers, so `-n` may differ
    at a resume (more workers crashed mid-run with an IndexError; fewer were refused
    because the saved per-worker settings named workers no longer there)."""
    import json

    from apam_gossip.checkpoint import load_checkpoint
    from apam_gossip.mpirun import run_mpirun
    from apam_gossip.runner import RunInterrupted, run

    from helpers import make_cfg

    ckpt = tmp_path / "before.ckpt"
    cfg = make_cfg(mode="centralized", workers=before, epochs=6, evals=2,
                   checkpoint=str(ckpt), data={"batch_size": 32}, optim={"lr": 2e-3},
                   slowdown=[1.0] * (before - 1) + [2.0],
                   network={"worker_latency_ms": [0.1] * before,
                            "links": [[before - 1, -1, 0.2, 0.0]]})
    sent: list[int] = []

    def stop_at_a_third(ev) -> None:
        if not sent and ev.total_samples and ev.samples > ev.total_samples / 3:
            os.kill(os.getpid(), signal.SIGUSR1)
            sent.append(ev.samples)

    with pytest.raises(RunInterrupted):
        run(cfg, dataset=digits, callback=stop_at_a_third)
    done = load_checkpoint(ckpt)["version"]
    total = -(-6 * len(digits.y_train) // 32)
    assert 0 < done < total
    out = tmp_path / "after.json"
    p = run_mpirun(ranks, [sys.executable, "-m", "apam_gossip", "train", "--resume", str(ckpt),
                       "-o", str(out)], timeout=180, env=ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(out.read_text())
    assert d["updates"] == total and len(d["workers"]) == ranks - 1
    assert sum(d["staleness"].values()) == total  # the histogram carried over
    assert all(w["updates"] > 0 for w in d["workers"])  # the new workers trained too
    assert d["final_accuracy"] >= 0.9


class _Lines:
    """Reads a process's stderr as it comes (a thread), so a test can wait for a line."""

    def __init__(self, p: subprocess.Popen) -> None:
        import threading

        self.lines: list[str] = []
        self.t = threading.Thread(target=self._read, args=(p,), daemon=True)
        self.t.start()

    def _read(self, p: subprocess.Popen) -> None:
        for line in p.stderr:
            self.lines.append(line)

    def has(self, text: str) -> bool:
        return any(text in ln for ln in self.lines)

    def text(self) -> str:
        self.t.join(timeout=30)
        return "".join(self.lines)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["decentralized", "allreduce", "dpsgd", "syncps"])
def test_modes_without_mpi_checkpoints_stop_together_on_sigusr1(mode):
    """Gossip (rank 0 hands out no more updates) and the lockstep modes (a stop vote
    rides beside every step) stop every rank at once: one line, exit 143, nothing
    killed."""
    from apam_gossip.mpirun import job_shm_dir

    with job_shm_dir() as shm:  # OpenMPI's segments in a folder of this job's own
        p = subprocess.Popen([str(MPIRUN), "-n", "3", "--map-by", ":OVERSUBSCRIBE",
                              sys.executable, "-m", "apam_gossip", "train", "--mode", mode,
                              "--topology", "ring", "--epochs", "20000", "--evals", "2",
                              "--slow", "1=2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env={**ENV, **shm})
        try:
            lines = _Lines(p)
            _wait_for(lambda: lines.has("progress"), 120, "training (a progress line)")
            p.send_signal(signal.SIGUSR1)  # mpirun forwards it to every rank
            p.wait(timeout=90)
            err = lines.text()
            assert p.returncode == 143, err
            stops = [ln for ln in err.splitlines() if "run interrupted after" in ln]
            assert len(stops) == 1, err
            assert "prterun" not in err and "Traceback" not in err, err
        finally:
            _reap(p)


def _rank_pids(root: int) -> dict[int, int]:
    """MPI rank -> pid of the ranks under ``root`` (from their environment)."""
    out = {}
    for pid in _process_tree(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((e.split(b"=", 1)[1] for e in env
                     if e.startswith(b"OMPI_COMM_WORLD_RANK=")), None)
        if rank is not None and b"prte" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            out[int(rank)] = pid
    return out


@pytest.mark.parametrize("mode", ["centralized", "decentralized", "allreduce", "syncps",
                                  "centralized:shard"])
def test_a_stop_request_to_one_worker_rank_stops_the_whole_job(tmp_path, mode):
    """`kill -USR1` (or -TERM) to one rank that is not rank 0: the whole job stops in
    order as when rank 0 gets it (a centralized or syncps worker asks the master with its
    next gradient; a gossip rank tells rank 0 with its next claim; allreduce votes; a
    sharded master's follower shard passes it on to the leader, which stops at a cut)."""
    from apam_gossip.checkpoint import load_checkpoint
    from apam_gossip.mpirun import job_shm_dir

    mode, _, shard = mode.partition(":")
    ckpt = tmp_path / "run.ckpt"
    extra = ["--checkpoint", str(ckpt)] if mode == "centralized" else []
    n, victim = (4, 1) if shard else (3, 2)  # shard: ranks 0 and 1 the master, kill rank 1
    extra += ["--master-shards", "2"] if shard else []
    with job_shm_dir() as shm:
        p = subprocess.Popen([str(MPIRUN), "-n", str(n), "--map-by", ":OVERSUBSCRIBE",
                              sys.executable, "-m", "apam_gossip", "train", "--mode", mode,
                              "--topology", "ring", "--epochs", "20000", "--evals", "2",
                              "--slow", "1=2",
                              "-o", str(tmp_path / "never.json"), *extra],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env={**ENV, **shm})
        try:
            lines = _Lines(p)
            _wait_for(lambda: lines.has("progress"), 120, "training (a progress line)")
            ranks = _rank_pids(p.pid)
            assert sorted(ranks) == list(range(n)), ranks
            os.kill(ranks[victim], signal.SIGUSR1 if mode != "allreduce" else signal.SIGTERM)
            p.wait(timeout=90)
            err = lines.text()
            assert p.returncode == 143, err
            stops = [ln for ln in err.splitlines() if "run interrupted after" in ln]
            assert len(stops) == 1, err
            assert "prterun" not in err and "Traceback" not in err, err
            if mode == "centralized":
                saved = load_checkpoint(ckpt)
                assert f"after {saved['version']} updates" in stops[0]
                if shard:  # one consistent cut: both parts at the stop's version
                    assert saved["shard_versions"] == [saved["version"]] * 2
            else:
                assert "nothing was saved" in stops[0]
            assert not (tmp_path / "never.json").exists()
        finally:
            _reap(p)
