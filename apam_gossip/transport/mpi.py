"""MPI transport (mpi4py): the same two interfaces as :mod:`.shm`, across hosts.

Star (centralized): rank 0 is the master, ranks 1..N the workers. The master keeps one
non-blocking receive posted per worker for a small metadata message and serves whichever
completes first (``Testsome``, never round-robin); the gradient follows the metadata as
a second message from that worker only. Parameters go back to that worker only.

Gossip (decentralized): every rank is a worker and runs a *server thread* besides its
training thread (MPI_THREAD_MULTIPLE). To average with neighbor j, worker i sends
[x_i | u_i] straight from its model (no packed copy) to j's server; the server, holding
j's local lock, sets x_j <- (x_i + x_j)/2 in one pass and replies with it from its
model, still under the lock; worker i's model becomes the reply. That is exact because
the model is read-locked while the average is in flight: i's local step waits for the
reply, and i's server does not mix another rank's model into x_i meanwhile (an average
asked by a higher rank waits until i's is done, one asked by a lower rank is refused and
the asker tries another neighbor; a refusal is a message of its own tag, never told
from a reply by its size, which a 1-element model's reply shares). So no update is lost,
the sum of all models changes only by local steps, and every average is a convex
combination (the tracked second moment stays >= 0). A blocking wait only ever goes from
a higher rank to a lower one, so no cycle of waits can form: deadlock-free on any
connected graph. All progress is ordinary two-sided point-to-point messages driven by a
thread that is always in MPI, so it works between hosts over any network MPI supports
(no reliance on shared-memory one-sided progress).
Rank 0's server also hands out the shared update budget (one claim per update).

Other control objects (the loop API's :mod:`apam_gossip.loop` messages) travel either way
as a metadata message of kind ``K_OBJ`` followed by the pickled object.

Tensors cross MPI as CPU buffers (mpi4py sends CPU torch tensors directly, no copy);
GPU workers stage through pinned host buffers.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..average import mix_into
from ..errors import UserError
from ..messages import Bye, Grad, Hello, Params, Stop
from . import PeerGone
from .rows import fence

# message tags
T_META, T_TENSOR = 11, 12  # star
T_REQ, T_DATA, T_REPLY, T_SNAP_REPLY, T_CLAIM_REPLY = 21, 22, 23, 24, 25  # gossip
T_REFUSED = 26  # gossip: the answer to an average that was refused (nothing changed)
T_STATS = 31
T_SHARD, T_SHARD_END = 32, 33  # a sharded master: between its shards; a follower's end
T_OBJ = 13  # star: a pickled control object after a K_OBJ metadata message

# star metadata kinds (float64 vectors: [kind, a, b, c, d, e, stop]); a worker's last
# entry is 1 when a stop was requested on its rank (the master then stops the whole job)
K_HELLO, K_GRAD, K_PARAMS, K_STOP, K_OBJ = 1.0, 2.0, 3.0, 4.0, 5.0
META = 7
# gossip request kinds
R_SNAP, R_CLAIM, R_STOP = 2, 3, 4  # (averages travel as T_DATA payloads)

MPI_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def launched_by_mpi() -> bool:
    """True when this process was started by mpirun/mpiexec/srun with an MPI runtime."""
    return any(k in os.environ for k in MPI_ENV_VARS)


def world():
    """(comm, rank, size) of MPI_COMM_WORLD; imports mpi4py (initialises MPI)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm, comm.Get_rank(), comm.Get_size()


THREAD_LEVELS = ("MPI_THREAD_SINGLE", "MPI_THREAD_FUNNELED", "MPI_THREAD_SERIALIZED",
                 "MPI_THREAD_MULTIPLE")


def require_thread_multiple(what: str) -> None:
    """Raise a :class:`UserError` unless MPI runs with ``MPI_THREAD_MULTIPLE``: ``what``
    calls MPI from several threads at once, undefined behaviour at any lower level."""
    from mpi4py import MPI

    level = MPI.Query_thread()
    if level < MPI.THREAD_MULTIPLE:
        name = THREAD_LEVELS[level] if 0 <= level < len(THREAD_LEVELS) else str(level)
        raise UserError(
            f"{what} needs MPI_THREAD_MULTIPLE but MPI was initialised with {name}: unset "
            "MPI4PY_RC_THREAD_LEVEL (mpi4py asks for 'multiple' by default) or use an MPI "
            "library built with thread support")


def _host_buffer(numel: int, dtype: torch.dtype = torch.float32,
                 pin: bool | None = None) -> Tensor:
    """A CPU buffer for MPI; pinned when CUDA is present so GPU copies are DMA transfers
    (``pin=False``: never, e.g. on a master that does not use the GPU: pinning would open
    a CUDA context on it)."""
    if pin is None:
        pin = torch.cuda.is_available()
    return torch.zeros(numel, dtype=dtype, pin_memory=pin)


SPIN_S = 0.0005  # poll with sched_yield this long before falling back to short sleeps
NAP_S = 0.00005


class _Poll:
    """Polling instead of blocking MPI waits: a blocking OpenMPI call spins a core at full
    speed, which oversubscribed ranks' training threads need. Spin briefly (yielding) for
    low latency, then nap."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def pause(self) -> None:
        if time.monotonic() - self.start < SPIN_S:
            os.sched_yield()
        else:
            time.sleep(NAP_S)


def _wait_any(reqs: list, timeout: float, what: str) -> int:
    """Wait for the first of ``reqs`` to complete (with a timeout, yielding the CPU while
    none has); returns its index. The completed request becomes MPI.REQUEST_NULL in
    ``reqs``, the others stay pending."""
    from mpi4py import MPI

    deadline = time.monotonic() + timeout
    poll = _Poll()
    while True:
        index, done = MPI.Request.Testany(reqs)
        if done and index != MPI.UNDEFINED:
            return index
        poll.pause()
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")


def _wait(req, timeout: float, what: str, patient: bool = False, status=None) -> None:
    """Wait for one request with a timeout, yielding the CPU while it is pending
    (``patient``: no rush, nap 1 ms at a time and leave the CPU to the server thread);
    ``status`` receives the completed request's status."""
    deadline = time.monotonic() + timeout
    poll = _Poll()
    while not req.Test(status):
        if patient:
            time.sleep(0.001)
        else:
            poll.pause()
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")


# ----------------------------------------------------------------------------- star
def _meta(kind: float, *values: float) -> np.ndarray:
    """A star metadata message: ``[kind, values..., 0...]`` (float64, META long)."""
    m = np.zeros(META)
    m[0] = kind
    m[1: 1 + len(values)] = values
    return m


class MpiStarMaster:
    """The master's side of the star: rank 0's, worker ``w`` rank ``w + 1``; or, a
    sharded master's (``first_worker`` = K shards), shard ``k``'s on rank ``k``, worker
    ``w`` rank ``w + K``."""

    def __init__(self, comm, numel: int, timeout: float, pin: bool | None = None,
                 first_worker: int = 1) -> None:
        self.comm = comm
        self.first = first_worker
        self.n_workers = comm.Get_size() - first_worker
        self.device = torch.device("cpu")  # its buffers are host memory
        self.timeout = timeout
        self.meta = np.zeros((self.n_workers, META))
        self.grad = _host_buffer(numel, pin=pin)
        self.reqs = [self._post(w) for w in range(self.n_workers)]
        # workers whose metadata has arrived but was not taken by recv yet: Testsome
        # reports a completed request once, and ready() must keep reporting it (as a pipe
        # with unread data does) until recv takes it
        self.arrived: set[int] = set()
        self.outstanding = [False] * self.n_workers  # params sent, gradient not yet received
        self.stop_asked = False  # a worker's rank got a stop request (SIGTERM, SIGUSR1)

    def _post(self, w: int):
        return self.comm.Irecv(self.meta[w], source=w + self.first, tag=T_META)

    def ready(self, timeout: float) -> list[int]:
        from mpi4py import MPI

        deadline = time.monotonic() + timeout
        poll = _Poll()
        while True:
            self.arrived.update(MPI.Request.Testsome(self.reqs) or ())
            if self.arrived:
                return sorted(self.arrived)
            poll.pause()
            if time.monotonic() > deadline:
                return []

    def recv(self, worker: int) -> tuple[Any, Tensor]:
        m = self.meta[worker].copy()
        self.stop_asked = self.stop_asked or m[META - 1] == 1.0
        grad: Tensor | None = self.grad
        if m[0] == K_HELLO:
            meta: Any = Hello(worker)
        elif m[0] == K_OBJ:
            meta, grad = self.comm.recv(source=worker + self.first, tag=T_OBJ), None
            if isinstance(meta, Bye):  # a sharded master's worker has stopped: no repost
                self.arrived.discard(worker)
                raise PeerGone(f"worker {worker} said goodbye")
        else:
            self.comm.Recv(self.grad, source=worker + self.first, tag=T_TENSOR)
            lr = float(m[5])  # NaN on the wire: the master's own schedule
            meta = Grad(int(m[1]), int(m[2]), float(m[3]), float(m[4]),
                        lr if lr == lr else None)
        self.outstanding[worker] = False
        self.arrived.discard(worker)
        self.reqs[worker] = self._post(worker)
        return meta, grad

    def send(self, worker: int, params: Tensor | None, meta: Any) -> None:
        """``Params`` (with ``params``), ``Stop``, or any other picklable object."""
        dest = worker + self.first
        if not isinstance(meta, Params | Stop):
            self.comm.Send(_meta(K_OBJ), dest=dest, tag=T_META)
            self.comm.send(meta, dest=dest, tag=T_OBJ)
            return
        if isinstance(meta, Stop):
            if self.outstanding[worker]:  # it is computing: take (and drop) its gradient
                _wait(self.reqs[worker], self.timeout, f"worker {worker}'s last gradient")
                self.recv(worker)
            self.reqs[worker].Cancel()
            self.reqs[worker].Wait()
            self.comm.Send(_meta(K_STOP), dest=dest, tag=T_META)
            return
        self.comm.Send(_meta(K_PARAMS, meta.version), dest=dest, tag=T_META)
        assert params is not None
        self.comm.Send(params, dest=dest, tag=T_TENSOR)
        self.outstanding[worker] = True


class MpiStarWorker:
    """A worker rank's side of the star: to the master on rank ``master`` (0; a sharded
    master's shard ``k`` on rank ``k``), workers from rank ``first_worker`` on."""

    def __init__(self, comm, numel: int, master: int = 0, first_worker: int = 1) -> None:
        self.comm = comm
        self.master = master
        self.worker = comm.Get_rank() - first_worker
        self.host = _host_buffer(numel)
        self.meta = np.zeros(META)
        self.stopping = False

    def request_stop(self) -> None:
        """A stop request on this rank (a signal handler may call it): the next message
        to the master asks it to stop the job; until the master's stop comes, this
        worker goes on as usual."""
        self.stopping = True

    def _meta(self, kind: float, *values: float) -> np.ndarray:
        m = _meta(kind, *values)
        m[META - 1] = 1.0 if self.stopping else 0.0
        return m

    def send(self, grad: Tensor | None, meta: Any) -> None:
        """``Hello``, ``Grad`` (with ``grad``), or any other picklable object."""
        if isinstance(meta, Hello):
            self.comm.Send(self._meta(K_HELLO), dest=self.master, tag=T_META)
            return
        if not isinstance(meta, Grad):
            self.comm.Send(self._meta(K_OBJ), dest=self.master, tag=T_META)
            self.comm.send(meta, dest=self.master, tag=T_OBJ)
            return
        self.comm.Send(self._meta(K_GRAD, meta.version, meta.samples, meta.loss, meta.compute_s,
                             float("nan") if meta.lr is None else meta.lr),
                       dest=self.master, tag=T_META)
        assert grad is not None
        if grad.device.type != "cpu":
            self.host.copy_(grad)
            grad = self.host
        self.comm.Send(grad, dest=self.master, tag=T_TENSOR)

    def post(self):
        """The receive of the next message's header (:func:`recv_from_each` waits on
        several)."""
        return self.comm.Irecv(self.meta, source=self.master, tag=T_META)

    def recv(self, params_out: Tensor, timeout: float) -> Any:
        req = self.post()
        try:
            _wait(req, timeout,
                  f"worker {self.worker}: a message from the master (rank {self.master})")
        except TimeoutError:
            req.Cancel()
            req.Wait()
            raise
        return self.take(params_out)

    def take(self, params_out: Tensor | None) -> Any:
        """The rest of the message whose header has arrived."""
        if self.meta[0] == K_STOP:
            return Stop()
        if self.meta[0] == K_OBJ:
            return self.comm.recv(source=self.master, tag=T_OBJ)
        assert params_out is not None, "a model arrived where none was expected"
        if params_out.device.type == "cpu":
            self.comm.Recv(params_out, source=self.master, tag=T_TENSOR)
        else:
            self.comm.Recv(self.host, source=self.master, tag=T_TENSOR)
            # a blocking copy: the next Recv reuses self.host
            params_out.copy_(self.host)
        return Params(int(self.meta[1]))


def recv_from_each(ends: list[MpiStarWorker], outs: list[Tensor | None], timeout: float,
                   what: str) -> list[Any]:
    """The next message of each of ``ends`` (a worker's ends to a sharded master's
    shards), ``outs[k]`` receiving a model's slice ``k``, taken in the order they arrive:
    a shard's send blocks until its message is taken, so waiting on one shard while
    another waits to send could close a cycle (the loop API's shards hold back replies
    during a ``state_dict()``)."""
    reqs = [e.post() for e in ends]
    got: list[Any] = [None] * len(ends)
    try:
        for _ in ends:
            k = _wait_any(reqs, timeout, what)
            got[k] = ends[k].take(outs[k])
    except TimeoutError:
        from mpi4py import MPI

        for r in reqs:
            if r != MPI.REQUEST_NULL:
                r.Cancel()
                r.Wait()
        raise
    return got


class MpiShardLink:
    """A sharded master's link under mpirun: shard ``k`` is rank ``k`` (pickled messages;
    a part travels as its bytes: the leader's host may not see a follower's files)."""

    def __init__(self, comm, shard: int, count: int) -> None:
        self.comm = comm
        self.peers = list(range(1, count)) if shard == 0 else [0]

    def send(self, msg: Any) -> None:
        for r in self.peers:
            self.comm.send(msg, dest=r, tag=T_SHARD)

    def poll(self) -> list[tuple[int, Any]]:
        out = []
        for r in self.peers:
            while self.comm.iprobe(source=r, tag=T_SHARD):
                out.append((r, self.comm.recv(source=r, tag=T_SHARD)))
        return out

    def payload(self, path: str) -> Any:
        p = Path(path)
        data = p.read_bytes()
        p.unlink()
        return data

    def part_path(self, payload: Any, path: str) -> str:
        Path(path).write_bytes(payload)
        return path


# --------------------------------------------------------------------------- gossip
class MpiGossip:
    """One rank's gossip state: its model x (and tracked u) and the server thread.

    Use from the training thread: :meth:`claim`, :meth:`snapshot`, :meth:`average_with`,
    :meth:`update_local`, :meth:`report_loss`; then :meth:`finish`.
    """

    def __init__(self, comm, x0: Tensor, tracked: bool, total: int, timeout: float,
                 n_tracked: int | None = None, device: torch.device | str = "cpu",
                 compress: Any = None, gamma: float = 1.0,
                 neighbors: list[int] | None = None) -> None:
        """``x0``: this rank's initial state; ``n_tracked``: the length of the tracked
        second moment (the trained parameters: default all of the state); ``device``:
        where the state lives and the local step runs (a GPU rank's own GPU: then every
        exchange goes through pinned host buffers, one DMA copy each way, and the
        average itself is computed on the GPU). ``compress`` (a
        :class:`~apam_gossip.core.compress.Compressor`): an average is a compressed
        exchange with mixing step ``gamma``, one packet each way, over the edges to
        ``neighbors``, whose public copies start at ``x0`` (every rank's start must be the
        same: a broadcast model)."""
        require_thread_multiple("gossip over MPI (a server thread beside the training thread)")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.worker = self.rank
        self.size = comm.Get_size()
        self.n_workers = self.size
        self.device = torch.device(device)
        self.timeout = timeout
        n, n_u = x0.numel(), x0.numel() if n_tracked is None else n_tracked
        # [x | u] in one buffer: an average sends it as it is, with no packed copy (on a
        # GPU, through the pinned `_wire` copy)
        on_gpu = self.device.type == "cuda"
        # staged: the GPU's way (APAM_GOSSIP_ROWS=separate takes it on a CPU too, so the
        # test suite covers it where CI has no GPU; see apam_gossip.transport.rows)
        staged = on_gpu or os.environ.get("APAM_GOSSIP_ROWS") == "separate"
        self.state = torch.zeros(n + (n_u if tracked else 0), device=self.device) if staged \
            else _host_buffer(n + (n_u if tracked else 0))
        self._wire = _host_buffer(self.state.numel(), pin=on_gpu) if staged else None
        self._dev_tmp = torch.zeros_like(self.state) if staged else None
        # the server thread's own stream: a peer's average never queues behind (or holds
        # up) this rank's gradient kernels
        self._srv_stream = torch.cuda.Stream(self.device) if on_gpu else None
        self.x = self.state[:n]
        self.x.copy_(x0)
        self.u = self.state[n:] if tracked else None
        self.lock = threading.Lock()
        # writers of x wait on it while this rank's own average is in flight (see
        # average_with): the model is read-locked while it is on the wire
        self.idle = threading.Condition(self.lock)
        self.version = 0
        self.total = total
        self.claimed = 0  # rank 0 only: updates handed out
        # a stop request reached this rank: it claims no more, and rank 0 hands out no
        # more, so on rank 0 it stops every rank within one update
        self.stopping = False
        self._told_stop = False  # rank 0 knows of this rank's stop request
        self.losses = [0.0, 0]
        self.compress, self.gamma = compress, gamma
        # compressed: per neighbour j, (this rank's model as j knows it, j's as this rank
        # knows it); the packets travel as bytes in their own buffers
        self.public: dict[int, tuple[Tensor, Tensor]] = {}
        if compress is not None:
            assert not tracked, "a compressed average moves x only (config refuses tracked)"
            for j in neighbors or []:
                self.public[j] = (self.x.clone(), self.x.clone())
            from ..core.compress import warm_up

            warm_up(compress, n)  # before the server thread serves an exchange
            nb = compress.nbytes(n)
            self._recv_buf = torch.zeros(nb, dtype=torch.uint8)
            self._srv_buf = torch.zeros(nb, dtype=torch.uint8)
            self._send_pkt = torch.zeros(nb, dtype=torch.uint8)
            self._srv_pkt = torch.zeros(nb, dtype=torch.uint8)
        else:
            self._recv_buf = _host_buffer(self.state.numel())
            self._srv_buf = _host_buffer(self.state.numel())
        self.averages = 0
        self.refused = 0  # averages this rank asked for and its peer refused (busy)
        self.in_flight = False  # this rank's own average is on its way (under self.lock)
        # a refusal's payload, out and in; its tag (T_REFUSED), not its size, says what
        # it is: a 1-element model's reply is 1 element long too
        self._busy = _host_buffer(1)
        self._refusal_buf = _host_buffer(1)
        self.t0 = 0.0
        self.error: BaseException | None = None
        self.server = threading.Thread(target=self._serve, name="gossip-server", daemon=True)
        self.server.start()

    # -- the server thread ----------------------------------------------------------
    def _serve(self) -> None:
        """Serve requests until told to stop. Two receives stay posted: small headers
        (snapshot, claim, stop) and averaging payloads, so an average is one message
        each way.

        While this rank's own average is in flight, an average asked by a higher rank
        waits (it is served as soon as this rank's average is done) and one asked by a
        lower rank is refused (a T_REFUSED message). So every average is exact, and a
        blocking wait only ever goes from a higher rank to a lower one: no cycle of
        waits, no deadlock."""
        from mpi4py import MPI

        hdr = np.zeros(2, dtype=np.int64)
        status = MPI.Status()
        buf = self._srv_buf
        waiting: list[tuple[int, Tensor]] = []  # (rank, its payload) deferred
        reqs = [self.comm.Irecv(hdr, source=MPI.ANY_SOURCE, tag=T_REQ),
                self.comm.Irecv(buf, source=MPI.ANY_SOURCE, tag=T_DATA)]
        try:
            while True:
                poll = _Poll()
                while True:
                    if waiting:
                        waiting = self._serve_waiting(waiting)
                    idx, done = MPI.Request.Testany(reqs, status)
                    if done and idx != MPI.UNDEFINED:
                        break
                    poll.pause()
                src = status.Get_source()
                if idx == 1:  # an average: x <- (x + x_src) / 2, reply with it
                    if self.compress is not None and src not in self.public:
                        # not a neighbour here (the ranks built different graphs): no
                        # copies of that edge, so refuse; the asker tries another
                        self.comm.Send(self._busy, dest=src, tag=T_REFUSED)
                        reqs[1] = self.comm.Irecv(buf, source=MPI.ANY_SOURCE, tag=T_DATA)
                        continue
                    with self.lock:
                        busy = self.in_flight
                        if not busy:
                            self._blend_and_reply(buf, src)
                    if busy and src > self.rank:  # wait until this rank's average is done
                        waiting.append((src, buf.clone()))
                    elif busy:  # refuse: its model stays as it is
                        self.comm.Send(self._busy, dest=src, tag=T_REFUSED)
                    reqs[1] = self.comm.Irecv(buf, source=MPI.ANY_SOURCE, tag=T_DATA)
                    continue
                kind = int(hdr[0])
                if kind == R_STOP:
                    reqs[1].Cancel()
                    reqs[1].Wait()
                    return
                if kind == R_SNAP:
                    with self.lock:
                        snap = self.x.to("cpu", copy=True)
                    self.comm.Send(snap, dest=src, tag=T_SNAP_REPLY)
                elif kind == R_CLAIM:  # reply with the update's index, 0 when none is left
                    if hdr[1]:  # the asker got a stop request: the whole job stops
                        self.stopping = True
                    index = 0
                    if self.claimed < self.total and not self.stopping:
                        self.claimed += 1
                        index = self.claimed
                    self.comm.Send(np.array([index], dtype=np.int64), dest=src,
                                   tag=T_CLAIM_REPLY)
                else:
                    raise AssertionError(f"unknown gossip request {kind} from rank {src}")
                reqs[0] = self.comm.Irecv(hdr, source=MPI.ANY_SOURCE, tag=T_REQ)
        except BaseException as e:  # noqa: BLE001 - surfaced by the training thread
            self.error = e

    def zero_public(self) -> None:
        """Every edge's public copies at zero (CHOCO-SGD's start), where the ranks did
        not start from one model."""
        for pair in self.public.values():
            for t in pair:
                t.zero_()

    def _packet_of(self, j: int, out: Tensor) -> Tensor:
        """``out`` (host bytes) <- Q(x - this rank's public copy for ``j``)."""
        from ..core.compress import encode_change

        mine, _ = self.public[j]
        if out.device == self.x.device:
            encode_change(self.compress, self.x, mine, out)
            return out
        dev = torch.zeros(out.numel(), dtype=torch.uint8, device=self.x.device)
        encode_change(self.compress, self.x, mine, dev)
        out.copy_(dev)  # a device-to-host copy: whole when it returns
        return out

    def _mix(self, j: int, sent: Tensor, got: Tensor) -> None:
        """The exchange's second half (:func:`~apam_gossip.core.compress.mix`), where the
        model is."""
        from ..core.compress import mix

        mine, theirs = self.public[j]
        dev = self.x.device
        mix(self.compress, self.x, mine, theirs, sent.to(dev), got.to(dev), self.gamma)
        fence(self.x)

    def _blend_and_reply(self, payload: Tensor, src: int) -> None:
        """Under the lock: [x | u] <- the mean with the payload (one pass), then send it
        straight from the model as the reply. The lock stays held until the send is
        done, so no local step lands in the model while it is on the wire (the asker
        takes the reply as its new model). Compressed: the payload is the asker's
        packet; this rank answers with its own and both mix."""
        if self.compress is not None:
            stream = self._srv_stream  # (a GPU rank: beside its gradient's kernels)
            with torch.cuda.stream(stream) if stream is not None else \
                    contextlib.nullcontext():
                reply = self._packet_of(src, self._srv_pkt)
                self._mix(src, reply, payload)
            self.version += 1
            self.comm.Send(reply, dest=src, tag=T_REPLY)
            return
        if self._wire is None:
            torch.lerp(self.state, payload, 0.5, out=self.state)
            self.version += 1
            self.comm.Send(self.state, dest=src, tag=T_REPLY)
            return
        assert self._dev_tmp is not None
        stream = self._srv_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            self._dev_tmp.copy_(payload, non_blocking=True)
            torch.lerp(self.state, self._dev_tmp, 0.5, out=self.state)
            self._wire.copy_(self.state, non_blocking=True)
            if stream is not None:
                stream.synchronize()  # x and the wire copy whole before the send
        self.version += 1
        self.comm.Send(self._wire, dest=src, tag=T_REPLY)

    def _serve_waiting(self, waiting: list[tuple[int, Tensor]]) -> list[tuple[int, Tensor]]:
        """Serve the deferred averages once this rank's own is done; returns what still
        waits."""
        with self.lock:
            if self.in_flight:
                return waiting
            for src, payload in waiting:
                self._blend_and_reply(payload, src)
        return []

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"rank {self.rank}: gossip server failed: {self.error}")

    # -- the training thread --------------------------------------------------------
    def request_stop(self) -> None:
        """Stop claiming (a signal handler may call it; see :attr:`stopping`). The next
        claim tells rank 0, which then hands out no more updates to any rank."""
        self.stopping = True

    def claim(self, total: int) -> int:
        """Claim one of the ``total`` updates from rank 0: its index 1..total, or 0 when
        none is left or a stop was requested (here or on any rank)."""
        self._check()
        if self.stopping and self._told_stop:
            return 0
        stop = self.stopping
        self.comm.Send(np.array([R_CLAIM, int(stop)], dtype=np.int64), dest=0, tag=T_REQ)
        self._told_stop = stop
        ans = np.zeros(1, dtype=np.int64)
        req = self.comm.Irecv(ans, source=0, tag=T_CLAIM_REPLY)
        _wait(req, self.timeout, f"rank {self.rank}: the budget from rank 0")
        return int(ans[0])

    def report_loss(self, loss: float) -> None:
        self.losses[0] += loss
        self.losses[1] += 1

    def wait_start(self, timeout: float) -> bool:
        return True  # the ranks pass a barrier before training starts

    def is_alive(self, j: int) -> bool:
        return True  # a dead rank ends the whole job (no ULFM)

    def optimizer_state(self) -> dict[str, Tensor] | None:
        return None  # each rank keeps its own (no checkpoints of gossip under MPI)

    def snapshot(self, out: Tensor) -> int:
        with self.lock:
            out.copy_(self.x)
            fence(out)  # whole before the server thread may average into x
            return self.version

    def average_with(self, j: int) -> bool:
        """Average with rank ``j``; False if ``j`` refused because its own average was in
        flight (nothing changed on either side; the caller goes on).

        While this rank's average is in flight its server refuses (or defers) incoming
        averages and local steps wait, so every average that happens is exact: neither
        side's model changes between what it sent and the result (a concurrently served
        average would make the result an affine, not a convex, combination: the tracked
        second moment could go negative and the step blow up). Safe to call from a
        communication thread while the training thread computes a gradient."""
        from mpi4py import MPI

        self._check()
        with self.lock:
            self.in_flight = True
        # From here until in_flight is cleared the model is read-locked: this rank's
        # server refuses or defers averages, and update_local waits. So it is sent as it
        # is (no packed copy) and the reply, the exact average, simply replaces it.
        try:
            # j answers with exactly one of the two (its tag says which), so the other
            # receive is cancelled once the answer is in
            answers = [self.comm.Irecv(self._recv_buf, source=j, tag=T_REPLY),
                       self.comm.Irecv(self._refusal_buf, source=j, tag=T_REFUSED)]
            out = self.state
            if self.compress is not None:  # the packet of this rank's change, not x
                out = self._packet_of(j, self._send_pkt)
            elif self._wire is not None:
                self._wire.copy_(self.state)  # a device-to-pinned copy; waits for it
                out = self._wire
            self.comm.Send(out, dest=j, tag=T_DATA)
            got = _wait_any(answers, self.timeout,
                            f"rank {self.rank}: rank {j}'s answer to an average")
            unused = answers[1 - got]
            unused.Cancel()
            status = MPI.Status()
            unused.Wait(status)
            if not status.Is_cancelled():
                raise AssertionError(f"rank {self.rank}: rank {j} both averaged and refused")
            if got == 1:  # refused: j is averaging with another rank, nothing changed
                self.refused += 1
                return False
            with self.lock:
                if self.compress is not None:
                    self._mix(j, self._send_pkt, self._recv_buf)
                else:
                    self.state.copy_(self._recv_buf)
                    fence(self.state)
                self.version += 1
            self.averages += 1
            return True
        finally:
            with self.lock:
                self.in_flight = False
                self.idle.notify_all()

    def update_local(self, fn, since: int | None = None) -> int:
        """``since``: unused here (see :meth:`ShmGossipEnd.update_local`; gossip writes
        no checkpoints under mpirun, and the worker keeps its own histogram)."""
        with self.lock:
            # a step taken while this rank's own average is on the wire would be
            # overwritten by its reply: wait for it (it never waits on this thread)
            self.idle.wait_for(lambda: not self.in_flight)
            fn(self.x, self.u)
            fence(self.x)  # done before the server thread may average into x
            self.version += 1
            return self.version

    # -- rank 0: monitoring ---------------------------------------------------------
    def gather_snapshots(self) -> Tensor:
        """Every rank's current x (each taken under that rank's lock), via the servers."""
        xs = torch.zeros(self.size, self.x.numel())
        for r in range(self.size):
            self.comm.Send(np.array([R_SNAP, 0], dtype=np.int64), dest=r, tag=T_REQ)
            req = self.comm.Irecv(xs[r], source=r, tag=T_SNAP_REPLY)
            _wait(req, self.timeout, f"rank {r}'s snapshot")
        return xs

    def finish(self, timeout: float | None = None) -> None:
        """After the last local step: wait until every rank is done (servers keep serving
        meanwhile; at most ``timeout`` s, default the transport's), then stop this rank's
        server."""
        _wait(self.comm.Ibarrier(), self.timeout if timeout is None else timeout,
              f"rank {self.rank}: the other ranks to finish", patient=True)
        self.comm.Send(np.array([R_STOP, 0], dtype=np.int64), dest=self.rank, tag=T_REQ)
        self.server.join(timeout=self.timeout)
        self._check()


# ---------------------------------------------------------------------------- sync
class MpiSync:
    """The synchronous baselines' collectives over MPI (non-blocking calls, polled)."""

    def __init__(self, comm, numel: int, neighbors: list[int], timeout: float) -> None:
        self.comm = comm
        self.worker = comm.Get_rank()
        self.n_workers = comm.Get_size()
        self.device = torch.device("cpu")  # host buffers
        self.timeout = timeout
        self.neighbors = neighbors
        self.recv = {j: _host_buffer(numel) for j in neighbors}
        self.tmp = _host_buffer(numel)

    def barrier(self) -> None:
        _wait(self.comm.Ibarrier(), self.timeout, f"rank {self.worker}: the barrier")

    def allreduce_mean(self, t: Tensor) -> None:
        from mpi4py import MPI

        self.tmp.copy_(t)
        _wait(self.comm.Iallreduce(MPI.IN_PLACE, self.tmp, op=MPI.SUM), self.timeout,
              f"rank {self.worker}: the all-reduce")
        t.copy_(self.tmp.div_(self.n_workers))

    def vote_stop(self, mine: bool) -> _MpiVote:
        """A non-blocking all-reduce (max) of every rank's wish to stop."""
        from mpi4py import MPI

        vote = _MpiVote(np.array([int(mine)], dtype=np.int32), np.zeros(1, dtype=np.int32),
                        self.timeout, f"rank {self.worker}: the other ranks' stop vote")
        vote.req = self.comm.Iallreduce(vote.mine, vote.all, op=MPI.MAX)
        return vote

    def mix(self, x: Tensor, weights: list[tuple[int, float]], on_all=None,
            gather: bool = False) -> None:
        if gather:  # every rank's pre-mix model to rank 0, for evaluation
            alls = torch.zeros(self.n_workers, x.numel()) if self.worker == 0 else None
            _wait(self.comm.Igather(x.contiguous(), alls, root=0), self.timeout,
                  f"rank {self.worker}: gathering models")
            if on_all is not None:
                on_all(alls)
        others = [j for j, _ in weights if j != self.worker]
        reqs = [self.comm.Irecv(self.recv[j], source=j, tag=T_DATA) for j in others]
        reqs += [self.comm.Isend(x, dest=j, tag=T_DATA) for j in others]
        _wait_all(reqs, self.timeout, f"rank {self.worker}: neighbors' models")
        mix_into(self.tmp, weights, lambda j: x if j == self.worker else self.recv[j])
        x.copy_(self.tmp)


class _MpiVote:
    """One step's stop vote in flight (its buffers live as long as the request)."""

    def __init__(self, mine: np.ndarray, all_: np.ndarray, timeout: float, what: str) -> None:
        self.mine, self.all, self.timeout, self.what = mine, all_, timeout, what
        self.req: Any = None

    def agreed(self) -> bool:
        _wait(self.req, self.timeout, self.what)
        return bool(self.all[0])


def _wait_all(reqs: list, timeout: float, what: str) -> None:
    from mpi4py import MPI

    deadline = time.monotonic() + timeout
    poll = _Poll()
    while not MPI.Request.Testall(reqs):
        poll.pause()
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")


__all__ = ["MpiStarMaster", "MpiSync", "MpiStarWorker", "MpiGossip", "launched_by_mpi", "world"]
