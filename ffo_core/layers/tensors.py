"""Torch-side helpers shared by the layers: validating parameter tensors, and sparse tensors
as SciPy CSC (and gradients back onto their pattern) without a dense copy.

Validation (:func:`check_real`, :func:`check_finite`, :func:`result_dtype`,
:func:`common_device`) is what every layer applies to its input tensors before anything is
solved; errors are :class:`~ffo_core.errors.InvalidParameterError` naming the argument.
:func:`all_finite` is the NumPy check behind it, also used on mapped data and gradients.

Sparse tensors (:class:`SparseEntries`, :func:`entries_to_csc`): a torch COO, CSR or CSC
tensor, 2-D or batched 3-D, is read as its list of stored entries ``(batch, row, col,
value)`` in the order of its value array; :func:`entries_to_csc` turns one sample's entries
into a canonical CSC matrix (duplicates summed, explicit zeros *kept*: an entry the user
stored is a coordinate that receives a gradient even when its value is 0) together with the
storage position of every entry, so a gradient aligned with the CSC's ``.data`` maps back
to the entries with one gather, and :meth:`SparseEntries.like` rebuilds a tensor of the same
layout and pattern from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..arrays import all_finite
from ..errors import InvalidParameterError

SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)


def is_sparse(t: torch.Tensor) -> bool:
    """True for a torch sparse COO, CSR or CSC tensor."""
    return t.layout in SPARSE_LAYOUTS


def check_real(name: str, t, what: str = "parameter") -> None:
    """``t`` must be a tensor of a real number type (floating point or int32/int64)."""
    if not isinstance(t, torch.Tensor):
        raise InvalidParameterError(
            f"{what} {name}: expected a torch.Tensor, got {type(t).__name__}"
        )
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise InvalidParameterError(f"{what} {name}: dtype {t.dtype} is not a real number type")


def _stored_values(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored values of ``t`` (all of ``t`` when dense) and, for a batched sparse tensor,
    the batch index of each value; no dense copy of a sparse tensor."""
    if t.layout == torch.sparse_coo:
        values = t._values()
        batch = t._indices()[0] if t.dim() == 3 else None
        return values, batch
    if t.layout in (torch.sparse_csr, torch.sparse_csc):
        values = t.values()
        if t.dim() == 3:
            batch = torch.arange(values.shape[0], device=values.device)
            return values.reshape(-1), batch.repeat_interleave(values.shape[1])
        return values, None
    return t, None


def at_batch_indices(bad: Sequence[int]) -> str:
    """`` at batch index [i, ...]`` naming the first five of ``bad`` (and saying when there
    are more): how every input check names the samples it refuses."""
    return f" at batch index {list(bad[:5])}" + (" (and more)" if len(bad) > 5 else "")


def bad_batch_indices(mask: torch.Tensor, batched: bool) -> str:
    """:func:`at_batch_indices` for the samples (leading dimension) of a batched tensor
    with a marked entry in ``mask``; ``""`` when the tensor is not batched."""
    if not batched:
        return ""
    return at_batch_indices(mask.reshape(mask.shape[0], -1).any(dim=1).nonzero().flatten().tolist())


def check_finite(name: str, t: torch.Tensor, batched: bool, what: str = "parameter") -> None:
    """Raise naming ``name`` (and the first bad batch indices) if ``t`` has NaN or Inf."""
    values, batch = _stored_values(t.detach())
    if not values.is_floating_point() or values.numel() == 0:
        return
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        if all_finite(values.numpy()):  # far cheaper than the torch ops below
            return
    else:
        low, high = torch.aminmax(values)  # one pass, no mask; NaN propagates
        if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
            return
    finite = torch.isfinite(values)
    if batched and batch is not None:  # sparse: the stored entries' batch indices
        where = at_batch_indices(torch.unique(batch[~finite]).tolist())
    else:
        where = bad_batch_indices(~finite, batched)
    raise InvalidParameterError(f"{what} {name} contains NaN or Inf{where}")


def result_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """Output dtype: float64 if any input is float64 or none is floating, else the first
    floating input's dtype (float32 in, float32 out)."""
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return torch.float64 if torch.float64 in floats or not floats else floats[0]


def common_device(tensors: Sequence[torch.Tensor], what: str = "parameters") -> torch.device:
    """The one device all ``tensors`` are on (CPU if there are none)."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise InvalidParameterError(f"{what} are on different devices: {devices}")
    return devices.pop() if devices else torch.device("cpu")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A dense tensor as a float64 NumPy array on the CPU (no copy when already one)."""
    return t.detach().to("cpu", torch.float64).numpy()


# -- sparse tensors ------------------------------------------------------------------------
@dataclass
class SparseEntries:
    """The stored entries of a 2-D or batched 3-D torch sparse tensor, in value order.

    ``rows``, ``cols``, ``values`` (float64) have one element per stored value;
    ``offsets[i]:offsets[i + 1]`` are the entries of sample ``i`` (one sample when 2-D).
    A COO tensor is coalesced first (so a gradient has no duplicate entries).
    """

    tensor: torch.Tensor  # the (coalesced) tensor whose pattern gradients follow
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of(cls, t: torch.Tensor, name: str = "tensor") -> SparseEntries:
        t = t.detach()
        if t.dim() not in (2, 3):
            raise InvalidParameterError(
                f"{name}: a sparse tensor must be 2-D or batched 3-D, got {t.dim()}-D"
            )
        if t.layout == torch.sparse_coo:
            if t.dense_dim() != 0:
                raise InvalidParameterError(
                    f"{name}: hybrid sparse COO tensors (with dense dimensions) are not supported"
                )
            t = t if t.is_coalesced() else t.coalesce()
            idx = t.indices().cpu().numpy()
            values = to_numpy(t.values())
            batch = idx[0] if t.dim() == 3 else None
            rows, cols = idx[-2], idx[-1]
        elif t.layout in (torch.sparse_csr, torch.sparse_csc):
            if t.values().dim() != t.dim() - 1:
                raise InvalidParameterError(
                    f"{name}: sparse tensors with dense value blocks are not supported"
                )
            csr = t.layout == torch.sparse_csr
            compressed = (t.crow_indices() if csr else t.ccol_indices()).cpu().numpy()
            plain = (t.col_indices() if csr else t.row_indices()).cpu().numpy()
            compressed = compressed.reshape(-1, compressed.shape[-1])
            plain = plain.reshape(compressed.shape[0], -1)
            major = (
                np.concatenate(
                    [np.repeat(np.arange(c.shape[0] - 1), np.diff(c)) for c in compressed]
                )
                if plain.size
                else np.zeros(0, dtype=np.int64)
            )
            minor = plain.reshape(-1)
            rows, cols = (major, minor) if csr else (minor, major)
            values = to_numpy(t.values()).reshape(-1)
            batch = (
                np.repeat(np.arange(compressed.shape[0]), plain.shape[1]) if t.dim() == 3 else None
            )
        else:
            raise InvalidParameterError(f"{name}: layout {t.layout} is not supported")
        samples = t.shape[0] if t.dim() == 3 else 1
        offsets = (
            np.searchsorted(batch, np.arange(samples + 1))
            if batch is not None
            else np.array([0, values.shape[0]])
        )
        return cls(t, rows.astype(np.int64), cols.astype(np.int64), values, offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, cols, values)`` of sample ``i``."""
        s = slice(self.offsets[i], self.offsets[i + 1])
        return self.rows[s], self.cols[s], self.values[s]

    def like(self, values: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor on the same pattern holding ``values`` (one per stored entry).

        COO and CSR give back their own layout; a CSC tensor's gradient is returned as COO
        on the same pattern (autograd cannot accumulate a CSC gradient into a CSC leaf).
        The indices are the input's own (valid by construction), so torch's invariant
        checks are off, explicitly (torch warns when they are off implicitly).
        """
        t = self.tensor
        v = torch.as_tensor(values, dtype=dtype, device=device)
        if t.layout == torch.sparse_coo:
            return torch.sparse_coo_tensor(
                t.indices().to(device), v, t.shape, is_coalesced=True, check_invariants=False
            )
        if t.layout == torch.sparse_csr:
            return torch.sparse_csr_tensor(
                t.crow_indices().to(device),
                t.col_indices().to(device),
                v.reshape(t.values().shape),
                t.shape,
                check_invariants=False,
            )
        idx = [torch.as_tensor(self.rows), torch.as_tensor(self.cols)]
        if t.dim() == 3:
            counts = torch.as_tensor(np.diff(self.offsets))
            idx.insert(0, torch.arange(t.shape[0]).repeat_interleave(counts))
        return torch.sparse_coo_tensor(
            torch.stack(idx).to(device), v, t.shape, check_invariants=False
        ).coalesce()


def entries_to_csc(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]
) -> tuple[sp.csc_matrix, np.ndarray]:
    """Canonical CSC matrix of the entries (duplicates summed, explicit zeros kept) and the
    storage position in it of every entry, so ``M.data[positions]`` reads them back."""
    m, n = shape
    keys = np.asarray(cols, dtype=np.int64) * m + np.asarray(rows, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    first = np.ones(sorted_keys.shape[0], dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    unique = sorted_keys[first]
    positions = np.empty(keys.shape[0], dtype=np.int64)
    positions[order] = np.cumsum(first) - 1
    data = (
        np.bincount(positions, weights=values, minlength=unique.shape[0])
        if keys.size
        else np.zeros(0)
    )
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(unique // m, minlength=n), out=indptr[1:])
    M = sp.csc_matrix((data, (unique % m).astype(np.int32), indptr), shape=(m, n))
    return M, positions


def dense_to_csc(t: torch.Tensor) -> sp.csc_matrix:
    """CSC matrix of the nonzero entries of a dense 2-D tensor (its zeros are not stored),
    read in column-major order so no sort is needed and no float64 copy of ``t`` is made."""
    t = t.detach()
    m, n = t.shape
    idx = t.mT.nonzero()  # (k, 2): column, row; column-major order
    cols, rows = idx[:, 0], idx[:, 1]
    data = to_numpy(t[rows, cols])
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(cols.cpu().numpy(), minlength=n), out=indptr[1:])
    return sp.csc_matrix((data, rows.cpu().numpy().astype(np.int32), indptr), shape=(m, n))


__all__ = [
    "SPARSE_LAYOUTS",
    "SparseEntries",
    "check_finite",
    "check_real",
    "common_device",
    "dense_to_csc",
    "entries_to_csc",
    "is_sparse",
    "result_dtype",
    "to_numpy",
]
