"""What the runtime does when a sample's first-order gradient fails or looks wrong: the
``ghost_fallback`` policies and the gradient health check (``check_every``), as a mixin of
:class:`~ffo_core.layers.runtime.SolverLayer` (it reads the layer's options and keeps its
``health_log``)."""

from __future__ import annotations

import logging
import warnings
from collections import deque
from dataclasses import replace
from typing import Any

import numpy as np

from ..engine.data_gradient import DataGradient
from ..engine.ffo_backward import FFOOptions, ffo_backward
from ..engine.kkt_backward import kkt_backward
from ..engine.schedule import FFOSample
from ..errors import GhostProblemError, GradientHealthWarning, SolverError
from .function import dual_array

logger = logging.getLogger("ffo_core")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b / (na * nb))


def _short(exc: SolverError) -> str:
    """A failure in a few words (the status), for lists of retries."""
    return f"status {exc.status.value}" if exc.status is not None else str(exc)[:200]


class FailurePolicies:
    """The fallback policy and the health check of a layer (attributes set by
    :class:`~ffo_core.layers.runtime.SolverLayer`: ``backend``, ``options``,
    ``ghost_fallback``, ``check_threshold``, ``check_rel_tol``, ``health_log``)."""

    backend: Any
    options: FFOOptions
    ghost_fallback: str
    check_threshold: float
    check_rel_tol: float | None
    health_log: deque

    def _parameter_vector(self, problems, data_gradient: np.ndarray) -> np.ndarray:
        return data_gradient

    def _finite(self, i: int, grad: DataGradient) -> DataGradient | GhostProblemError:
        """``grad``, or the error that says it is not finite (a ghost solution too far
        from the forward one for its delta), for the ``ghost_fallback`` policy."""
        if grad.is_finite():
            return grad
        delta = grad.diagnostics["delta"]
        exc = GhostProblemError(
            f"the first-order gradient is not finite (the ghost solution is too far from "
            f"the forward one for this delta) (delta={delta:.3g})",
            batch_index=i,
            backend=self.backend.name,
        )
        exc.delta = delta
        return exc

    def _ffo_once(self, i: int, s: FFOSample, options: FFOOptions) -> DataGradient:
        grad = self._finite(
            i,
            ffo_backward(
                s.backend, s.g, s.h, s.e, s.sol, s.c, options, source=s.source, c_dual=s.c_dual
            ),
        )
        if isinstance(grad, GhostProblemError):
            raise grad
        return grad

    def _ffo_fallback(self, i: int, s: FFOSample, first: GhostProblemError) -> DataGradient:
        """Sample ``i`` (``s``) after its ghost failed with ``first``: the
        ``ghost_fallback`` policy."""
        if self.ghost_fallback == "raise":
            raise first
        tried = [f"delta chosen by default: {first}"]
        last: SolverError = first
        if self.ghost_fallback.startswith("smaller-delta") and first.delta is not None:
            for k in (1, 2):  # from the step that failed (it may have been shrunk)
                delta = first.delta / 10.0**k
                try:
                    grad = self._ffo_once(i, s, replace(self.options, delta=delta))
                except GhostProblemError as exc:
                    tried.append(f"delta={delta:.3g}: {_short(exc)}")
                    last = exc
                    continue
                grad.diagnostics.update(
                    ghost_fallback="smaller-delta", fallback_delta=delta, ghost_error=str(first)
                )
                logger.info(
                    "batch index %d: ghost problem failed (%s); smaller delta %.3g succeeded",
                    i, first, delta,
                )  # fmt: skip
                return grad
        if self.ghost_fallback.endswith("kkt"):
            try:
                grad = kkt_backward(s.g, s.h, s.e, s.sol, s.c, self.options, c_dual=s.c_dual)
            except SolverError as exc:
                tried.append(f"KKT fallback: {exc}")
                raise self._fallbacks_failed(i, tried, first.status) from exc
            grad.diagnostics.update(ghost_fallback="kkt", ghost_error=str(first))
            logger.info(
                "batch index %d: ghost problem failed (%s); used the KKT gradient", i, first
            )
            return grad
        raise self._fallbacks_failed(i, tried, last.status) from last

    def _fallbacks_failed(self, i: int, tried: list[str], status) -> GhostProblemError:
        """The error of sample ``i`` when its ghost and every fallback in ``tried`` failed."""
        return GhostProblemError(
            f"batch index {i}: the ghost problem failed and so did every fallback "
            f"({'; '.join(tried)})",
            status=status,
            batch_index=i,
            backend=self.backend.name,
        )

    def _health_check(self, call: int, problems, sols, c, dual, grads) -> None:
        """Compare one sample's first-order data gradient with the exact KKT one."""
        live = np.any(c != 0, axis=1)
        if dual(0) is not None:
            live |= np.any(dual_array(dual, problems.batch) != 0, axis=1)
        nonzero = np.flatnonzero(live)
        i = int(nonzero[0]) if nonzero.size else 0
        record: dict[str, Any] = {
            "call": call,
            "sample": i,
            "ghost_fallback": grads[i].diagnostics.get("ghost_fallback"),
        }
        g, h, e = problems.sample(i)
        try:
            ref = kkt_backward(g, h, e, sols[i], c[i], self.options, c_dual=dual(i)).vector()
        except SolverError as exc:
            record.update(cosine=None, cosine_params=None, rel_err=None, error=str(exc))
            self.health_log.append(record)
            logger.warning(
                "gradient health check, backward call %d: no KKT reference for "
                "batch index %d (%s)",
                call, i, exc,
            )  # fmt: skip
            return
        mine = grads[i].vector()
        cos = _cosine(mine, ref)
        cos_params = _cosine(
            self._parameter_vector(problems, mine), self._parameter_vector(problems, ref)
        )
        norm = float(np.linalg.norm(ref))
        rel = float(np.linalg.norm(mine - ref) / norm) if norm > 0 else float(np.linalg.norm(mine))
        record.update(cosine=cos, cosine_params=cos_params, rel_err=rel)
        self.health_log.append(record)
        problems_found = []
        if cos < self.check_threshold:
            problems_found.append(
                f"cosine similarity {cos:.6f} is below check_threshold={self.check_threshold}"
            )
        if self.check_rel_tol is not None and rel > self.check_rel_tol:
            problems_found.append(
                f"relative error {rel:.2e} is above check_rel_tol={self.check_rel_tol}"
            )
        if problems_found:
            message = (
                f"gradient health check, backward call {call}, batch index {i}: "
                f"first-order vs KKT gradient: {' and '.join(problems_found)} (cosine "
                f"{cos:.6f}, relative error {rel:.2e}); consider tighter solver "
                "tolerances, central=True, a smaller kappa, or backward='kkt'"
            )
            logger.warning(message)
            warnings.warn(message, GradientHealthWarning, stacklevel=2)
        else:
            logger.info(
                "gradient health check, backward call %d, batch index %d: cosine "
                "%.6f (params %.6f), relative error %.2e",
                call, i, cos, cos_params, rel,
            )  # fmt: skip


__all__ = ["FailurePolicies"]
