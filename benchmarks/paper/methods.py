"""The differentiable QP layers the paper experiments compare, by name.

Every experiment poses, per batch, a QP in qpth's argument order ::

    minimize 1/2 z'Q z + p'z   subject to   G z <= h,   A z = b        (QPData)

and, for the layers that take a CVXPY problem, the same QP as a DPP problem whose
parameters are filled from those tensors (:class:`CvxpyForm`).  A method turns that into a
function ``solve(qp) -> z`` of shape ``(batch, n)``, differentiable in whatever tensors
require grad.

Names (``--methods``, comma separated):

==================  ===========================================================================
``ffoqp``           ``ffo_core.FFOQPLayer()``: qpth's call, first-order backward, defaults
``ffolayer``        ``ffo_core.FFOLayer(problem, ...)``: cvxpylayers' call, first-order backward
``ffoqp-kkt``       ``FFOQPLayer(backward="kkt")``: our exact implicit differentiation
``ffolayer-kkt``    ``FFOLayer(..., backward="kkt")``
``qpth``            qpth 0.0.18 ``QPFunction(verbose=-1)`` (batched PDIPM, exact KKT backward)
``cvxpylayers``     cvxpylayers ``CvxpyLayer`` with its defaults (SCS + diffcp)
``ffoqp:CONFIG``    ``FFOQPLayer(solver=CONFIG)`` for any backend config string, e.g.
                    ``ffoqp:scs:eps_abs=1e-9``; likewise ``ffoqp-kkt:``, ``ffolayer:``,
                    ``ffolayer-kkt:``
``pdipm``           ``FFOQPLayer(solver="pdipm")``: the batched backends by name (also
``moreau``          ``moreau``); skipped, with the registry's reason, where not installed
==================  ===========================================================================

A method that cannot run here (qpth not importable, a backend not installed) is reported by
:func:`unavailable` with the reason and skipped by the experiments, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class QPData:
    """One batch's QP, qpth's argument order; ``A``/``b`` may be empty tensors (no
    equalities).  Shapes: ``Q (n, n)``, ``p (B, n)``, ``G (m, n)``, ``h (m,)``, ``A (k, n)``,
    ``b (k,)`` (the matrices shared by the batch)."""

    Q: torch.Tensor
    p: torch.Tensor
    G: torch.Tensor
    h: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.Q, self.p, self.G, self.h, self.A, self.b


@dataclass
class CvxpyForm:
    """The QP as a DPP CVXPY problem: ``values(qp)`` gives the tensors of ``params`` (in
    that order) for one batch; ``variable`` is the solution returned."""

    problem: object
    params: list
    variable: object
    values: Callable[[QPData], list[torch.Tensor]]


Solve = Callable[[QPData], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A named layer: ``build(form_factory)`` returns ``solve``; ``form_factory()`` builds the
    CVXPY form only for the methods that need one."""

    name: str
    label: str
    exact: bool  # exact implicit differentiation (the reference curves) or first-order
    build: Callable[[Callable[[], CvxpyForm]], Solve]
    check: Callable[[], str | None]  # None if it can run here, else why not


def _ours_available(solver: str) -> Callable[[], str | None]:
    def check() -> str | None:
        from ffo_core import FFOError, get_backend

        try:
            get_backend(solver)
        except FFOError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    return check


def _ffoqp(solver: str, backward: str) -> Callable[[Callable[[], CvxpyForm]], Solve]:
    def build(form_factory):
        from ffo_core import FFOQPLayer

        layer = FFOQPLayer(solver=solver, backward=backward)
        return lambda qp: layer(*qp.args())

    return build


def _ffolayer(solver: str, backward: str) -> Callable[[Callable[[], CvxpyForm]], Solve]:
    def build(form_factory):
        from ffo_core import FFOLayer

        form = form_factory()
        layer = FFOLayer(
            form.problem, form.params, [form.variable], solver=solver, backward=backward
        )
        return lambda qp: layer(*form.values(qp))[0]

    return build


def _qpth_check() -> str | None:
    try:
        import qpth.qp  # noqa: F401
    except ImportError as exc:
        return (
            f"qpth is not importable ({exc}); build it into a folder on PYTHONPATH as "
            "docs/benchmarks.md (section 'qpth') says"
        )
    return None


def _qpth_build(form_factory) -> Solve:
    from qpth.qp import QPFunction

    return lambda qp: QPFunction(verbose=-1)(*qp.args())


def _cvxpylayers_check() -> str | None:
    try:
        import cvxpylayers.torch  # noqa: F401
    except ImportError as exc:
        return f"cvxpylayers is not importable ({exc}); pip install -e '.[bench]'"
    return None


def _cvxpylayers_build(form_factory) -> Solve:
    from cvxpylayers.torch import CvxpyLayer

    form = form_factory()
    layer = CvxpyLayer(form.problem, parameters=form.params, variables=[form.variable])
    return lambda qp: layer(*form.values(qp))[0]


#: the batched first-party backends, usable by their own name as ``FFOQPLayer(solver=name)``
BATCHED_BACKENDS = ("pdipm", "moreau")

#: what ``--methods`` runs when not given
DEFAULT_METHODS = ("ffoqp", "ffolayer", "ffoqp-kkt", "qpth", "cvxpylayers")

_OURS = {
    "ffoqp": ("FFOQPLayer", "ffo", _ffoqp),
    "ffoqp-kkt": ("FFOQPLayer (exact KKT)", "kkt", _ffoqp),
    "ffolayer": ("FFOLayer", "ffo", _ffolayer),
    "ffolayer-kkt": ("FFOLayer (exact KKT)", "kkt", _ffolayer),
}


def resolve(name: str) -> Method:
    """The :class:`Method` called ``name`` (see the module docstring); ``ValueError`` for an
    unknown name, listing the known ones."""
    name = name.strip()
    if name == "qpth":
        return Method("qpth", "qpth", True, _qpth_build, _qpth_check)
    if name == "cvxpylayers":
        return Method("cvxpylayers", "CvxpyLayer", True, _cvxpylayers_build, _cvxpylayers_check)
    if name in BATCHED_BACKENDS:
        return Method(
            name, f"FFOQPLayer ({name})", False, _ffoqp(name, "ffo"), _ours_available(name)
        )
    base, _, solver = name.partition(":")
    if base in _OURS:
        label, backward, make = _OURS[base]
        solver = solver or "clarabel"
        if solver != "clarabel":
            label = f"{label} [{solver}]"
        return Method(
            name, label, backward == "kkt", make(solver, backward), _ours_available(solver)
        )
    known = ", ".join([*_OURS, "qpth", "cvxpylayers", *BATCHED_BACKENDS])
    raise ValueError(f"unknown method {name!r}; known: {known}, or ffoqp:CONFIG and the like")


def parse_methods(text: str) -> list[Method]:
    """``"ffoqp,qpth"`` -> methods, in order, without repeats."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    return [resolve(m) for m in dict.fromkeys(names)]
