"""A small base class that adapters may derive from (they need not: the protocol is duck-typed).

Size: the base class and the helpers every adapter shares (settings checks, interruption of
native solves, console silencing, the scaling note, the PSD factor, the QP epigraph); each
is short, and adapters, first- and third-party, import them from this one place.

It gives an adapter the registry-facing class methods (``availability``, ``version``), keeps
the config-string settings, validates them against the names the adapter declares (their
values with :func:`check_number`), pickles and copies without its per-process state
(``_transient``), so that each adapter only writes its conversions, its status map and its
``solve``.  Helpers for adapters: :func:`native_solve` (Ctrl-C around a solver that installs
its own SIGINT handler), :func:`scaling_note` (say when data is too badly scaled for a
verdict of infeasible/unbounded to be trusted) and :func:`kkt_residual`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import importlib.metadata
import importlib.util
import itertools
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import numpy as np

from .config import bare_token_error
from .errors import ConfigError, SolverError
from .protocol import Capabilities, ConeConstraints, Equalities, Objective
from .sparse_ops import prune, stack_rows, upper_triangle  # noqa: F401  (re-exported: adapters import them from here)


def linear_cost(g: Objective, extra_linear_term, backend: str) -> np.ndarray:
    """``q + extra_linear_term`` (a fresh float array) for a backend without a quadratic
    objective; a nonzero ``P`` is refused with :class:`SolverError` (the engine compiles
    ``1/2 y'Py`` into a second-order cone for such backends, so one means a caller bug)."""
    if g.is_quadratic:
        raise SolverError(
            f"{backend} has no quadratic objective (Capabilities.quadratic_objective="
            "False): the engine compiles 1/2 y'Py into a second-order cone for it; this "
            "solve was given a nonzero P",
            backend=backend,
        )
    c = np.array(g.q, dtype=float)
    return c if extra_linear_term is None else c + extra_linear_term


def data_digest(arrays) -> bytes:
    """A 16-byte hash of arrays' dtypes, shapes and bytes: the key of a structure cache
    (adapters confirm a hit with :func:`same_sparse`, so a collision is never a wrong
    answer)."""
    digest = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return digest.digest()


def same_sparse(X, Y) -> bool:
    """True when two compressed sparse matrices are identical (pattern and values)."""
    return (
        X.shape == Y.shape
        and np.array_equal(X.indptr, Y.indptr)
        and np.array_equal(X.indices, Y.indices)
        and np.array_equal(X.data, Y.data)
    )


def kkt_residual(g: Objective, h: ConeConstraints, e: Equalities, y, nu, lam, s) -> float:
    """Relative primal, stationarity and complementarity residual of a point, in protocol
    terms: what an adapter can report as ``SolveInfo.accuracy`` when its solver's own
    figures are not in the protocol's units (checks the nonnegative block's sign only)."""
    Py = g.P @ y if g.P is not None else np.zeros_like(y)
    grad = Py + g.q + e.A.T @ nu + h.G.T @ lam
    scale = max(
        1.0, float(np.max(np.abs(g.q), initial=0.0)), float(np.max(np.abs(Py), initial=0.0))
    )
    stat = float(np.max(np.abs(grad), initial=0.0)) / scale
    bscale = max(
        1.0, float(np.max(np.abs(e.b), initial=0.0)), float(np.max(np.abs(h.h), initial=0.0))
    )
    prim = float(np.max(np.abs(e.A @ y - e.b), initial=0.0))
    if h.dims.nonneg:
        prim = max(prim, float(np.max(-s[: h.dims.nonneg], initial=0.0)))
    obj = abs(float(0.5 * y @ Py + g.q @ y))
    comp = abs(float(s @ lam)) / max(1.0, obj)
    return max(stat, prim / bscale, comp)


# -- settings validated by value ----------------------------------------------------------
def check_number(
    backend: str,
    key: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: float | None = 0.0,
    positive: bool = False,
    allow_inf: bool = False,
) -> None:
    """Raise :class:`ConfigError` naming setting ``key`` unless ``value`` is a number of the
    kind a solver takes: an int (``integer``) or a real (ints accepted), never a bool or a
    string, not NaN, finite unless ``allow_inf`` (``+inf`` only), ``>= minimum`` (``>`` with
    ``positive``).  Adapters call it from ``__init__`` so that ``"scs:eps_abs=abc"`` or
    ``"clarabel:max_iter=-5"`` fails when the backend is made, not at its first solve."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{backend} setting {key}={value!r}: must be {kind}")
    if not integer:
        value = float(value)
        if math.isnan(value):
            raise ConfigError(f"{backend} setting {key}={value!r}: must be a number, not NaN")
        if math.isinf(value) and not (allow_inf and value > 0):
            raise ConfigError(f"{backend} setting {key}={value!r}: must be finite")
    if minimum is not None and (value < minimum or (positive and value <= minimum)):
        bound = f"> {minimum:g}" if positive else f">= {minimum:g}"
        raise ConfigError(f"{backend} setting {key}={value!r}: must be {bound}")


def check_bool(backend: str, key: str, value: Any) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``value`` is a bool (``true``/``false``
    in a config string)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{backend} setting {key}={value!r}: must be true or false")


# -- Ctrl-C around native solves ----------------------------------------------------------
#: Bytes enough for the C library's ``struct sigaction`` (152 on Linux x86-64, 16 on macOS):
#: it is saved and written back as an opaque buffer, never interpreted.
_SIGACTION_BYTES = 1024


class _SigintDisposition:
    """The process's SIGINT disposition as the C library holds it (POSIX ``sigaction``)."""

    def __init__(self) -> None:
        self._call = None
        if os.name != "posix":
            return
        try:
            call = ctypes.CDLL(None, use_errno=True).sigaction
        except (OSError, AttributeError):
            return
        call.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        call.restype = ctypes.c_int
        self._call = call

    def read(self):
        if self._call is None:
            return None
        buf = ctypes.create_string_buffer(_SIGACTION_BYTES)
        return buf if self._call(int(signal.SIGINT), None, buf) == 0 else None

    def write(self, buf) -> None:
        if self._call is not None and buf is not None:
            self._call(int(signal.SIGINT), buf, None)


_DISPOSITION = _SigintDisposition()
_NATIVE_LOCK = threading.Lock()
_NATIVE_ACTIVE = 0
_NATIVE_SAVED: Any = None
_STOPPERS: dict[int, Callable[[], None]] = {}
_STOP_KEYS = itertools.count()
_INTERRUPTS = 0  # how many times interrupt_solves was called


def interrupt_generation() -> int:
    """A counter :func:`interrupt_solves` increments: an adapter reads it when a solve
    begins (before its set-up) and passes it to :func:`native_solve` as ``since``, so an
    interrupt requested while it was still setting up stops it too."""
    return _INTERRUPTS


@contextlib.contextmanager
def native_solve(
    stop: Callable[[], None] | None = None,
    *,
    installs_handler: bool = True,
    since: int | None = None,
) -> Iterator[None]:
    """Wrap one call into a solver library, for Ctrl-C.

    * ``installs_handler``: the library installs its own SIGINT handler while it works (SCS,
      ECOS and GUROBI do, to stop early and report "interrupted").  Such handlers are
      process-wide and restore what they found when they end, so overlapping solves in
      several threads can leave a library's handler installed for good (ECOS also skips the
      restore on some early exits), and Ctrl-C is then lost for the rest of the process.  The
      disposition in place before the first of a run of overlapping native solves is put back
      when the last one ends (POSIX; a no-op elsewhere).  The adapter must turn the library's
      "interrupted" status into ``KeyboardInterrupt``.
    * ``stop``: a callable that makes this solve stop early from another thread (GUROBI's
      ``Model.terminate``, a flag a Clarabel callback reads); :func:`interrupt_solves` calls
      it, and it is called at once if :func:`interrupt_solves` ran after ``since`` (the
      :func:`interrupt_generation` read when the solve began).
    """
    global _NATIVE_ACTIVE, _NATIVE_SAVED
    key = next(_STOP_KEYS)
    with _NATIVE_LOCK:
        if installs_handler:
            if _NATIVE_ACTIVE == 0:
                _NATIVE_SAVED = _DISPOSITION.read()
            _NATIVE_ACTIVE += 1
        if stop is not None:
            _STOPPERS[key] = stop
            late = since is not None and _INTERRUPTS > since
    if stop is not None and late:
        stop()
    try:
        yield
    finally:
        with _NATIVE_LOCK:
            _STOPPERS.pop(key, None)
            if installs_handler:
                _NATIVE_ACTIVE -= 1
                if _NATIVE_ACTIVE == 0:
                    _DISPOSITION.write(_NATIVE_SAVED)
                    _NATIVE_SAVED = None


def interrupt_solves() -> int:
    """Ask every solve in flight in this process that can be stopped from outside (those
    run under :func:`native_solve` with a ``stop``) to stop now; they then raise
    ``KeyboardInterrupt``.  For the caller that caught ``KeyboardInterrupt`` in the main
    thread while worker threads are still solving (a thread pool does not stop its workers).
    Solves still setting up when it is called stop as soon as they start iterating (see
    ``since`` of :func:`native_solve`).  Returns how many solves were asked."""
    global _INTERRUPTS
    with _NATIVE_LOCK:
        _INTERRUPTS += 1
        stops = list(_STOPPERS.values())
    for stop in stops:
        with contextlib.suppress(Exception):
            stop()
    return len(stops)


def interrupted(backend: str, what: str = "") -> KeyboardInterrupt:
    """The ``KeyboardInterrupt`` an adapter raises when its solver reports that it stopped
    on SIGINT (Ctrl-C), so that it reaches the caller instead of becoming a status."""
    return KeyboardInterrupt(f"{backend}: solve interrupted{f' ({what})' if what else ''}")


# -- solver chatter on the C-level stdout ----------------------------------------------------
_QUIET_LOCK = threading.Lock()
_QUIET_ACTIVE = 0
_QUIET_SAVED: int | None = None


def _c_flush() -> None:
    """Flush the C library's stdio buffers (what a solver printed with ``printf``)."""
    if os.name == "posix":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send file descriptor 1 to the null device while a solver that prints regardless of its
    own ``verbose`` setting works (OSQP's "Polishing not needed", HiGHS's copyright banner).

    The descriptor is process-wide: while one or more such solves run, anything else
    written to stdout (another thread's ``print``) is discarded too; overlapping calls share
    one redirection, undone when the last one ends.  Adapters use it only when the user did
    not ask for ``verbose``."""
    global _QUIET_ACTIVE, _QUIET_SAVED
    with _QUIET_LOCK:
        if _QUIET_ACTIVE == 0:
            try:
                sys.stdout.flush()
                _QUIET_SAVED = os.dup(1)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.close(null)
            except (OSError, AttributeError, ValueError):
                _QUIET_SAVED = None
        _QUIET_ACTIVE += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET_ACTIVE -= 1
            if _QUIET_ACTIVE == 0 and _QUIET_SAVED is not None:
                _c_flush()
                os.dup2(_QUIET_SAVED, 1)
                os.close(_QUIET_SAVED)
                _QUIET_SAVED = None


# -- badly scaled data -----------------------------------------------------------------------
#: Entries of this size or more (or a ratio of largest to smallest nonzero entry of
#: ``SCALE_RATIO`` or more) make a floating-point solver's verdict unreliable.
SCALE_LARGE = 1e8
SCALE_RATIO = 1e9


def scaling_note(g: Objective, h: ConeConstraints, e: Equalities) -> str | None:
    """A sentence for ``SolveInfo.raw_status`` when the data is too badly scaled for an
    "infeasible"/"unbounded"/"numerical error" verdict to be trusted, else None.

    A solver works in double precision on data it equilibrates only so far: with entries
    of 1e10, residuals of 1e-8 relative are 1e2 absolute and certificates of infeasibility
    or unboundedness are found in problems that have an optimum.  The note names the
    largest entries and where they are, so the caller can rescale.  Cost: one pass over the
    data, only on a failed solve."""
    blocks = {
        "P": g.P.data if g.P is not None else None,
        "q": g.q,
        "A": e.A.data,
        "b": e.b,
        "G": h.G.data,
        "h": h.h,
    }
    big: dict[str, float] = {}
    small = math.inf
    for name, values in blocks.items():
        if values is None or not np.size(values):
            continue
        mags = np.abs(np.asarray(values, dtype=float))
        top = float(mags.max())
        if top > 0:
            big[name] = top
            small = min(small, float(mags[mags > 0].min()))
    if not big:
        return None
    top = max(big.values())
    if top < SCALE_LARGE and top < SCALE_RATIO * small:
        return None
    where = ", ".join(k for k, v in big.items() if v >= min(SCALE_LARGE, 0.1 * top))
    return (
        f"the data is badly scaled (entries up to {top:.1e} in {where}; smallest nonzero "
        f"{small:.1e}): this verdict may be a numerical artefact of the scaling, not a "
        "property of the problem; rescale rows and variables to entries of order 1"
    )


def note_scaling(sol, g: Objective, h: ConeConstraints, e: Equalities):
    """``sol`` with :func:`scaling_note` appended to ``info.raw_status`` (and kept in
    ``info.extra["scaling"]``) when its status is a verdict a badly scaled problem can fake
    (infeasible, unbounded, numerical error, iteration limit) and the data is badly
    scaled; the engine shows ``raw_status`` in its error message."""
    from .protocol import Status

    verdicts = (
        Status.INFEASIBLE,
        Status.INFEASIBLE_INACCURATE,
        Status.UNBOUNDED,
        Status.UNBOUNDED_INACCURATE,
        Status.NUMERICAL_ERROR,
        Status.ITERATION_LIMIT,
    )
    if sol.status in verdicts:
        note = scaling_note(g, h, e)
        if note is not None:
            sol.info.raw_status = f"{sol.info.raw_status}; {note}"
            sol.info.extra["scaling"] = note
    return sol


# -- quadratic objectives for solvers without one: the epigraph --------------------------------
def psd_factor(P, *, backend: str = "", name: str = "P"):
    """``F`` (CSR, ``r x n``) with ``F'F = P``, for a symmetric positive semidefinite
    sparse ``P`` (both triangles stored), ``r`` its numerical rank.

    Blocks of ``P`` that do not interact (connected components of its pattern) are
    factored separately, so a diagonal or block-diagonal ``P`` keeps its sparsity: a
    ``1 x 1`` block is ``sqrt(P_ii)``, a larger one a dense Cholesky factor, or (singular
    blocks) ``diag(sqrt(w)) V'`` from an eigendecomposition with eigenvalues below
    ``1e-13 * max|w|`` dropped.  An eigenvalue below ``-1e-9 * max|w|`` (not PSD) raises
    :class:`SolverError` naming ``name``.  Cost: the dense factorisation of the largest
    block (``O(k^3)``)."""
    import scipy.linalg as sla
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    P = sp.csr_matrix(P, dtype=float)
    P.eliminate_zeros()
    n = P.shape[0]
    count, label = connected_components(P, directed=False)
    scale = float(np.max(np.abs(P.data), initial=0.0))
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    r = 0
    order = np.argsort(label, kind="stable")
    bounds = np.searchsorted(label[order], np.arange(count + 1))
    diag = P.diagonal()
    for c in range(count):
        idx = order[bounds[c] : bounds[c + 1]]
        if idx.size == 1:
            d = float(diag[idx[0]])
            if d < -1e-9 * max(scale, 1e-300):
                raise _not_psd(backend, name, d, scale)
            if d > 1e-13 * scale:
                rows.append(np.array([r]))
                cols.append(idx)
                vals.append(np.array([math.sqrt(d)]))
                r += 1
            continue
        block = P[idx][:, idx].toarray()
        block = 0.5 * (block + block.T)
        try:
            U = sla.cholesky(block, lower=False, check_finite=False)
            if np.all(np.abs(np.diag(U)) > 1e-7 * math.sqrt(max(scale, 1e-300))):
                F = U
            else:
                raise np.linalg.LinAlgError("nearly singular")
        except (np.linalg.LinAlgError, ValueError):
            w, V = np.linalg.eigh(block)
            top = float(np.max(np.abs(w), initial=0.0))
            if w[0] < -1e-9 * max(top, 1e-300):
                raise _not_psd(backend, name, float(w[0]), top) from None
            keep = w > 1e-13 * top
            F = np.sqrt(w[keep])[:, None] * V[:, keep].T
        k = F.shape[0]
        rr, cc = np.nonzero(F)
        rows.append(rr + r)
        cols.append(idx[cc])
        vals.append(F[rr, cc])
        r += k
    if not rows:
        return sp.csr_matrix((0, n))
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, n)
    )


def _not_psd(backend: str, name: str, low: float, top: float) -> SolverError:
    who = f"{backend}: " if backend else ""
    return SolverError(
        f"{who}the quadratic objective's {name} is not positive semidefinite (eigenvalue "
        f"{low:.3g} against a largest of {top:.3g}): the problem is not convex",
        backend=backend or None,
    )


class QuadraticEpigraph:
    """A QP as an SOCP without a quadratic objective, for solvers that take none.

    ``min 1/2 y'Py + q'y`` becomes ``min q'y + t`` over ``x = (y, t)`` with the rotated
    second-order cone ``||F y||^2 <= 2 (t/sigma) sigma`` written as the SOC block
    ``((t/sigma + sigma)/sqrt2, (t/sigma - sigma)/sqrt2, F y) in SOC(r + 2)`` (``F'F = P``,
    :func:`psd_factor`), appended after the problem's own SOC blocks (before EXP/PSD).
    ``sigma`` only balances the block: an interior-point method converges best when
    ``t/sigma`` and ``sigma`` are of one size, ``sigma ~ sqrt(t*)`` (the plain epigraph,
    ``sigma = 1``, fails when ``t*`` is far from 1: measured on a ghost problem with
    ``t* = 6e7``, ECOS stalled at ``sigma = 1`` and converged in 9 iterations at 1e4).

    At the optimum the cone's multiplier is ``((t/sigma + sigma)/sqrt2,
    -(t/sigma - sigma)/sqrt2, -F y)``, whose contribution to stationarity in ``y`` is
    ``P y``: the multipliers of the problem's own rows *are* the QP's, with no conversion.
    Away from the optimum the cone's multiplier lines up with its slack only to about the
    square root of the duality gap, so the QP's stationarity residual is about
    ``sqrt(gap)``: close the gap well below the accuracy wanted.  :meth:`lift` builds the
    SOCP, :meth:`restrict` maps its solution back (dropping ``t`` and the cone's rows)."""

    def __init__(
        self, g: Objective, h: ConeConstraints, e: Equalities, F, sigma: float = 1.0
    ) -> None:
        import scipy.sparse as sp

        from .protocol import ConeDims

        self.n, self.r, self.sigma = g.n, F.shape[0], float(sigma)
        n, d = g.n, h.dims
        self.at = at = d.nonneg + sum(d.soc)  # where the cone's rows go
        k = self.r + 2
        root = 1.0 / math.sqrt(2.0)
        tcoef = -root / self.sigma
        # assembled from coordinates (a quarter of the time of sparse hstack/vstack)
        Gc = sp.coo_matrix(h.G)
        Fc = sp.coo_matrix(F)
        rows = np.concatenate(
            [np.where(Gc.row < at, Gc.row, Gc.row + k), Fc.row + at + 2, [at, at + 1]]
        )
        cols = np.concatenate([Gc.col, Fc.col, [n, n]])
        vals = np.concatenate([Gc.data, -Fc.data, [tcoef, tcoef]])
        self.G = sp.csc_matrix((vals, (rows, cols)), shape=(h.m + k, n + 1))
        self.h = np.concatenate(
            [h.h[:at], [root * self.sigma, -root * self.sigma], np.zeros(self.r), h.h[at:]]
        )
        self.dims = ConeDims(d.nonneg, tuple(d.soc) + (k,), d.exp, tuple(d.psd))
        A = sp.csc_matrix(e.A)
        self.A = sp.csc_matrix(
            (A.data, A.indices, np.r_[A.indptr, A.indptr[-1]]), shape=(e.p, n + 1)
        )
        self.keep = np.r_[np.arange(at), np.arange(at + k, h.m + k)].astype(np.int64)

    @staticmethod
    def balance(F, q) -> float:
        """A ``sigma`` for a problem whose first solve at ``sigma = 1`` failed:
        ``sqrt(t~)`` with ``t~ = 1/2 q'P^+ q``, the unconstrained optimum's ``t`` (constraints
        only lower the optimum's ``t``, so this errs large; measured on the conformance
        zoo, 3..5e4 times ``t*``)."""
        import scipy.sparse.linalg as spla

        z = spla.lsqr(F.T, np.asarray(q, dtype=float), atol=1e-8, btol=1e-8)[0]
        t = 0.5 * float(z @ z)
        return math.sqrt(t) if math.isfinite(t) and t > 1.0 else 1.0

    def lift(self, g: Objective, extra_linear_term=None):
        """The SOCP's ``(q, G, h, dims, A)`` for linear cost ``q + extra_linear_term``."""
        q = np.asarray(g.q, dtype=float)
        if extra_linear_term is not None:
            q = q + extra_linear_term
        return np.r_[q, 1.0], self.G, self.h, self.dims, self.A

    def restrict(self, x, lam, slack):
        """The QP's ``(y, lam, slack)`` from the SOCP's (its ``nu`` is the same)."""
        return x[: self.n], lam[self.keep], slack[self.keep]


class BackendBase:
    """Common plumbing of first-party adapters.

    Subclasses set ``name``, ``capabilities``, ``package`` (the import name of the solver,
    imported lazily by the subclass inside ``solve``) and ``distribution`` (its PyPI name),
    and implement :meth:`setting_names` and ``solve``.
    """

    name: ClassVar[str] = ""
    # the class's; an instance may narrow it (a size-limited licence, the solver chosen)
    capabilities: Capabilities = Capabilities()
    package: ClassVar[str] = ""
    distribution: ClassVar[str] = ""

    #: Attributes holding per-process state (thread-locals, locks, caches of solver
    #: objects): left out when the backend is pickled or copied, rebuilt by
    #: :meth:`_fresh_state`.  A layer holding the backend can then be pickled, deep-copied
    #: and ``torch.save``\ d (the copy starts with empty caches).
    _transient: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **settings: Any) -> None:
        if args:  # a bare token in the config string: a setting without its "=value"
            raise bare_token_error(self.name or type(self).__name__, args)
        valid = set(self.setting_names())
        unknown = sorted(set(settings) - valid)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)} for backend {self.name!r}; "
                f"valid settings: {', '.join(sorted(valid))}"
            )
        self.settings: dict[str, Any] = dict(settings)
        self._config: dict[str, Any] = dict(settings)  # as given, adapter options included

    # -- pickling and copying -------------------------------------------------------------
    def _fresh_state(self) -> None:
        """(Re)create the attributes named in ``_transient`` (after unpickling or copying);
        adapters with per-process state override it and call it from ``__init__``."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in self._transient:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fresh_state()

    def _pop_cache_size(self, default: int) -> int:
        """Take the adapter option ``cache_size`` (structures cached per thread, 0 = off)
        out of ``settings`` and check it."""
        cache_size = self.settings.pop("cache_size", default)
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 0:
            raise ConfigError(
                f"{self.name}: cache_size must be a nonnegative int, got {cache_size!r}"
            )
        return cache_size

    def with_settings(self, **settings: Any) -> BackendBase:
        """A new backend of the same kind with ``settings`` added to (or replacing) this
        one's; this one is unchanged (its caches are not shared).  ``FFOLayer(time_limit=)``
        calls ``with_settings(time_limit=seconds)``: adapters map ``time_limit`` to their
        solver's own name, and one without a time limit raises :class:`ConfigError`."""
        return type(self)(**{**self._config, **settings})

    # -- registry-facing class methods -------------------------------------------------
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """``(True, "")`` if the backend can run here, else ``(False, reason)``."""
        if cls.package and importlib.util.find_spec(cls.package) is None:
            return False, (
                f"Python package {cls.package!r} is not installed "
                f"(pip install {cls.distribution or cls.package})"
            )
        return True, ""

    @classmethod
    def version(cls) -> str | None:
        """Version of the underlying solver package, or ``None`` if not installed."""
        try:
            return importlib.metadata.version(cls.distribution or cls.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    # -- for subclasses ------------------------------------------------------------------
    def setting_names(self) -> Iterable[str]:
        """The solver's own parameter names accepted in the config string."""
        return ()

    def check_size(self, g: Objective, h: ConeConstraints, e: Equalities) -> None:
        """Raise :class:`SolverError` when the problem exceeds a declared size limit."""
        caps = self.capabilities
        if caps.max_variables is not None and g.n > caps.max_variables:
            raise SolverError(
                f"{self.name}: {g.n} variables exceed this installation's limit of "
                f"{caps.max_variables}",
                backend=self.name,
            )
        rows = h.m + e.p
        if caps.max_constraints is not None and rows > caps.max_constraints:
            raise SolverError(
                f"{self.name}: {rows} constraints exceed this installation's limit of "
                f"{caps.max_constraints}",
                backend=self.name,
            )

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.settings.items())
        return f"<{type(self).__name__} {self.name}{':' + opts if opts else ''}>"
