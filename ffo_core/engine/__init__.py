"""The engine: what happens to one batch of problems between the data map and the layers.

* :mod:`.ffo_backward` -- the fully first-order backward of one sample (read it first);
* :mod:`.active_set` -- which rows and cone blocks are active at a solution;
* :mod:`.kkt_backward`, :mod:`.kkt_cones` -- the exact reference (implicit
  differentiation of the KKT conditions; it factorises, the first-order path never does);
* :mod:`.solves` -- guarded solves: every way a solve fails becomes a typed error.

Nothing here imports torch or a solver package.
"""
