"""The aiobotocore client for Connect, configured for a worker that owns every retry."""

import platform
from contextlib import AsyncExitStack
from functools import cache
from types import TracebackType
from typing import Any

import aiobotocore
import botocore
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from worker import __version__
from worker.models import ChatIntegrationEvent
from worker.pipeline.accepted import BEFORE_PARSE, Accepted, read_accepted, tolerate_odd_bodies
from worker.pipeline.errors import translate_error
from worker.settings import WorkerSettings

NO_REGION = "no AWS region: set AWS_REGION or AWS_DEFAULT_REGION"


def connect_region(settings: WorkerSettings) -> str | None:
    """Return the Region the Connect client will call: the settings', else botocore's profile."""
    region = settings.aws_region or get_session().get_config_variable("region")
    return str(region) if region else None


@cache
def user_agent() -> str:
    """Return the client's User-Agent: this worker, the SDK and the runtime, built once.

    Left to itself, botocore rebuilds its User-Agent twice per request, sanitising every
    component character by character: measured at about a tenth of the worker's CPU. A fixed
    string drops only the per-request feature codes (`m/...`) that AWS collects as telemetry.
    """
    return (
        f"connect-chat-worker/{__version__} aiobotocore/{aiobotocore.__version__} "
        f"botocore/{botocore.__version__} "
        f"Python/{platform.python_version()} {platform.system()}/{platform.release()}"
    )


def client_config(settings: WorkerSettings) -> AioConfig:
    """Return the botocore configuration of the worker's client.

    botocore's retries are off (`total_max_attempts=1`) so that attempts and throttles are
    counted once, by the worker. Parameter validation is off because the pydantic model
    enforces the same constraints; the pool holds one connection per prefetched message; the
    User-Agent is built once (`user_agent`).
    """
    return AioConfig(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=settings.connect_timeout_seconds,
        read_timeout=settings.read_timeout_seconds,
        max_pool_connections=settings.prefetch,
        parameter_validation=False,
        user_agent=user_agent(),
    )


class ConnectClient:
    """Send chat integration events; raise an `EventFailure` for anything but a 2xx."""

    def __init__(self, settings: WorkerSettings, endpoint_url: str | None = None) -> None:
        self._settings = settings
        self._endpoint_url = endpoint_url
        self._stack = AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> "ConnectClient":
        session = get_session()
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "connect",
                region_name=self._settings.aws_region,
                endpoint_url=self._endpoint_url,
                config=client_config(self._settings),
            )
        )
        self._client.meta.events.register(BEFORE_PARSE, tolerate_odd_bodies)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    @property
    def endpoint_url(self) -> str:
        """Return the URL the open client calls.

        aiobotocore resolves it on opening: the `endpoint_url` given, else
        AWS_ENDPOINT_URL_CONNECT or the AWS config file, else the Region's own.
        """
        if self._client is None:
            raise RuntimeError("the Connect client is not open")
        return str(self._client.meta.endpoint_url)

    async def send(self, event: ChatIntegrationEvent) -> Accepted:
        """Call SendChatIntegrationEvent once; return what its 2xx answer says."""
        try:
            response: dict[str, Any] = await self._client.send_chat_integration_event(
                **event.to_request()
            )
        except Exception as error:
            raise translate_error(error) from error
        return read_accepted(response)
