"""What lives as long as the proxy app: config, upstream client, stores.

Held under one typed AppKey; opened and closed by the app's cleanup context,
never in module globals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from .config import Config
from .routes import Upstreams
from .upstream import UpstreamClient


@dataclass(eq=False)
class ProxyState:
    config: Config
    client: UpstreamClient
    upstreams: Upstreams
    started: float = field(default_factory=time.time)

    @classmethod
    def build(cls, config: Config) -> "ProxyState":
        return cls(config=config, client=UpstreamClient(config.proxy),
                   upstreams=Upstreams(config.upstream.anthropic, config.upstream.openai))

    @property
    def agent_id(self) -> str:
        return self.config.proxy.agent_id or "default"

    @property
    def body_limit(self) -> int:
        return int(self.config.proxy.max_body_mb * 1024 * 1024)

    async def open(self) -> None:
        await self.client.open()

    async def close(self) -> None:
        await self.client.close()


STATE = web.AppKey("state", ProxyState)
