"""Session fixtures shared by test modules (pytest only shares session scope through conftest.py).

ray_cluster: one local, loopback-only Ray cluster + Serve proxy for all Ray tests (tests/serve_support.py);
started only when a test requests it.
"""

from tests.serve_support import ray_cluster  # noqa: F401
