"""The algorithms' rules, each written once, with no processes, transport or clock.

* :mod:`.apam`: the APAM master's rule (:class:`~.apam.ApamCore`): apply a worker's
  gradient with its staleness, lr and buffers; the model a worker is sent.
* :mod:`.gossip`: one gossip worker's local step (:class:`~.gossip.GossipRule`): its lr,
  the BatchNorm buffers' delta, the local AMSGrad/SGD step, the step's staleness.
* :mod:`.sync`: the all-reduce step and the D-PSGD mixing step.
* :mod:`.consensus`: the consensus distance, one definition.

Every runtime drives these: the shared-memory and MPI runtimes (through
:mod:`apam_gossip.algorithms`), the loop API (:mod:`apam_gossip.loop`) and the simulator
(:mod:`apam_gossip.sim`), so a rule changed here changes in all of them.
"""
