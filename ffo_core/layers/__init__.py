"""The PyTorch layers: :class:`FFOLayer` (a CVXPY problem) and :class:`FFOQPLayer` (a QP
given as matrices), and the tensor checks they share (:mod:`.tensors`)."""
