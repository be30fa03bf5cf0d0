"""Choosing the shared state's home: LMDB on this machine, or Redis for a fleet.

The only place that knows which backend is configured; the rest of the proxy
talks to a response store, a limiter and the sessions through one interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .cache_key import load_secret
from .config import Config, ConfigError
from .response_store import ResponseStore
from .store import Lmdb


@dataclass
class Backends:
    store: Any                 # get/put/delete/flush_touches/stats/shared_entries
    secret: bytes              # the partition HMAC secret: shared by the fleet with Redis
    global_slots: Any = None   # RedisSlots, or None: the local limiter alone
    mirror: Any = None         # RedisCheckpoints, or None
    budget: Any = None         # RedisBudget (the fleet's rate-limit headroom), or None: this process's own
    link: Any = None

    async def close(self) -> None:
        if self.global_slots is not None:
            await self.global_slots.close()
        if self.budget is not None:
            await self.budget.close()
        if self.link is not None:
            await self.link.close()


async def open_backends(config: Config, lmdb_env: Lmdb, emit: Callable[..., None]) -> Backends:
    max_bytes = int(config.cache.max_size_mb * 1024 * 1024)
    if config.state.backend == "lmdb":
        return Backends(ResponseStore(lmdb_env, max_bytes, config.cache.ttl_seconds), load_secret(config.state_dir))
    try:
        from .redis_backend import RedisBudget, RedisCheckpoints, RedisLink, RedisResponseStore, RedisSlots
    except ImportError:
        raise ConfigError("[state] backend = \"redis\" needs the Redis client: pip install 'agent-sidecar[redis]'") from None
    link = RedisLink(config.state.redis_url, config.state.redis_prefix, emit)
    secret = await _fleet_secret(link, load_secret(config.state_dir))
    limit = config.limits.max_concurrency
    return Backends(RedisResponseStore(link, max_bytes, config.cache.ttl_seconds), secret,
                    global_slots=RedisSlots(link, limit, config.state.lease_seconds) if limit else None,
                    mirror=RedisCheckpoints(link), budget=RedisBudget(link, config.state.lease_seconds), link=link)


async def _fleet_secret(link, local: bytes) -> bytes:
    """One partition secret for every sidecar on this Redis, so the same key hits on any machine."""
    from redis.exceptions import RedisError
    name = link.key("partition-secret")
    try:
        await link.redis.set(name, local, nx=True)
        return await link.redis.get(name) or local
    except (RedisError, OSError) as exc:
        link.failed(exc)
        return local
