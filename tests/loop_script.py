"""A user's own training loop on the loop API, for the tests (run under mpirun, or alone).

Deterministic batches: step k of worker w draws indices from a generator seeded with
(w, k), so a reference in the test process can replay exactly what a worker saw. The
final model state is written (``--out``) by the reporting rank: rank 0, or rank 1 (the
first worker) in centralized mode, which holds the master's final model after finish().
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

import apam_gossip as ag


def make_model(seed: int = 0) -> nn.Module:
    """A bias before BatchNorm would get a zero gradient up to rounding, which AMSGrad
    normalises into full steps: runs that sum in another order would differ there."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 10))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def batch(x: torch.Tensor, y: torch.Tensor, worker: int, step: int, size: int = 32):
    g = torch.Generator().manual_seed(1000 * worker + step)
    idx = torch.randint(0, len(y), (size,), generator=g)
    return x[idx], y[idx]


def flat(model_or_state) -> torch.Tensor:
    """[parameters | float buffers] of a model (a tensor is returned as it is)."""
    if isinstance(model_or_state, torch.Tensor):
        return model_or_state
    m = model_or_state
    return torch.cat([t.detach().reshape(-1) for t in
                      [*m.parameters(), *(b for b in m.buffers() if b.is_floating_point())]])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="decentralized")
    p.add_argument("--topology", default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--first-step", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--schedule", choices=["none", "callable", "steplr"], default="none")
    p.add_argument("--out", default=None)
    p.add_argument("--result", default=None)
    p.add_argument("--save-state", default=None)
    p.add_argument("--load-state", default=None)
    p.add_argument("--wide-on-rank", type=int, default=-1, help="a different model there")
    p.add_argument("--short-rank", type=int, default=-1, help="this rank takes half the steps")
    p.add_argument("--model-zero-grad", action="store_true")
    p.add_argument("--step-before-init", action="store_true")
    p.add_argument("--adaptive-state", default="local")
    p.add_argument("--no-overlap", action="store_true", help="average inside step()")
    p.add_argument("--no-broadcast", action="store_true", help="each rank its own start")
    p.add_argument("--dump", default=None, help="folder: each rank's first/last model")
    p.add_argument("--die-at", type=int, default=0, help="rank 2 kills itself at this step")
    p.add_argument("--no-finish", action="store_true", help="forget opt.finish()")
    p.add_argument("--bad-lr-on-rank", type=int, default=-1, help="lr -1 on this rank only")
    p.add_argument("--master-return", default=None, help="centralized: rank 0 saves the "
                   "master's final model here (init(master='return'))")
    p.add_argument("--load-on-rank", type=int, default=-1, help="only this rank loads "
                   "--load-state")
    p.add_argument("--missing-topology-on-rank", type=int, default=-1, help="this rank "
                   "passes a topology file that does not exist")
    p.add_argument("--momentum", type=float, default=None, help="passed to the optimizer")
    p.add_argument("--no-init-on-rank", type=int, default=-1, help="this rank waits "
                   "and never calls init()")
    p.add_argument("--timeout", type=float, default=600.0, help="init(timeout_s=)")
    p.add_argument("--log", action="append", default=None, help="init(log=)")
    p.add_argument("--master-shards", type=int, default=1, help="init(master_shards=)")
    p.add_argument("--compress", default="none", help="init(compress=)")
    p.add_argument("--seed-per-rank", action="store_true", help="init(seed=rank): a "
                   "generated topology then differs between ranks")
    p.add_argument("--neighbour-choice", default="uniform", help="init(neighbour_choice=)")
    p.add_argument("--save-every", type=int, default=0, help="every rank takes a "
                   "state_dict() every this many steps (the last saved, as --save-state)")
    a = p.parse_args()
    if a.step_before_init:
        ag.DistributedOptimizer(make_model())
    topology = a.topology
    rank_env = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    if rank_env == a.missing_topology_on_rank:
        topology = "no/such/topology.edgelist"
    if rank_env == a.no_init_on_rank:
        import time

        from mpi4py import MPI  # noqa: F401 - MPI is up here (its init needs every rank)

        time.sleep(600)  # a rank stuck elsewhere: the others time out, not hang
    handle = ag.init(mode=a.mode, topology=topology, result=a.result, timeout_s=a.timeout,
                     adaptive_state=a.adaptive_state, overlap=not a.no_overlap,
                     master="return" if a.master_return else "exit", log=a.log,
                     master_shards=a.master_shards, compress=a.compress,
                     **({"seed": rank_env} if a.seed_per_rank else {}),
                     neighbour_choice=a.neighbour_choice)
    if handle is not None:  # the centralized master, back after every worker finished
        torch.save({"state": flat(handle.load_into(make_model(seed=7)))},
                   a.master_return.format(rank=ag.rank()))
        return 0
    model = make_model(seed=100 + ag.rank() if a.no_broadcast else 0)
    if ag.rank() == a.wide_on_rank:
        model[0] = nn.Linear(64, 33, bias=False)
    lr = (lambda k: a.lr * 0.99 ** k) if a.schedule == "callable" else a.lr
    if ag.rank() == a.bad_lr_on_rank:
        lr = -1.0
    extra = {} if a.momentum is None else {"momentum": a.momentum}
    opt = ag.DistributedOptimizer(model, lr=lr, broadcast=not a.no_broadcast, **extra)
    if a.dump:
        torch.save(flat(model), f"{a.dump}/first{ag.rank()}.pt")
    sched = torch.optim.lr_scheduler.StepLR(opt, 20, 0.5) if a.schedule == "steplr" else None
    if a.load_state and a.load_on_rank in (-1, ag.rank()):  # "{rank}": each rank its own
        opt.load_state_dict(torch.load(a.load_state.format(rank=ag.rank()),
                                       weights_only=False))
    x, y = digits()
    w = ag.worker_index()
    steps = a.steps // 2 if ag.rank() == a.short_rank else a.steps
    loss_fn = nn.CrossEntropyLoss()
    for k in range(a.first_step, steps + 1):
        xb, yb = batch(x, y, w, k)
        if a.model_zero_grad:
            model.zero_grad()
        else:
            opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        if a.die_at and k == a.die_at and ag.rank() == 2:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if sched is not None:
            sched.step()
        if a.save_every and k % a.save_every == 0:
            sd = opt.state_dict()  # every rank at once: the shards' cuts cross
            if a.save_state and ag.is_main_worker():
                torch.save(sd, a.save_state)
        if a.save_state and k == steps:
            sd = opt.state_dict()
            if ag.worker_index() == 0 or "{rank}" in a.save_state:
                torch.save(sd, a.save_state.format(rank=ag.rank()))
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    me = ag.rank()
    if a.no_finish:  # apam_gossip finishes at exit, with a warning
        return 0
    opt.finish(metric=acc)
    if a.dump:
        torch.save(flat(model), f"{a.dump}/last{me}.pt")
    if ag.is_main_worker() and a.out:
        torch.save({"state": flat(model), "acc": acc, "lr": opt.param_groups[0]["lr"]}, a.out)
    print(f"rank {me} done: accuracy {acc:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
