"""Fixtures of the reliability suite: the integration fixtures, plus a Redis ledger to clean."""

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from tests.integration.conftest import broker, start_worker  # noqa: F401
from tests.integration.support import Broker
from tests.reliability.ledger import REDIS_URL


@pytest.fixture
async def redis_ledger(broker: Broker) -> AsyncIterator[Redis]:  # noqa: F811
    """Give the worker's Redis ledger a clean namespace (the unique queue), and empty it after."""
    redis = Redis.from_url(REDIS_URL)
    pattern = f"{broker.base}:delivered:*"
    try:
        yield redis
    finally:
        keys = [key async for key in redis.scan_iter(match=pattern, count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
