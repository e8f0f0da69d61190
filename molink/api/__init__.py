"""The OpenAI- and vLLM-compatible HTTP server in front of an EngineClient."""

from molink.api.app import ApiConfig, create_app, server_context

__all__ = ["ApiConfig", "create_app", "server_context"]
