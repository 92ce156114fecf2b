"""The conformance suite as a test package: ``pytest --pyargs conformance.tests``.

See :mod:`conformance.pytest_plugin` for the options (``--ffo-backend NAME``).
"""
