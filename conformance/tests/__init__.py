"""The conformance suite as a test package: ``pytest --pyargs ffo_conformance.tests``.

See :mod:`ffo_conformance.pytest_plugin` for the options (``--ffo-backend NAME``).
"""
