"""Checks run in a worker process, each under a timeout: a hang or a crash is a result.

A backend is native code the suite does not control: it may hang (a deadlock, an endless
loop), or crash the interpreter (a segfault from a solver object shared across threads).
Run in-process, either would take the whole run with it -- no table, no JSON report.  So
:class:`~ffo_conformance.runner.Suite` sends every (instance, check) to a :class:`Worker`,
a ``python`` subprocess that holds the backend, the zoo and the per-instance caches, and
waits for the answer at most ``timeout`` seconds:

* the answer is the check's :class:`~ffo_conformance.checks.CheckResult`, as in-process;
* no answer in time: the worker (its whole process group) is killed, and the check is an
  ERROR that says so and names the group; the group's other checks are not run (each would
  likely hang too) and are ERRORs saying why;
* the worker dies: the check is an ERROR with the exit status or signal and the end of the
  worker's stderr (``faulthandler`` prints the Python stack of a crash there); the next
  check starts a fresh worker.

After ``MAX_TIMEOUTS`` hangs or ``MAX_CRASHES`` crashes in one run, the remaining checks are
reported as not run, so that a backend that hangs everywhere still ends in bounded time.

The worker rebuilds the backend from what the parent sends: the config string (and, for a
class registered at run time with ``register_backend``, that class, pickled by reference),
or a backend instance pickled whole.  What cannot be sent (a class defined inside a
function, an instance holding a lock) runs in-process instead, and the report says so.

Solvers that print to stdout cannot corrupt the answers: the worker answers on a private
copy of its stdout and points file descriptor 1 at its stderr (a temporary file).
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import weakref

_HEADER = struct.Struct("!Q")

#: After this many timed-out checks (or crashed workers), the rest of a run is not run.
MAX_TIMEOUTS = 3
MAX_CRASHES = 5

#: Seconds a new worker may take to import the suite and build the backend and the zoo.
STARTUP_TIMEOUT = 120.0

_LIVE: weakref.WeakSet = weakref.WeakSet()


class WorkerTimeout(Exception):
    """The worker did not answer in time (it has been killed)."""


class WorkerDied(Exception):
    """The worker process ended while it was working on a request."""


def _write(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    chunks, left = [], size
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise WorkerTimeout()
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                raise WorkerTimeout()
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise WorkerDied()
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read(fd: int, deadline: float | None = None):
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exact(fd, size, deadline))


def describe_exit(code: int | None) -> str:
    """``"signal 11 (SIGSEGV)"`` or ``"exit status 3"``."""
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


class Worker:
    """One worker process (see the module docstring); ``setup`` is what it rebuilds the
    backend, the reference and the zoo from."""

    def __init__(self, setup: dict) -> None:
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from ffo_conformance.isolation import main; main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,
            start_new_session=True,  # its own process group: killed as a whole
        )
        _LIVE.add(self)
        try:
            self.ready = self.call(("setup", setup), STARTUP_TIMEOUT)
        except WorkerDied:
            tail = self.stderr_tail(12)
            self.kill()
            died = self.exit_text + (f"; end of its stderr: {tail}" if tail else "")
            raise WorkerDied(died) from None
        except Exception:
            self.kill()
            raise

    def call(self, request, timeout: float | None):
        """Send ``request``, return the answer; raises :class:`WorkerTimeout` (after
        killing the worker) or :class:`WorkerDied`."""
        self.send(request)
        return self.receive(timeout)

    def send(self, request) -> None:
        """Send a request without waiting (``("cases", [...])`` is answered once per case,
        each answer as soon as it is ready: see :meth:`receive`)."""
        try:
            _write(self.proc.stdin.fileno(), request)
        except (BrokenPipeError, OSError) as exc:
            raise WorkerDied() from exc

    def receive(self, timeout: float | None):
        """The next answer, waiting at most ``timeout`` seconds; raises as :meth:`call`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            status, value = _read(self.proc.stdout.fileno(), deadline)
        except WorkerTimeout:
            self.kill()
            raise
        except WorkerDied:
            self._reap()
            raise
        if status == "error":
            raise RuntimeError(value)
        return value

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()

    @property
    def exit_text(self) -> str:
        return describe_exit(self.proc.poll())

    def stderr_tail(self, lines: int = 30) -> str:
        """The end of the worker's stderr: from the last ``Fatal Python error`` (a crash's
        faulthandler report: the signal and each thread's stack, the crashing thread's
        first) when there is one, at most ``lines`` lines."""
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - 65536))
            text = self._stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        start = text.rfind("Fatal Python error")
        kept = [
            line
            for line in (text[start:] if start >= 0 else text).splitlines()
            if line.strip() and not line.startswith("Extension modules:")
        ]
        return "\n".join(kept[:lines] if start >= 0 else kept[-lines:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._close_pipes()

    def close(self) -> None:
        """Ask the worker to exit; kill it if it does not within a few seconds."""
        if self.proc.poll() is None:
            try:
                _write(self.proc.stdin.fileno(), ("exit", None))
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _close_pipes(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


@atexit.register
def _kill_all() -> None:
    for worker in list(_LIVE):
        worker.kill()


# -- the worker side -------------------------------------------------------------------------


class _State:
    """What a worker holds: the backend (guarded), the reference, the zoo, the caches."""

    def __init__(self, setup: dict) -> None:
        from .guard import GuardedBackend
        from .instance import InstanceRun
        from .zoo import build_zoo

        for path in reversed(setup.get("sys_path", [])):
            if path not in sys.path:
                sys.path.insert(0, path)
        self.factory = setup.get("factory")
        self.spec = setup.get("spec")
        self.backend = GuardedBackend(self._make(setup))
        self.reference = pickle.loads(setup["reference"])
        self.zoo = {inst.name: inst for inst in build_zoo(setup.get("seed", 0))}
        self.runs: dict[str, InstanceRun] = {}
        self._InstanceRun = InstanceRun

    def _make(self, setup: dict):
        from ffo_core.registry import get_backend, register_backend

        if setup.get("instance") is not None:
            return pickle.loads(setup["instance"])
        if self.factory is not None:
            register_backend(pickle.loads(self.factory))
        return get_backend(self.spec)

    def case(self, name: str, check: str):
        from .checks import run_check

        run = self.runs.get(name)
        if run is None:
            run = self.runs[name] = self._InstanceRun(
                self.zoo[name], self.backend, self.reference, self.spec
            )
        return run_check(run, check)

    def trial(self, spec: str):
        from .runner import trial_solve

        return trial_solve(spec)


def main() -> None:
    """Entry point of a worker process (started by :class:`Worker`)."""
    out = os.dup(1)  # answers go here; anything else printed to stdout goes to stderr
    os.dup2(2, 1)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    inp = sys.stdin.fileno()
    state = None
    answer: tuple[str, object]  # ("ok", result) or ("error", message)
    while True:
        try:
            op, arg = _read(inp)
        except WorkerDied:
            return
        if op == "exit":
            return
        try:
            if op == "setup":
                state = _State(arg)
                answer = ("ok", {"pid": os.getpid(), "backend": repr(state.backend)})
            elif op == "cases":  # one answer per case, each as soon as it is ready
                for name, check in arg[:-1]:
                    try:
                        answer = ("ok", state.case(name, check))
                    except BaseException as exc:
                        answer = ("error", f"{type(exc).__name__}: {exc}")
                    _write(out, answer)
                answer = ("ok", state.case(*arg[-1]))
            elif op == "trial":
                answer = ("ok", state.trial(arg))
            else:
                answer = ("error", f"unknown request {op!r}")
        except BaseException as exc:  # a SystemExit from a backend is an answer too
            answer = ("error", f"{type(exc).__name__}: {exc}")
        _write(out, answer)
