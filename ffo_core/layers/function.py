"""The ``torch.autograd.Function`` of the layers, and the checks on what enters it: the
forward runs the layer's solves, the backward its data gradients, both through
:class:`~ffo_core.layers.runtime.SolverLayer`."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidGradientError, InvalidParameterError, SolverError, UnsupportedError
from .tensors import bad_batch_indices


def refuse_transforms(tensors) -> None:
    """Refuse inputs wrapped by a ``torch.func`` transform (vmap, grad, jacrev) before any
    of their values are read (reading them fails with an unrelated error)."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is None:
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and wrapped(t):
            raise UnsupportedError(
                "torch.func transforms (vmap, grad, jacrev, jacfwd) are not supported by "
                "ffo layers; pass a batch as a leading dimension and use loss.backward()"
            )


def dual_array(dual, batch: int) -> np.ndarray:
    """The dual upstream gradients of every sample joined, ``(batch, p + m)``."""
    return np.stack([np.concatenate(dual(i)) for i in range(batch)])


def check_upstream(name: str, grad: torch.Tensor, batched: bool) -> np.ndarray:
    """``grad`` (the gradient flowing into output ``name``) as float64 NumPy, refused with
    :class:`InvalidGradientError` naming the output and batch indices when not finite."""
    values = grad.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(values).all():
        raise InvalidGradientError(
            f"the gradient flowing into the layer's output {name} contains NaN "
            f"or Inf{bad_batch_indices(~torch.isfinite(grad.detach()), batched)}; it "
            "comes from the loss or a later layer, and the layer refuses to "
            "propagate it"
        )
    return values


#: Output dtypes whose range a solution may exceed (float64 solves, narrow outputs).
_NARROW = (torch.float16, torch.bfloat16)


class _LayerFunction(torch.autograd.Function):
    """Forward: the layer's solves; backward: its data gradients, as tensors."""

    @staticmethod
    def forward(layer, problems, *inputs):
        problems.sols = layer.solve_all(problems)
        outputs = layer._outputs(problems, problems.sols)
        for name, out in zip(layer._output_names(problems), outputs):
            if out.dtype in _NARROW and not bool(torch.isfinite(out).all()):
                raise InvalidParameterError(
                    f"output {name}: the solution's values do not fit {out.dtype} (largest "
                    f"finite value {torch.finfo(out.dtype).max:g}); pass float32 or float64 "
                    "inputs"
                )
        return outputs

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.layer, ctx.problems = inputs[0], inputs[1]

    @staticmethod
    def backward(ctx, *grad_outputs):
        layer, problems = ctx.layer, ctx.problems
        needs = ctx.needs_input_grad[2:]
        if not any(needs):
            return (None, None) + (None,) * len(needs)
        if torch.is_grad_enabled():
            raise UnsupportedError(
                "the layer's backward cannot be differentiated again (create_graph=True: a "
                "gradient penalty, a Hessian-vector product): its gradient is a finite "
                "difference of solutions, not a differentiable function; call backward "
                "without create_graph, or detach what goes into the penalty"
            )
        c, c_dual = layer._upstream(problems, grad_outputs)
        grads = layer.data_gradients(problems, problems.sols, c, c_dual)
        out = layer._input_gradients(problems, grads, needs)
        names = layer._input_names(problems)
        for name, value in zip(names, out):
            if value is None:
                continue
            data = value._values() if value.layout == torch.sparse_coo else value
            if value.layout in (torch.sparse_csr, torch.sparse_csc):
                data = value.values()
            if not bool(torch.isfinite(data).all()):
                kind = str(value.dtype).removeprefix("torch.")
                raise SolverError(
                    f"the gradient of {name} overflows (Inf or NaN) in {kind}: the data's "
                    f"magnitudes are too large for {kind} arithmetic",
                    backend=layer.backend.name,
                )
        return (None, None) + tuple(out)

    @staticmethod
    def vmap(info, in_dims, *args):
        raise UnsupportedError(
            "torch.func transforms that batch a call (vmap, jacrev, jacfwd) are not "
            "supported by ffo layers; pass the batch as a leading dimension instead"
        )


__all__ = ["check_upstream", "dual_array", "refuse_transforms"]
