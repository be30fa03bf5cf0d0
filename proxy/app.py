"""The aiohttp application: admin routes and the live page under /_sidecar/, everything else proxied."""

from __future__ import annotations

from typing import AsyncIterator

from aiohttp import web

from . import admin, host_guard, live_page
from .config import Config
from .pipeline import add_sidecar_headers, handle, stage_hooks
from .state import STATE, ProxyState


def make_app(config: Config) -> web.Application:
    state = ProxyState.build(config)
    # The body limit is enforced by intake with an API-shaped error; aiohttp's own is a backstop.
    # Request bodies stay as the agent sent them: a gzip body goes upstream gzip, with its header.
    app = web.Application(client_max_size=state.body_limit + 1, handler_args={"auto_decompress": False})
    app[STATE] = state
    state.stage_hooks = stage_hooks(state)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await state.open()
        yield
        await state.close()

    app.cleanup_ctx.append(lifetime)
    app.on_response_prepare.append(add_sidecar_headers)
    app.middlewares.append(host_guard.local_only)   # /_sidecar/ only for 127.0.0.1
    admin.add_routes(app)
    live_page.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
