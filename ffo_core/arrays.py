"""Small NumPy checks shared by the data map, the engine and the layers."""

from __future__ import annotations

import numpy as np

#: Up to this many entries :func:`all_finite` tests them all at once (a mask; the
#: errstate a sum needs costs more on small arrays), beyond it their sum first.
_MASK_MAX = 1 << 16


def all_finite(a: np.ndarray) -> bool:
    """No NaN or Inf in ``a``: for a large array its sum first (one pass, no mask; a NaN
    or Inf makes it non-finite), the entries one by one only when the sum is not finite
    (it may just have overflowed)."""
    if a.size <= _MASK_MAX:
        return bool(np.isfinite(a).all())
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(a.sum()):
            return True
    return bool(np.all(np.isfinite(a)))
