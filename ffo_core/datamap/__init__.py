"""The data map: a CVXPY problem compiled once into ``data = M [theta; 1]``
(:mod:`.compile`), and a batch's parameters mapped to problem data and data gradients
back to parameter gradients (:mod:`.param_map`)."""
