"""agent-sidecar's proxy: an aiohttp application between LLM agents and their APIs."""

__version__ = "0.1.0"
