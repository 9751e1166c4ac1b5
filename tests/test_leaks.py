"""The leak check itself (conftest's autouse ``no_leaks``, helpers in leaks.py): it must
flag what this session's processes leave in /dev/shm and its own leftover children, and
ignore what the rest of the machine does meanwhile (it used to fail whichever test ran
while another job made a /dev/shm entry)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
from multiprocessing.connection import Connection
from pathlib import Path

import leaks
import pytest

from apam_gossip.mpirun import job_shm_dir

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not leaks.SHM.is_dir() or not os.access(leaks.SHM, os.W_OK),
                       reason="no writable /dev/shm"),
]

ROOT = Path(__file__).parent.parent
MPIRUN = Path(sys.executable).parent / "mpirun"
BACKING = "OMPI_MCA_btl_sm_backing_directory"
TAG = leaks.SESSION_TAG

# Another job on the machine, with none of this session's tag: loose OpenMPI segments
# (an mpirun started without a segment folder), joblib's semaphores (a file, and a lock
# named by loky), this package run untagged (its MPI folder, a multiprocessing lock) and
# another test session's folder.
# It makes them, says their names, and removes them when its stdin closes.
FOREIGN = textwrap.dedent("""
    import multiprocessing, os, sys
    from apam_gossip.mpirun import job_shm_dir

    pid = os.getpid()
    files = [f"/dev/shm/sm_segment.x.0.{pid}.0", f"/dev/shm/sem.loky-test{pid}"]
    for f in files:
        open(f, "w").close()
    os.mkdir(f"/dev/shm/apam-mpi-foreign{pid}")
    lock = multiprocessing.get_context("spawn").Lock()
    import joblib.externals.loky.backend  # renames this process's semaphores /loky-PID-
    loky_lock = multiprocessing.get_context("spawn").Lock()
    os.environ.pop("APAM_GOSSIP_SHM_TAG", None)
    untagged = job_shm_dir()
    os.environ["APAM_GOSSIP_SHM_TAG"] = "another-session"
    other = job_shm_dir()
    dirs = [untagged.__enter__()["OMPI_MCA_btl_sm_backing_directory"],
            other.__enter__()["OMPI_MCA_btl_sm_backing_directory"]]
    names = [os.path.basename(p) for p in files + dirs]
    names += [f"apam-mpi-foreign{pid}"]
    names += ["sem." + lk._semlock.name.lstrip("/") for lk in (lock, loky_lock)]
    print(" ".join(names), flush=True)
    sys.stdin.read()
    for f in files:
        os.unlink(f)
    os.rmdir(f"/dev/shm/apam-mpi-foreign{pid}")
    untagged.__exit__(None, None, None)
    other.__exit__(None, None, None)
""")


def test_the_session_tag_is_set_for_every_process_it_starts():
    assert os.environ[leaks.TAG_ENV] == TAG
    assert leaks.semprefix() == f"/mp-{TAG}"
    names = [f"apam-mpi-{TAG}-abc", f"sem.mp-{TAG}-abc", f"apam-mpi-{TAG}0-abc",
             "sem.mp-abc", "apam-mpi-abc", f"x{TAG}-abc"]
    assert leaks.ours(names, TAG) == set(names[:2])


def _child_lock(conn: Connection) -> None:
    lock = multiprocessing.get_context("spawn").Lock()
    conn.send((lock._semlock.name, os.environ.get(leaks.TAG_ENV)))
    conn.close()


def test_semaphores_carry_the_tag_in_this_process_and_in_spawned_children(monkeypatch):
    """The shared-memory transport's locks are made here; a spawned child that made one
    (the workers do not, today) would name it the same way. joblib's loky (imported with
    scikit-learn: the digits data) renamed them all /loky-PID-..., out of the check's
    sight; the session's naming is kept, and put back at the next test if replaced."""
    from multiprocessing import synchronize

    pytest.importorskip("joblib.externals.loky.backend")
    ctx = multiprocessing.get_context("spawn")
    lock = ctx.Lock()
    assert lock._semlock.name.startswith(f"/mp-{TAG}-")
    monkeypatch.setattr(synchronize.SemLock, "_make_name",
                        staticmethod(lambda: f"/loky-{os.getpid()}-x{os.urandom(4).hex()}"))
    assert ctx.Lock()._semlock.name.startswith("/loky-")
    assert leaks.keep_semaphore_naming() and not leaks.keep_semaphore_naming()
    assert ctx.Lock()._semlock.name.startswith(f"/mp-{TAG}-")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_child_lock, args=(theirs,))
    p.start()
    theirs.close()
    try:
        name, env = mine.recv()
    finally:
        p.join(30)
    assert p.exitcode == 0
    assert name.startswith(f"/mp-{TAG}-") and env == TAG


def test_job_shm_dir_puts_the_tag_in_the_folder_name(monkeypatch):
    for tag, prefix in [("job-42.a_b", "apam-mpi-job-42.a_b-"), ("x/y z", "apam-mpi-x_y_z-"),
                        ("", "apam-mpi-"), ("t" * 300, "apam-mpi-" + "t" * 64 + "-")]:
        monkeypatch.setenv(leaks.TAG_ENV, tag)
        with job_shm_dir() as env:
            d = Path(env[BACKING])
            assert d.is_dir() and d.parent == leaks.SHM, d
            # mkdtemp's random part: 8 letters, digits or "_"
            assert d.name.startswith(prefix) and len(d.name) == len(prefix) + 8, d.name
        assert not d.exists()
    monkeypatch.delenv(leaks.TAG_ENV)
    with job_shm_dir() as env:
        assert Path(env[BACKING]).name.startswith("apam-mpi-")
        assert Path(env[BACKING]).name.count("-") == 2


def test_the_check_flags_this_sessions_leaks_and_ignores_foreign_entries():
    """While another process makes untagged entries (and another session's tagged one),
    this session makes an MPI segment folder and a lock: the check names exactly those
    two, and nothing once they are gone, though the foreign ones are still there."""
    snap = leaks.Snapshot.take(TAG)
    env = {k: v for k, v in os.environ.items() if k != leaks.TAG_ENV}
    foreign = subprocess.Popen([sys.executable, "-c", FOREIGN], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    try:
        theirs = foreign.stdout.readline().split()
        assert len(theirs) == 7 and any("loky" in n for n in theirs), theirs
        lock = multiprocessing.get_context("spawn").Lock()
        ours = "sem." + lock._semlock.name.lstrip("/")
        with job_shm_dir() as shm:
            folder = Path(shm[BACKING]).name
            # a leftover: this session's folder with a rank's segment inside
            (Path(shm[BACKING]) / "sm_segment.x.0.1.0").touch()
            on_disk = leaks.shm_entries()
            assert set(theirs) <= on_disk and {ours, folder} <= on_disk
            assert snap.leaked_shm() == sorted([ours, folder])
        del lock
        assert snap.leaked_shm() == []
        assert set(theirs) <= leaks.shm_entries()  # still there, and not counted
    finally:
        foreign.communicate("", timeout=30)
    assert foreign.returncode == 0
    assert not set(theirs) & leaks.shm_entries()


def test_a_leaked_folder_made_by_a_child_is_flagged():
    """An entry a child process leaves (as an MPI job without its clean-up would): the
    tag reaches it through the environment."""
    snap = leaks.Snapshot.take(TAG)
    out = subprocess.run([sys.executable, "-c", "import os, tempfile; print(tempfile.mkdtemp("
                          "prefix=f'apam-mpi-{os.environ[\"APAM_GOSSIP_SHM_TAG\"]}-', "
                          "dir='/dev/shm'))"], capture_output=True, text=True, timeout=30)
    d = Path(out.stdout.strip())
    try:
        assert snap.leaked_shm() == [d.name], out.stderr
    finally:
        d.rmdir()
    assert snap.leaked_shm() == []


def test_the_process_check_flags_its_own_children_only():
    """A child still running is a leak; a process that is not a descendant (here one
    left to init by a shell that exited, as another job's would be) is not."""
    snap = leaks.Snapshot.take(TAG)
    child = subprocess.Popen(["sleep", "60"])
    orphan = int(subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
                                capture_output=True, text=True, timeout=30).stdout)
    try:
        assert snap.leaked_processes() == [child.pid]
        assert orphan not in leaks.children(os.getpid())
    finally:
        leaks.kill([child.pid, orphan])
        child.wait(10)
    assert snap.leaked_processes() == []


def test_tagging_restores_what_it_found(monkeypatch):
    before_env, before_prefix = os.environ[leaks.TAG_ENV], leaks.semprefix()
    with leaks.tagging("inner"):
        assert os.environ[leaks.TAG_ENV] == "inner" and leaks.semprefix() == "/mp-inner"
        assert multiprocessing.get_context("spawn").Lock()._semlock.name.startswith(
            "/mp-inner-")
    assert os.environ[leaks.TAG_ENV] == before_env and leaks.semprefix() == before_prefix
    monkeypatch.delenv(leaks.TAG_ENV)
    with leaks.tagging("inner"):
        pass
    assert leaks.TAG_ENV not in os.environ


@pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun not in the venv")
@pytest.mark.parametrize("launcher", ["run_mpirun", "launch/mpirun.sh"])
def test_every_mpi_job_gets_a_segment_folder_with_the_tag(launcher):
    """Both ways the package starts mpirun (apam_gossip.mpirun, used by `launch`, the
    benchmarks and the tests, and launch/mpirun.sh) give the ranks a folder of their
    own for OpenMPI's segments, named with the tag, and remove it after: so no loose
    sm_segment.* file in /dev/shm is ever this session's, and a leaked folder is seen."""
    show = ["-c", f"import os; print(os.environ[{BACKING!r}])"]
    if launcher == "run_mpirun":
        from apam_gossip.mpirun import run_mpirun

        p = run_mpirun(2, [sys.executable, *show], timeout=120)
    else:
        p = subprocess.run(["bash", str(ROOT / "launch" / "mpirun.sh"), "-n", "2", *show],
                           env={**os.environ, "APAM": sys.executable, "MPIRUN": str(MPIRUN)},
                           capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    folders = {Path(line) for line in p.stdout.split()}
    assert len(folders) == 1, p.stdout  # one folder per job, shared by its ranks
    folder = folders.pop()
    assert folder.parent == leaks.SHM and folder.name.startswith(f"apam-mpi-{TAG}-")
    assert not folder.exists()
