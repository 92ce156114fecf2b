"""The module named by the ``ffo`` entry point: it implements the registration hook.

ffo loads it with pluggy when the registry is first used.  Keep it light: import the solver
package (``osqp``) lazily in the backend, never here, so that a missing solver shows up as
"cannot run here: ..." in ``ffo backends`` instead of breaking the plugin's import.
"""

from ffo_core.hookspecs import hookimpl

from .backend import OSQPBackend


@hookimpl
def ffo_register_backends(register):
    register(OSQPBackend)
