"""``python -m ffo_conformance NAME [options]``: the same as ``ffo conformance NAME``."""

import sys

from .cli import main

sys.exit(main())
