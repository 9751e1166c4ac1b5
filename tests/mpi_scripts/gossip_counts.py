"""Run under mpirun: gossip-only consensus over MPI (no gradient steps) on models of
DIM elements; rank 0 saves the initial and final rows and every rank's count of averages
done and refused. A 1-element model's reply to an average is as long as a refusal."""

import sys

import torch

from apam_gossip.runtime.mpi import mpi_gossip_consensus
from apam_gossip.topology import make_topology, validate_topology
from apam_gossip.transport import mpi as tmpi

dim, averages, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
comm, rank, size = tmpi.world()
made: list[tmpi.MpiGossip] = []


class Counted(tmpi.MpiGossip):
    """The transport as it is, kept so its counts can be read after the run
    (mpi_gossip_consensus returns the models only)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        made.append(self)


tmpi.MpiGossip = Counted  # mpi_gossip_consensus builds it through the module
g = validate_topology(make_topology("complete", size), size)
x0 = torch.randn(size, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
x0 += torch.arange(size, dtype=torch.float32)[:, None]  # clearly different models
x = mpi_gossip_consensus(g, x0, averages, seed=1, timeout_s=60)
(end,) = made
counts = comm.gather((end.averages, end.refused), root=0)
if rank == 0:
    torch.save({"x0": x0, "x": x, "averages": [a for a, _ in counts],
                "refused": [r for _, r in counts]}, out)
