"""connect-chat-worker: chat integration events from RabbitMQ to Amazon Connect."""

from importlib.metadata import PackageNotFoundError, version

from worker.models import ChatIntegrationEvent, conversation_key

__all__ = ["ChatIntegrationEvent", "__version__", "conversation_key"]
try:
    __version__ = version("connect-chat-worker")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
