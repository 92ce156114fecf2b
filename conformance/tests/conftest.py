"""Make ``pytest --pyargs ffo_conformance.tests`` work without ``-p ffo_conformance.pytest_plugin``.

When the plugin is not loaded yet (no ``pytest11`` entry point, no ``-p``), register it
here.  Its command-line options cannot be added this late, so the backend then comes from
the ``FFO_BACKEND`` environment variable (``FFO_CLASSES``, ``FFO_CHECKS`` likewise).
"""

from ffo_conformance import pytest_plugin


def pytest_configure(config):
    if not config.pluginmanager.is_registered(pytest_plugin):
        config.pluginmanager.register(pytest_plugin, "ffo_conformance.pytest_plugin")
