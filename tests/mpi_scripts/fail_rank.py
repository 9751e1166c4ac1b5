"""Run under mpirun: rank 1 is given a data folder that does not exist; the job must end
with a non-zero exit code and rank 1's error, not hang."""

import sys

from apam_gossip.cli import main
from apam_gossip.transport.mpi import world

_, rank, _ = world()
args = ["train", "--mode", sys.argv[1], "--steps", "200", "-o", sys.argv[2], "-q"]
if rank == 1:
    args += ["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fmnist"]
sys.exit(main(args))
