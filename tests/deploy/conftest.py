"""Fixtures of tests/deploy: the integration suite's broker and worker process.

The simulator fixture is shared by every test (tests/conftest.py).
"""

from tests.integration.conftest import broker, start_worker

__all__ = ["broker", "start_worker"]
