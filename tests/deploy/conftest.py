"""Fixtures of tests/deploy: the integration suite's broker, simulator and worker process."""

from tests.integration.conftest import broker, simulator, start_worker

__all__ = ["broker", "simulator", "start_worker"]
