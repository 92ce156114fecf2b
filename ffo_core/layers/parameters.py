"""The parameter tensors of an :class:`~ffo_core.FFOLayer` call, checked before anything is
solved: types, devices, shapes, finiteness, batch sizes and the values a parameter's
declared CVXPY attributes allow (``nonneg=True``, ``bounds=...``, ``PSD=True``: the
symmetric matrix of the upper triangle has no eigenvalue below ``-1e-8 max(1, |S|)``,
``diag=True`` / ``sparsity=...``: zeros off the pattern).  ``symmetric=True`` is not
checked: the layer reads the upper triangle, as cvxpylayers does.  Every refusal is an
:class:`~ffo_core.errors.InvalidParameterError` naming the parameter."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..datamap.compile import Slot
from ..errors import InvalidParameterError
from .tensors import bad_batch_indices, check_finite


@dataclass
class CallInfo:
    size: int
    batched: list[bool]
    any_batched: bool
    dtype: torch.dtype  # dtype of the outputs
    device: torch.device
    param_dtypes: list[torch.dtype]


@dataclass(frozen=True)
class ValueRule:
    """A declared CVXPY attribute that constrains a parameter's values (``nonneg=True``...).

    Plain data (the layer stays picklable); :meth:`bad` marks the entries of a tensor
    (batched or not) that violate it.
    """

    kind: str  # nonneg, pos, nonpos, neg, boolean, integer, bounds, PSD, NSD, pattern
    text: str  # e.g. "nonneg=True (values >= 0)"
    mask: np.ndarray | None = None  # boolean/integer: the constrained entries; pattern: off it
    lo: np.ndarray | None = None  # bounds
    hi: np.ndarray | None = None

    def bad(self, t: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind == "nonneg":
            return t < 0
        if kind == "pos":
            return t <= 0
        if kind == "nonpos":
            return t > 0
        if kind == "neg":
            return t >= 0
        if kind in ("boolean", "integer"):
            wrong = (t != 0) & (t != 1) if kind == "boolean" else t != torch.round(t)
            return wrong & torch.as_tensor(self.mask, device=t.device)
        if kind == "pattern":  # diag / sparsity: entries off the pattern must be zero
            return (t != 0) & torch.as_tensor(self.mask, device=t.device)
        if kind in ("PSD", "NSD"):
            return _definite_violations(t, kind == "PSD")
        out = torch.zeros(t.shape, dtype=torch.bool, device=t.device)  # bounds
        if self.lo is not None:
            out |= t < torch.as_tensor(self.lo, device=t.device)
        if self.hi is not None:
            out |= t > torch.as_tensor(self.hi, device=t.device)
        return out


#: Relative tolerance of the PSD/NSD value check (CVXPY refuses such values outright).
DEFINITE_TOL = 1e-8


def _definite_violations(t: torch.Tensor, psd: bool) -> torch.Tensor:
    """Every entry of the matrices (last two axes of ``t``) whose upper triangle is not a
    positive (``psd``) or negative semidefinite matrix, within :data:`DEFINITE_TOL`."""
    upper = torch.triu(t.to(torch.float64))
    sym = upper + torch.triu(upper, 1).transpose(-1, -2)
    eig = torch.linalg.eigvalsh(sym)
    scale = eig.abs().amax(dim=-1).clamp(min=1.0)
    worst = eig[..., 0] if psd else -eig[..., -1]
    bad = worst < -DEFINITE_TOL * scale
    return bad[..., None, None].expand(t.shape)


_SIGNS = {"nonneg": ">= 0", "pos": "> 0", "nonpos": "<= 0", "neg": "< 0"}


def _index_mask(shape: tuple[int, ...], idx) -> np.ndarray:
    """Boolean mask of the entries CVXPY's ``boolean_idx``/``integer_idx`` name."""
    if shape == ():
        return np.array(True)
    mask = np.zeros(shape, dtype=bool)
    if isinstance(idx, list):
        for ix in idx:
            mask[tuple(ix) if isinstance(ix, (tuple, list)) else ix] = True
    else:
        mask[idx] = True
    return mask


def value_rules(param) -> list[ValueRule]:
    """The value constraints a ``cp.Parameter``'s declared attributes impose (a geometric
    program's parameter that enters as its logarithm is declared ``pos=True``: CVXPY's DGP
    rules require it)."""
    attrs = getattr(param, "attributes", {}) or {}
    rules = [
        ValueRule(attr, f"{attr}=True (values {text})")
        for attr, text in _SIGNS.items()
        if attrs.get(attr)
    ]
    shape = tuple(param.shape)
    for attr in ("PSD", "NSD"):
        if attrs.get(attr):
            kind = "positive" if attr == "PSD" else "negative"
            rules.append(
                ValueRule(
                    attr,
                    f"{attr}=True (the symmetric matrix of its upper triangle must be "
                    f"{kind} semidefinite)",
                )
            )
    if attrs.get("diag") or getattr(param, "sparse_idx", None) is not None:
        off = np.ones(shape, dtype=bool)
        if attrs.get("diag"):
            off[np.diag_indices(shape[0])] = False
            text = "diag=True (entries off the diagonal must be 0)"
        else:
            off[param.sparse_idx] = False
            text = "sparsity (entries off the declared pattern must be 0)"
        rules.append(ValueRule("pattern", text, mask=off))
    for attr, text in (("boolean", "values 0 or 1"), ("integer", "integer values")):
        if attrs.get(attr):
            mask = _index_mask(shape, getattr(param, f"{attr}_idx", None))
            rules.append(ValueRule(attr, f"{attr} ({text})", mask=mask))
    bounds = attrs.get("bounds")
    if bounds is not None:
        lo, hi = (None if b is None else np.asarray(b, dtype=float) for b in bounds)
        rules.append(
            ValueRule("bounds", "bounds (values within the declared bounds)", lo=lo, hi=hi)
        )
    return rules


def inspect_params(
    slots: list[Slot], tensors, rules: list[list[ValueRule]] | None = None
) -> CallInfo:
    """Validate types, devices, shapes, finiteness, declared attributes and batch sizes
    before anything is solved; every error names the parameter.

    dtype policy: floating (float16/bfloat16/float32/float64) and int32/int64 tensors are
    accepted and solved in float64; the outputs take torch's promotion of the floating
    inputs' dtypes (float32 with float64 -> float64; float64 when none is floating); each
    parameter's gradient takes that parameter's own dtype.  Complex, bool and other integer
    dtypes are refused.  Device policy: all parameters on one device; data is copied to the
    CPU for the solver and outputs/gradients are returned on that device; the ``meta``
    device (no data) is refused.
    """
    if len(tensors) != len(slots):
        raise InvalidParameterError(
            f"A tensor must be provided for each CVXPY parameter: the layer takes "
            f"{len(slots)} parameter tensors ({', '.join(s.name for s in slots)}), "
            f"got {len(tensors)}"
        )
    for slot, t in zip(slots, tensors):
        if not isinstance(t, torch.Tensor):
            raise InvalidParameterError(
                f"parameter {slot.name}: expected a torch.Tensor, got {type(t).__name__}"
            )
        if t.layout != torch.strided:
            raise InvalidParameterError(
                f"parameter {slot.name}: {t.layout} tensors are not "
                "supported by FFOLayer; pass a dense tensor "
                "(.to_dense()) or use FFOQPLayer for sparse data"
            )
        if t.is_complex():
            raise InvalidParameterError(
                f"parameter {slot.name}: dtype {t.dtype} is complex; the layer is real "
                "(pass the real and imaginary parts as two real parameters)"
            )
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise InvalidParameterError(
                f"parameter {slot.name}: dtype {t.dtype} is not a real number type"
            )
        if t.device.type == "meta":
            raise InvalidParameterError(
                f"parameter {slot.name} is on the meta device and has no values to solve with"
            )
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        where = ", ".join(f"{s.name}: {t.device}" for s, t in zip(slots, tensors))
        raise InvalidParameterError(
            f"parameters are on different devices ({where}); move them to one device"
        )
    sizes, batched = {}, []
    for k, (slot, t) in enumerate(zip(slots, tensors)):
        shape = tuple(t.shape)
        if shape == slot.shape:
            batched.append(False)
        elif len(shape) == len(slot.shape) + 1 and shape[1:] == slot.shape:
            batched.append(True)
            sizes[slot.name] = shape[0]
        else:
            what = (
                "shape"
                if len(shape) in (len(slot.shape), len(slot.shape) + 1)
                else ("dimensionality")
            )
            raise InvalidParameterError(
                f"Invalid parameter {what}: parameter {slot.name}: expected shape "
                f"{slot.shape} or (batch, {', '.join(map(str, slot.shape))}), got {shape}"
            )
        values = t.detach()
        check_finite(slot.name, values, batched[-1])  # one pass, no mask when finite
        for rule in rules[k] if rules else ():
            bad = rule.bad(values)
            if bool(bad.any()):
                first = values[bad].flatten()[0].item()
                raise InvalidParameterError(
                    f"parameter {slot.name} violates its declared attribute {rule.text}"
                    f"{bad_batch_indices(bad, batched[-1])} (e.g. {first:g})"
                )
    if len(set(sizes.values())) > 1:
        raise InvalidParameterError(
            f"Inconsistent batch sizes: the batched parameters have inconsistent batch "
            f"sizes {sizes}"
        )
    batch = next(iter(sizes.values()), 1)
    if batch == 0:
        raise InvalidParameterError("batch size is 0")
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    dtype = functools.reduce(torch.promote_types, floats) if floats else torch.float64
    return CallInfo(
        batch,
        batched,
        bool(sizes),
        dtype,
        devices.pop() if devices else torch.device("cpu"),
        [t.dtype for t in tensors],
    )
