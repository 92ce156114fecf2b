"""One test per (instance, check) of the conformance suite, for the backend(s) given with
``--ffo-backend NAME`` (or ``FFO_BACKEND``); see :mod:`ffo_conformance.pytest_plugin`."""


def test_conformance(ffo_conformance_case):
    ffo_conformance_case.check()
