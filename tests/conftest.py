import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/problems.py


@pytest.fixture
def registered():
    """``register(cls)``: registers a backend class for this test (returns its name) and
    unregisters every one so registered when the test ends."""
    from ffo_core import register_backend, unregister_backend

    names = []

    def register(cls):
        register_backend(cls)
        names.append(cls.name)
        return cls.name

    yield register
    for name in names:
        unregister_backend(name)
