"""The runtimes: where a run's processes come from and how the algorithms are driven.

* :mod:`.shm`: one machine, real processes over shared memory; each mode is a
  :class:`~apam_gossip.coordinator.Mode` run by the :class:`~apam_gossip.coordinator.
  Coordinator` (its children's messages, the deadline, stop requests);
* :mod:`.mpi`: under ``mpirun``, every rank runs the same algorithms over MPI;
* :mod:`.sequential`: the one-process reference run.

:func:`apam_gossip.run` picks one (:mod:`apam_gossip.runner`); the loop API
(:mod:`apam_gossip.loop`) and the simulator (:mod:`apam_gossip.sim`) are the other two
drivers of the same algorithm cores (:mod:`apam_gossip.core`).
"""
