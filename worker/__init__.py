"""connect-chat-worker: chat integration events from RabbitMQ to Amazon Connect."""

from worker.models import ChatIntegrationEvent, conversation_key

__all__ = ["ChatIntegrationEvent", "__version__", "conversation_key"]
__version__ = "0.1.0"
