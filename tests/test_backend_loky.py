"""The conformance suite against the default, local loky backend."""

from backend_suite import BackendSuite


class TestLoky(BackendSuite):
    backend = "loky"
