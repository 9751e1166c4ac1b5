"""Run under mpirun: gossip-only consensus over MPI; rank 0 saves initial and final rows."""

import sys

import torch

from apam_gossip.runtime.mpi import mpi_gossip_consensus
from apam_gossip.topology import make_topology, validate_topology
from apam_gossip.transport.mpi import world

topology, averages, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
_, rank, size = world()
g = validate_topology(make_topology(topology, size), size)
x0 = torch.randn(size, 2000, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
x0 += torch.arange(size, dtype=torch.float32)[:, None]
x = mpi_gossip_consensus(g, x0, averages, seed=1, timeout_s=60)
if rank == 0:
    torch.save({"x0": x0, "x": x}, out)
