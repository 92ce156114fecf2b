"""``import ffo``: the public API of the ``ffo`` distribution under its own name.

The implementation lives in :mod:`ffo_core` (engine and layers), :mod:`ffo_backends`
(first-party solver adapters) and :mod:`ffo_conformance` (the conformance suite); this
module re-exports what users write against, so ``import ffo; ffo.FFOLayer(...)`` and
``from ffo_core import FFOLayer`` are the same class.
"""

from ffo_core import *  # noqa: F403  (the public API, listed in ffo_core.__all__)
from ffo_core import __all__, __version__  # noqa: F401
