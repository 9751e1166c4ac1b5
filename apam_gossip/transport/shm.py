"""Single-machine transport: shared-memory tensor slots plus pipes for notifications.

Star (master/worker): each worker ``i`` owns a parameter slot and a gradient slot in
shared memory and one duplex pipe to the master. A worker writes its gradient into its
slot and then sends a small message; the master applies it and writes fresh parameters
into that worker's parameter slot before answering. Because each slot has exactly one
writer at a time (handed over by the pipe message), no locks are needed and a slow
worker never blocks the others: the master waits on all pipes at once and serves
whichever is ready.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
from torch import Tensor

from ..average import FUSED_MIN_NUMEL, average_pair_, fused_available, mix_into
from ..core.compress import Compressor, exchange_pair, packet, warm_up
from ..messages import Bye
from ..procs import CTX
from . import NoVote, PeerGone
from .rows import Rows, fence


class ShmStar:
    """Creates the shared slots and pipes; hand :meth:`master_end` / :meth:`worker_end`
    to the processes, then call :meth:`close_parent_copies`."""

    def __init__(self, n_workers: int, numel: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        """``device``: where the slots are: the master's device (its GPU: the workers copy
        their gradients in and their models out device to device, through CUDA IPC)."""
        self.n_workers = n_workers
        devices = [torch.device(device)] * n_workers
        self.params = Rows(n_workers, numel, dtype, devices)
        self.grads = Rows(n_workers, numel, dtype, devices)
        pipes = [CTX.Pipe(duplex=True) for _ in range(n_workers)]
        self._master_conns = [a for a, _ in pipes]
        self._worker_conns = [b for _, b in pipes]

    def master_end(self) -> ShmMasterEnd:
        return ShmMasterEnd(self.params, self.grads, self._master_conns)

    def worker_end(self, i: int) -> ShmWorkerEnd:
        return ShmWorkerEnd(i, self.params[i], self.grads[i], self._worker_conns[i])

    def close_parent_copies(self) -> None:
        """Close the parent's pipe ends so each side sees EOF when its peer dies."""
        for c in self._master_conns + self._worker_conns:
            c.close()


class ShmShardLinks:
    """A sharded master's links on one machine: a duplex pipe between the leader and
    each follower. Hand :meth:`link` ``(k)`` to shard ``k``, then call
    :meth:`close_parent_copies`."""

    def __init__(self, count: int) -> None:
        self.pipes = [CTX.Pipe(duplex=True) for _ in range(count - 1)]

    def link(self, k: int) -> ShmShardLink:
        if k == 0:
            return ShmShardLink({j + 1: a for j, (a, _) in enumerate(self.pipes)})
        return ShmShardLink({0: self.pipes[k - 1][1]})

    def close_parent_copies(self) -> None:
        for a, b in self.pipes:
            a.close()
            b.close()


class ShmShardLink:
    """One shard's end of :class:`ShmShardLinks` (a part travels as its path)."""

    def __init__(self, conns: dict[int, Connection]) -> None:
        self.conns = conns

    def send(self, msg: Any) -> None:
        for c in self.conns.values():
            try:
                c.send(msg)
            except (BrokenPipeError, OSError):
                raise PeerGone("a master shard closed its link") from None

    def poll(self) -> list[tuple[int, Any]]:
        out = []
        for k, c in self.conns.items():
            try:
                while c.poll():
                    out.append((k, c.recv()))
            except (EOFError, OSError):
                raise PeerGone(f"master shard {k} closed its link") from None
        return out

    def payload(self, path: str) -> Any:
        return path

    def part_path(self, payload: Any, path: str) -> str:
        return payload


class ShmMasterEnd:
    def __init__(self, params: Rows, grads: Rows, conns: list[Connection]) -> None:
        self.n_workers = len(conns)
        self.device = params.devices[0]  # where the slots are
        self.params = params
        self.grads = grads
        self.conns = conns
        self._index = {c: i for i, c in enumerate(conns)}
        self.gone: set[int] = set()

    def ready(self, timeout: float) -> list[int]:
        live = [c for i, c in enumerate(self.conns) if i not in self.gone]
        return sorted(self._index[c] for c in wait(live, timeout))

    def recv(self, worker: int) -> tuple[Any, Tensor]:
        try:
            meta = self.conns[worker].recv()
        except (EOFError, OSError):
            self.gone.add(worker)
            raise PeerGone(f"worker {worker} closed its connection") from None
        if isinstance(meta, Bye):
            self.gone.add(worker)
            raise PeerGone(f"worker {worker} said goodbye")
        return meta, self.grads[worker]

    def send(self, worker: int, params: Tensor | None, meta: Any) -> None:
        if params is not None:
            self.params[worker].copy_(params)
            fence(self.params[worker])  # whole before the worker may read it
        try:
            self.conns[worker].send(meta)
        except (BrokenPipeError, OSError):
            self.gone.add(worker)
            raise PeerGone(f"worker {worker} closed its connection") from None


class ShmWorkerEnd:
    def __init__(self, worker: int, params: Tensor, grad: Tensor, conn: Connection) -> None:
        self.worker = worker
        self.params = params
        self.grad = grad
        self.conn = conn

    def send(self, grad: Tensor | None, meta: Any) -> None:
        if grad is not None:
            self.grad.copy_(grad)
            fence(self.grad)  # whole before the master may read it
        try:
            self.conn.send(meta)
        except (BrokenPipeError, OSError):
            raise PeerGone("the master closed its connection") from None

    def recv(self, params_out: Tensor, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"worker {self.worker}: no message from the master in {timeout:g} s")
        try:
            meta = self.conn.recv()
        except (EOFError, OSError):
            raise PeerGone("the master closed its connection") from None
        if params_out is not None:
            params_out.copy_(self.params)
        return meta


# gossip staleness rarely passes a few dozen: 2 KB per worker; the last bin counts every
# staleness of STALENESS_BINS - 1 or more (RunResult.staleness says so)
STALENESS_BINS = 256


class ShmGossip:
    """Shared state for decentralized gossip: every worker's parameters (and, optionally,
    a tracked second moment, and its optimizer state) where that worker computes (host
    shared memory, or its GPU shared by CUDA IPC: see :mod:`.rows`), one lock per worker.

    Pairwise averaging is done by the initiating worker on both buffers while holding
    both workers' locks, always taken in increasing worker order. A local step holds
    only its own worker's lock. Every acquisition follows that one global order, so no
    cycle of waits can form: averaging is atomic and deadlock-free on any graph,
    bipartite or not, and a passive peer takes no part (its process keeps computing).
    """

    def __init__(self, n_workers: int, numel: int, tracked: bool = False,
                 dtype: torch.dtype = torch.float32, n_tracked: int | None = None,
                 devices: list[torch.device] | None = None,
                 compress: Compressor | None = None, gamma: float = 1.0,
                 edges: list[tuple[int, int]] | None = None) -> None:
        """``numel``: each worker's model state; ``n_tracked``: the length of the tracked
        second moment (the trained parameters: default all of the state); ``devices``:
        where each worker computes (default: all on the CPU). ``compress``: averages are
        compressed exchanges (:mod:`apam_gossip.core.compress`) with mixing step
        ``gamma``, over ``edges`` (the graph's): each edge's pair of public copies,
        ``public[row_of[(i, j)]]`` being worker i's model as j knows it, lives here once
        for both ends, beside its worker's model (set them with :meth:`start_public`)."""
        self.n_workers = n_workers
        self.devices = devices
        self.x = Rows(n_workers, numel, dtype, devices)
        self.compress, self.gamma = compress, gamma
        self.row_of: dict[tuple[int, int], int] = {}
        self.public: Rows | None = None
        if compress is not None:
            assert not tracked, "a compressed average moves x only (config refuses tracked)"
            for a, b in edges or []:
                for e in ((a, b), (b, a)):
                    self.row_of.setdefault(e, len(self.row_of))
            owners = [e[0] for e in self.row_of]
            self.public = Rows(len(owners), numel, dtype,
                               [devices[i] for i in owners] if devices else None)
        self.u = Rows(n_workers, numel if n_tracked is None else n_tracked, dtype,
                      devices) if tracked else None
        self.versions = torch.zeros(n_workers, dtype=torch.int64).share_memory_()
        # counters: [0] updates claimed, [1] updates completed, [2] averages done
        self.counters = torch.zeros(3, dtype=torch.int64).share_memory_()
        # per worker: (sum of reported training losses, count); one writer per row
        self.losses = torch.zeros(n_workers, 2, dtype=torch.float64).share_memory_()
        self.counter_lock = CTX.Lock()
        self.locks = [CTX.Lock() for _ in range(n_workers)]
        self.go = CTX.Event()
        # fault tolerance: who holds each lock (-1: nobody), who is alive, who did what
        self.holders = torch.full((n_workers,), -1, dtype=torch.int64).share_memory_()
        self.alive = torch.ones(n_workers, dtype=torch.int8).share_memory_()
        self.done_by = torch.zeros(n_workers, dtype=torch.int64).share_memory_()
        self.stop = torch.zeros(1, dtype=torch.int8).share_memory_()  # 1: claim no more
        # each worker's staleness histogram, counted with each local step (see
        # ShmGossipEnd.update_local), so a checkpoint carries it; the last bin also holds
        # everything staler
        self.staleness = torch.zeros(n_workers, STALENESS_BINS,
                                     dtype=torch.int64).share_memory_()
        # the workers' optimizer states (filled by share_optimizer_state), so that a
        # checkpoint can copy them under the workers' locks
        self.opt_state: dict[str, Rows] = {}

    def edges_key(self) -> Tensor:
        """The directed edges of the public copies' rows, in row order (``(2E, 2)``): a
        checkpoint's copies load only into the same rows."""
        return torch.tensor(list(self.row_of), dtype=torch.int64).reshape(-1, 2)

    def start_public(self, saved: Tensor | None = None, edges: Tensor | None = None) -> bool:
        """The public copies: a checkpoint's (``saved``, for the rows ``edges``: an exact
        resume), else every one from its worker's current model (at the start, or from a
        checkpoint without them, another graph or another compression: any start both
        ends share keeps the sum). Returns whether the saved ones were taken."""
        if self.public is not None and saved is not None and edges is not None \
                and torch.equal(edges, self.edges_key()) \
                and tuple(saved.shape) == tuple(self.public.shape):
            self.public.copy_(saved)
            return True
        if self.public is not None:
            for (i, _), r in self.row_of.items():
                self.public[r].copy_(self.x[i])
                fence(self.public[r])  # whole before a worker's process reads it
        return False

    def share_optimizer_state(self, template: dict[str, Tensor]) -> None:
        """Allocate every worker's optimizer state beside its model, shaped like
        ``template`` (one worker's fresh state); workers use their rows in place. Scalars
        (the step count) stay in host memory, where reading one costs no device sync."""
        n = self.n_workers
        self.opt_state = {k: Rows(n, v.shape, v.dtype, self.devices if v.dim() else None)
                          for k, v in template.items()}

    def end(self, i: int, lock_timeout: float,
            neighbors: list[int] | None = None) -> ShmGossipEnd:
        """Worker ``i``'s end; given its ``neighbors``, it carries only the rows it
        touches (its own and theirs; of the optimizer state its own)."""
        return ShmGossipEnd(i, self, lock_timeout, neighbors)

    def recover(self, dead: int) -> list[int]:
        """After worker ``dead``'s process died: mark it dead so neighbors stop choosing
        it, and release the locks it held (a semaphore may be released by any process).
        Returns the locks released. If it died between acquiring a lock and recording
        that, the lock stays taken and its neighbors fail after their lock timeout."""
        self.alive[dead] = 0
        freed = []
        for k in range(self.n_workers):
            if int(self.holders[k]) == dead:
                self.holders[k] = -1
                self.locks[k].release()
                freed.append(k)
        return freed

    def consistent_copy(self, lock_timeout: float, with_opt_state: bool = False
                        ) -> GossipCopy:
        """All workers' parameters, u, progress counters and (when asked, for a checkpoint
        or an audit) optimizer states at one instant: takes every lock in order. Every
        write to them happens under the writing worker's lock, so the counters agree
        with the models (``completed == done_by.sum()``)."""
        taken = []
        try:
            for i, lk in enumerate(self.locks):
                if not lk.acquire(timeout=lock_timeout):
                    raise TimeoutError(f"coordinator: worker {i}'s lock was not released "
                                       f"within {lock_timeout:g} s")
                taken.append(lk)
            states = {k: v.clone() for k, v in self.opt_state.items()} if with_opt_state \
                else None  # Rows.clone: a host copy
            # the edges' public copies (compressed) with the models they go with
            public = self.public.clone() if with_opt_state and self.public is not None \
                else None
            return GossipCopy(self.x.clone(), self.u.clone() if self.u is not None else None,
                              states, int(self.counters[1]), int(self.counters[2]),
                              self.done_by.clone(), self.staleness.sum(0), public)
        finally:
            for lk in reversed(taken):
                lk.release()


@dataclass
class GossipCopy:
    """Every worker's state at one instant (see :meth:`ShmGossip.consistent_copy`)."""

    x: Tensor
    u: Tensor | None
    opt_state: dict[str, Tensor] | None
    completed: int  # local steps applied, all workers
    averages: int
    done_by: Tensor  # local steps applied, per worker
    staleness: Tensor  # how many local steps had each staleness (STALENESS_BINS bins)
    public: Tensor | None = None  # compressed: the edges' public copies (row_of's rows)

    def staleness_counts(self) -> dict[int, int]:
        return {k: int(v) for k, v in enumerate(self.staleness.tolist()) if v}


class ShmGossipEnd:
    """Worker ``i``'s view of :class:`ShmGossip` (picklable into a spawned process)."""

    def __init__(self, i: int, g: ShmGossip, lock_timeout: float,
                 neighbors: list[int] | None = None) -> None:
        self.worker = i
        self.n_workers = g.n_workers
        self.device = g.x[i].device
        used = {i, *neighbors} if neighbors is not None else set(range(g.n_workers))
        self.x = g.x.only(used)
        self.u = g.u.only(used) if g.u is not None else None
        self.compress, self.gamma = g.compress, g.gamma
        # the copies of this worker's edges (both directions: it runs both sides)
        self.row_of = {e: r for e, r in g.row_of.items() if i in e and set(e) <= used}
        self.public = g.public.only(set(self.row_of.values())) \
            if g.public is not None else None
        self._packets: tuple[Tensor, Tensor] | None = None
        self.versions = g.versions
        self.counters = g.counters
        self.losses = g.losses
        self.holders = g.holders
        self.alive = g.alive
        self.done_by = g.done_by
        self.stop = g.stop
        self.staleness = g.staleness
        self.shared_opt_state = {k: v.only({i}) for k, v in g.opt_state.items()} \
            if g.opt_state else g.opt_state
        self.counter_lock = g.counter_lock
        self.locks = g.locks
        self.go = g.go
        self.lock_timeout = lock_timeout

    def __setstate__(self, state: dict) -> None:
        """Unpickled in the worker's process: compile the fused average there now (about
        1 s, once), when the model is big enough to use it, and not inside the first
        average, which holds two workers' locks."""
        self.__dict__.update(state)
        if not self.x.on_gpu and self.x.shape[1] >= FUSED_MIN_NUMEL:
            fused_available()
        warm_up(self.compress, self.x.shape[1])

    def _acquire(self, j: int) -> None:
        if not self.locks[j].acquire(timeout=self.lock_timeout):
            raise TimeoutError(f"worker {self.worker}: waited {self.lock_timeout:g} s for "
                               f"worker {j}'s lock")
        self.holders[j] = self.worker

    def _release(self, j: int) -> None:
        self.holders[j] = -1
        self.locks[j].release()

    def is_alive(self, j: int) -> bool:
        return bool(self.alive[j])

    def wait_start(self, timeout: float) -> bool:
        return bool(self.go.wait(timeout))

    def optimizer_state(self) -> dict[str, Tensor] | None:
        """This worker's rows of the shared optimizer state (views), if shared."""
        if not self.shared_opt_state:
            return None
        return {k: v[self.worker] for k, v in self.shared_opt_state.items()}

    def claim(self, total: int) -> int:
        """Claim one of ``total`` updates: its index 1..total, or 0 once all are claimed
        or the coordinator asked to stop (time to stop)."""
        with self.counter_lock:
            if self.counters[0] >= total or int(self.stop[0]):
                return 0
            self.counters[0] += 1
            return int(self.counters[0])

    def report_loss(self, loss: float) -> None:
        row = self.losses[self.worker]
        row[0] += loss
        row[1] += 1

    def snapshot(self, out: Tensor) -> int:
        """Copy this worker's parameters into ``out``; returns their version."""
        i = self.worker
        self._acquire(i)
        try:
            out.copy_(self.x[i])
            fence(out)  # the copy is whole before an average may write x_i
            return int(self.versions[i])
        finally:
            self._release(i)

    def average_with(self, j: int) -> bool:
        """Atomically set x_i, x_j (and u_i, u_j) to their mean (mixing weight 1/2);
        always done here (both locks are taken), so always True."""
        i = self.worker
        a, b = (i, j) if i < j else (j, i)
        self._acquire(a)
        try:
            self._acquire(b)
            try:
                if self.compress is not None:
                    self._exchange(j)
                else:
                    for buf in (self.x, self.u) if self.u is not None else (self.x,):
                        average_pair_(buf[i], buf[j])
                        fence(buf[i], buf[j])  # done before the locks go (see .rows)
                self.versions[i] += 1
                self.versions[j] += 1
                with self.counter_lock:  # counted under the locks: see consistent_copy
                    self.counters[2] += 1
            finally:
                self._release(b)
        finally:
            self._release(a)
        return True

    def _exchange(self, j: int) -> None:
        """Under both locks: the compressed exchange over the edge (i, j), both sides
        (:func:`~apam_gossip.core.compress.exchange_pair`)."""
        assert self.compress is not None and self.public is not None
        i = self.worker
        x_i, x_j = self.x[i], self.x[j]
        if self._packets is None:  # this process's packet buffers, made once
            n = x_i.numel()
            self._packets = (packet(self.compress, n, x_i.device),
                             packet(self.compress, n, x_j.device))
        q_i, q_j = self._packets
        if q_j.device != x_j.device:  # (neighbours on several GPUs)
            q_j = packet(self.compress, x_j.numel(), x_j.device)
        p_ij, p_ji = self.public[self.row_of[(i, j)]], self.public[self.row_of[(j, i)]]
        exchange_pair(self.compress, self.gamma, x_i, x_j, p_ij, p_ji, q_i, q_j)
        fence(x_i, x_j, p_ij, p_ji)

    def update_local(self, fn, since: int | None = None) -> int:
        """Run ``fn(x_i, u_i)`` under this worker's lock (a local step never interleaves
        with an average, so neither is lost) and count it as a completed update in the
        same critical section, so a consistent copy never sees a step without its count
        (or a count without its step); returns the new version. ``since``: the version
        the step's gradient was computed at, plus this worker's own averages since; the
        step's staleness (the writes of others to x_i since then) joins the histogram
        in the same critical section."""
        i = self.worker
        self._acquire(i)
        try:
            fn(self.x[i], self.u[i] if self.u is not None else None)
            fence(self.x[i])
            if since is not None:
                stale = min(max(int(self.versions[i]) - since, 0), STALENESS_BINS - 1)
                self.staleness[i, stale] += 1
            self.versions[i] += 1
            self.done_by[i] += 1
            with self.counter_lock:
                self.counters[1] += 1
            return int(self.versions[i])
        finally:
            self._release(i)


class SyncTimeout(TimeoutError):
    """A synchronous step waited too long for the other workers."""


class ShmSync:
    """Shared-memory state for the synchronous baselines: one slot per worker and a barrier.

    :meth:`ShmSyncEnd.allreduce_mean` and :meth:`ShmSyncEnd.mix` are collective: every
    worker calls them once per step. Every worker reduces the same slots in the same
    order, so replicas that start equal stay bitwise equal.
    """

    def __init__(self, n_workers: int, numel: int, dtype: torch.dtype = torch.float32,
                 devices: list[torch.device] | None = None) -> None:
        """``devices``: where each worker computes; its slot is there (a GPU worker's
        all-reduce then never leaves the GPUs: CUDA IPC, see :mod:`.rows`)."""
        self.n_workers = n_workers
        self.slots = Rows(n_workers, numel, dtype, devices)
        self.barrier = CTX.Barrier(n_workers)

    def end(self, i: int, timeout: float) -> ShmSyncEnd:
        return ShmSyncEnd(i, self.slots, self.barrier, timeout)


class ShmSyncEnd:
    def __init__(self, i: int, slots: Rows, barrier, timeout: float) -> None:
        self.worker = i
        self.n_workers = len(slots)
        self.device = slots.devices[i]  # where this worker's slot is
        self.slots = slots
        self.barrier_ = barrier
        self.timeout = timeout
        self._tmp: Tensor | None = None  # made where the worker runs, at first use

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tmp": None}  # a GPU tensor is not sent ahead

    @property
    def tmp(self) -> Tensor:
        if self._tmp is None:
            self._tmp = torch.zeros(self.slots.shape[1], dtype=self.slots.dtype,
                                    device=self.slots.devices[self.worker])
        return self._tmp

    def _mean_into(self, out: Tensor) -> None:
        """``out`` <- the mean of the slots, in worker order on every worker (so replicas
        stay bitwise equal); host slots: one torch.mean over the shared block."""
        if not self.slots.separate:
            torch.mean(self.slots._host, 0, out=out)
            return
        out.copy_(self.slots[0])
        for j in range(1, self.n_workers):
            out.add_(self.slots[j].to(out.device))
        out.div_(self.n_workers)

    def barrier(self) -> None:
        import threading

        try:
            self.barrier_.wait(self.timeout)
        except threading.BrokenBarrierError:
            raise SyncTimeout(f"worker {self.worker}: the other workers did not reach the "
                              f"barrier within {self.timeout:g} s (one died or hangs)") from None

    def allreduce_mean(self, t: Tensor) -> None:
        """``t`` <- mean of every worker's ``t`` (in place)."""
        self.slots[self.worker].copy_(t)
        fence(self.slots[self.worker])  # whole before the others read it
        self.barrier()
        self._mean_into(self.tmp)
        fence(self.tmp)
        self.barrier()  # nobody overwrites a slot before everyone has read it
        t.copy_(self.tmp)

    def vote_stop(self, mine: bool) -> NoVote:
        """On one machine the coordinator stops lockstep workers itself (no checkpoint
        to write): nothing to agree."""
        return NoVote()

    def mix(self, x: Tensor, weights: list[tuple[int, float]], on_all=None,
            gather: bool = False) -> None:
        """``x`` <- sum_j w_j x_j over (neighbor, weight) pairs, self included.

        ``on_all(slots)``, if given, sees every worker's pre-mix model (for evaluation);
        ``gather`` tells every worker that this round is such a round (unused here: the
        slots are visible to all).
        """
        self.slots[self.worker].copy_(x)
        fence(self.slots[self.worker])
        self.barrier()
        if on_all is not None:
            on_all(self.slots.clone() if self.slots.separate else self.slots._host)
        mix_into(self.tmp, weights, lambda j: self.slots[j].to(self.tmp.device))
        fence(self.tmp)
        self.barrier()
        x.copy_(self.tmp)
