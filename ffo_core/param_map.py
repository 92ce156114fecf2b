"""Parameters -> problem data for a batch, and data gradients -> parameter gradients.

The compiled map is ``data = M @ [theta; 1]`` (:mod:`ffo_core.compile`).  In a batch some
parameters are shared by every sample (unbatched) and some are not.  Splitting the columns of
``M`` accordingly,

    data_i = base + M_b @ theta_b[:, i],     base = M_u @ [theta_u; 1]

costs one product with the (usually large) shared part per *call* instead of per sample, and
nothing of size ``n_data x batch`` is ever formed: each sample's data vector is made when it is
needed.  In the backward pass the shared parameters' gradient is the sum over samples, so

    d theta_u = M_u' @ (sum_i d data_i),     d theta_b[:, i] = M_b' @ d data_i.

(For the paper's setup at n = 1000, where Q and G are shared dense parameters and only q is
batched, this turns 8 products with a 3-million-row matrix into one.)
"""
from __future__ import annotations

import numpy as np

from .compile import CompiledProblem


class BoundData:
    """Problem data of one batch: ``data(i)`` per sample, and the adjoint map."""

    def __init__(self, compiled: CompiledProblem, values: list[np.ndarray],
                 batched: list[bool], batch: int) -> None:
        self.compiled, self.batch = compiled, batch
        self.slots_u = [(k, s, v) for k, (s, v, b) in
                        enumerate(zip(compiled.params, values, batched)) if not b]
        self.slots_b = [(k, s, v) for k, (s, v, b) in
                        enumerate(zip(compiled.params, values, batched)) if b]
        M = compiled.M_csc
        cols_u = np.concatenate([np.arange(s.offset, s.offset + s.size)
                                 for _, s, _ in self.slots_u] + [[compiled.const_col]])
        theta_u = np.concatenate([v.reshape(-1) for _, _, v in self.slots_u] + [[1.0]])
        self.M_u = M[:, cols_u.astype(np.int64)]
        self.base = self.M_u @ theta_u
        if self.slots_b:
            cols_b = np.concatenate([np.arange(s.offset, s.offset + s.size)
                                     for _, s, _ in self.slots_b])
            self.M_b = M[:, cols_b].tocsr()
            self.theta_b = np.concatenate([v.reshape(batch, -1) for _, _, v in self.slots_b],
                                          axis=1).T.copy()        # (n_b, batch)
        else:
            self.M_b, self.theta_b = None, None

    def overflowing_samples(self) -> list[int]:
        """Batch indices whose data is not finite (overflow), checked without forming the
        whole batch: the shared part once, the batched part on the rows it touches."""
        if not np.all(np.isfinite(self.base)):
            return list(range(self.batch))
        if self.M_b is None or self.M_b.nnz == 0:
            return []
        rows = np.flatnonzero(np.diff(self.M_b.indptr))
        part = self.base[rows, None] + self.M_b[rows] @ self.theta_b
        return np.flatnonzero(~np.isfinite(part).all(axis=0)).tolist()

    def data(self, i: int) -> np.ndarray:
        """Sample ``i``'s data vector (length ``n_data``), a fresh array."""
        if self.M_b is None or self.M_b.nnz == 0:
            return self.base.copy()
        return self.base + self.M_b @ self.theta_b[:, i]

    def parameter_gradients(self, grads: list) -> list[np.ndarray]:
        """Per parameter (in the compiled order): ``(size,)`` for a shared parameter (summed
        over samples), ``(batch, size)`` for a batched one; flat column-major values.

        ``grads[i]`` is sample ``i``'s :class:`~ffo_core.ffo_backward.DataGradient`.  Its
        parts are added in place into one total (no per-sample concatenation of the data
        vector), and the batched parameters read only the rows of ``M_b`` they touch.
        """
        cp_ = self.compiled
        names = ("P", "q", "A", "b", "G", "h")
        out: list = [None] * len(cp_.params)
        total = np.zeros(cp_.n_data)
        for grad in grads:
            for name, part in zip(names, grad._parts()):
                total[cp_.sections[name]] += part
        grad_u = self.M_u.T @ total
        start = 0
        for k, slot, _ in self.slots_u:
            out[k] = grad_u[start:start + slot.size]
            start += slot.size
        if self.slots_b:
            rows = np.flatnonzero(np.diff(self.M_b.indptr))
            M_rows = self.M_b[rows].T.tocsr()
            pieces = [(cp_.sections[name], names.index(name)) for name in names]
            grad_b = np.empty((len(grads), M_rows.shape[0]))
            for i, grad in enumerate(grads):
                parts = grad._parts()
                d = np.empty(rows.size)
                for sec, j in pieces:
                    inside = (rows >= sec.start) & (rows < sec.stop)
                    d[inside] = parts[j][rows[inside] - sec.start]
                grad_b[i] = M_rows @ d
            start = 0
            for k, slot, _ in self.slots_b:
                out[k] = grad_b[:, start:start + slot.size]
                start += slot.size
        return out


def bind(compiled: CompiledProblem, values: list[np.ndarray], batched: list[bool],
         batch: int) -> BoundData:
    """``values[k]``: flat column-major parameter values, ``(size,)`` if shared or
    ``(batch, size)`` if batched."""
    return BoundData(compiled, values, batched, batch)


__all__ = ["BoundData", "bind"]
