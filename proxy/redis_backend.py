"""Redis behind the same interfaces as the LMDB store and the local limiter, for a fleet.

Cache entries, their size accounting and LRU order live in Redis, so every
sidecar pointed at it shares hits; per-key expiry does the TTL. A lookup is
one round trip (GET and the LRU touch pipelined); a store is one atomic Lua
script (set, account, evict). The rate-limit headroom is one budget for the
fleet: readings and reservations in Redis, taken by one atomic script. The global concurrency limit is a semaphore of
leases in a sorted set: a holder's lease expires unless its sidecar renews it,
so a killed sidecar cannot leak slots; a release is published, so waiters
retry at once instead of polling. Checkpoints are mirrored to Redis too.

Redis unreachable or failing: lookups miss, stores are skipped, the global
limit falls back to the local one, an event is raised once, and the next call
after a short backoff tries Redis again, so the sidecar recovers by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

import orjson
from redis import asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("sidecar")
RETRY_AFTER = 5.0   # seconds before trying a failed Redis again

PUT = """
local old = tonumber(redis.call('HGET', KEYS[3], KEYS[1]) or '0')
if tonumber(ARGV[4]) > 0 then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4]) else redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('ZADD', KEYS[2], ARGV[2], KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], #ARGV[1])
local total = redis.call('INCRBY', KEYS[4], #ARGV[1] - old)
while total > tonumber(ARGV[3]) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 or oldest[1] == KEYS[1] then break end
  local size = tonumber(redis.call('HGET', KEYS[3], oldest[1]) or '0')
  redis.call('DEL', oldest[1]); redis.call('ZREM', KEYS[2], oldest[1]); redis.call('HDEL', KEYS[3], oldest[1])
  total = redis.call('DECRBY', KEYS[4], size)
end
return {total, redis.call('ZCARD', KEYS[2])}
"""

ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  return 1
end
return 0
"""


# The fleet's rate-limit budget (proxy/headroom.py's arithmetic, in one atomic step). KEYS[1]: the budget's
# readings (a hash of <bucket>.limit/.remaining/.reset); KEYS[2..]: per bucket a sorted set of reservations,
# "<ticket>:<need>" scored by their expiry. ARGV: now, expiry, ticket, force, then the buckets, then the needs.
TAKE = """
local now, n = tonumber(ARGV[1]), #KEYS - 1
local untl, report = 0, false
for i = 1, n do
  local name, need = ARGV[4 + i], tonumber(ARGV[4 + n + i])
  redis.call('ZREMRANGEBYSCORE', KEYS[1 + i], '-inf', now)
  local limit = tonumber(redis.call('HGET', KEYS[1], name .. '.limit') or '')
  if limit and ARGV[4] ~= '1' then
    local reserved = 0
    for _, m in ipairs(redis.call('ZRANGE', KEYS[1 + i], 0, -1)) do
      reserved = reserved + tonumber(string.match(m, ':(%d+)$'))
    end
    local remaining = tonumber(redis.call('HGET', KEYS[1], name .. '.remaining'))
    local reset = tonumber(redis.call('HGET', KEYS[1], name .. '.reset'))
    local left = (reset <= now and limit or remaining) - reserved
    if need > left and need <= limit then
      if reset > now then untl = math.max(untl, reset) else report = true end
    end
  end
end
if report then return 'inf' end
if untl > 0 then return tostring(untl) end
for i = 1, n do
  redis.call('ZADD', KEYS[1 + i], ARGV[2], ARGV[3] .. ':' .. ARGV[4 + n + i])
  redis.call('EXPIRE', KEYS[1 + i], math.ceil(tonumber(ARGV[2]) - now) + 1)
end
return '0'
"""

# An answer's reading (the later of it and the one kept, as headroom.newer decides) and its reservations given
# back. KEYS as TAKE; ARGV: now, ticket, the number of buckets read, their name/limit/remaining/reset, the needs'
# bucket names and needs.
REPORT = """
local now, read = tonumber(ARGV[1]), tonumber(ARGV[3])
for j = 0, read - 1 do
  local name, limit, remaining, reset = ARGV[4 + 4 * j], ARGV[5 + 4 * j], tonumber(ARGV[6 + 4 * j]), tonumber(ARGV[7 + 4 * j])
  local old_limit = redis.call('HGET', KEYS[1], name .. '.limit')
  local old_reset = tonumber(redis.call('HGET', KEYS[1], name .. '.reset') or '0')
  local old_remaining = tonumber(redis.call('HGET', KEYS[1], name .. '.remaining') or '0')
  if old_limit ~= limit or reset > old_reset or old_reset <= now then
    redis.call('HSET', KEYS[1], name .. '.limit', limit, name .. '.remaining', remaining, name .. '.reset', reset)
  elseif reset == old_reset and remaining < old_remaining then
    redis.call('HSET', KEYS[1], name .. '.remaining', remaining)
  end
end
redis.call('EXPIRE', KEYS[1], 3600)
local base = 4 + 4 * read
for i = 1, #KEYS - 1 do
  redis.call('ZREM', KEYS[1 + i], ARGV[2] .. ':' .. ARGV[base + i - 1])
end
return 1
"""


class RedisLink:
    """One connection pool, with the fail-open rule: after an error, stay away for a few seconds."""

    def __init__(self, url: str, prefix: str, on_event):
        self.url = url
        self.prefix = prefix
        self.redis = aioredis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        self.down_until = 0.0
        self.on_event = on_event   # on_event(kind, state, **detail)

    @property
    def up(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, exc: Exception) -> None:
        if self.down_until == 0.0 or self.up:
            log.warning("redis %s failing (%s); serving with local state until it is back", self.url, exc)
            if self.down_until == 0.0:
                self.on_event("redis_unavailable", "raised", url=self.url, error=str(exc)[:200])
        self.down_until = time.monotonic() + RETRY_AFTER

    def worked(self) -> None:
        if self.down_until:
            self.down_until = 0.0
            self.on_event("redis_unavailable", "cleared", url=self.url)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def close(self) -> None:
        await self.redis.aclose()


class RedisResponseStore:
    """The response store's interface (get/put/delete/stats) on Redis."""

    def __init__(self, link: RedisLink, max_size: int, ttl: float):
        self.link = link
        self.max_size = max_size
        self.ttl = int(ttl)
        self._lru, self._sizes, self._bytes = link.key("lru"), link.key("sizes"), link.key("bytes")
        self._put = link.redis.register_script(PUT)
        self._stats = {"entries": 0, "bytes": 0, "max_bytes": max_size}

    def _entry(self, key: bytes) -> str:
        return self.link.key("entry", key.hex())

    async def get(self, key: bytes) -> bytes | None:
        if not self.link.up:
            return None
        name = self._entry(key)
        try:
            async with self.link.redis.pipeline(transaction=False) as pipe:
                pipe.get(name)
                pipe.zadd(self._lru, {name: time.time()}, xx=True)
                blob, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.link.failed(exc)
            return None
        self.link.worked()
        return blob

    async def put(self, key: bytes, blob: bytes) -> None:
        if not self.link.up or len(blob) > self.max_size:
            return
        try:
            total, entries = await self._put(keys=[self._entry(key), self._lru, self._sizes, self._bytes],
                                             args=[blob, time.time(), self.max_size, self.ttl])
        except (RedisError, OSError) as exc:
            self.link.failed(exc)
            return
        self.link.worked()
        self._stats = {"entries": int(entries), "bytes": int(total), "max_bytes": self.max_size}

    async def delete(self, key: bytes) -> None:
        name = self._entry(key)
        try:
            async with self.link.redis.pipeline(transaction=True) as pipe:
                pipe.delete(name).zrem(self._lru, name).hget(self._sizes, name).hdel(self._sizes, name)
                _, _, size, _ = await pipe.execute()
            if size:
                await self.link.redis.decrby(self._bytes, int(size))
        except (RedisError, OSError) as exc:
            self.link.failed(exc)

    async def flush_touches(self) -> None:
        """LRU touches are sent with each lookup; nothing waits."""

    def shared_entries(self) -> bool:
        return True

    def stats(self) -> dict[str, int]:
        """As of the last store; Redis is not asked on every page view."""
        return dict(self._stats)


async def subscribe(link, channel: str, on_message) -> None:
    """Call on_message for each message published on channel, until cancelled or Redis fails (reported)."""
    try:
        pubsub = link.redis.pubsub()
        await pubsub.subscribe(channel)
        async for message in pubsub.listen():
            if message.get("type") == "message":
                on_message()
    except (RedisError, OSError) as exc:
        link.failed(exc)


class RedisSlots:
    """A global semaphore of leases: at most `limit` upstream calls in flight across all sidecars."""

    def __init__(self, link: RedisLink, limit: int, lease: float):
        self.link = link
        self.limit = limit
        self.lease = lease
        self._slots, self._channel = link.key("slots"), link.key("slots-freed")
        self._acquire = link.redis.register_script(ACQUIRE)
        self._held: set[str] = set()
        self._renewer: asyncio.Task | None = None
        self._freed = asyncio.Event()
        self._listener: asyncio.Task | None = None
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    async def acquire(self) -> str | None:
        """A lease id once a global slot is ours; None when Redis is out (the local limit then rules)."""
        holder = f"{self._owner}-{uuid.uuid4().hex[:8]}"
        while self.link.up:
            self._freed.clear()   # before asking: a release announced meanwhile must still wake us
            try:
                now = time.time()
                granted = await self._acquire(keys=[self._slots], args=[now, self.limit, now + self.lease, holder])
            except (RedisError, OSError) as exc:
                self.link.failed(exc)
                return None
            self.link.worked()
            if granted:
                self._held.add(holder)
                self._keep_renewing()
                return holder
            self._listen()
            try:   # woken by a release anywhere; a dead holder's lease frees its slot by expiring
                await asyncio.wait_for(self._freed.wait(), self.lease)
            except asyncio.TimeoutError:
                pass
        return None

    def release(self, holder: str | None) -> None:
        if holder is None or holder not in self._held:
            return
        self._held.discard(holder)
        asyncio.get_running_loop().create_task(self._release(holder))

    async def _release(self, holder: str) -> None:
        try:
            async with self.link.redis.pipeline(transaction=False) as pipe:
                await pipe.zrem(self._slots, holder).publish(self._channel, holder).execute()
        except (RedisError, OSError) as exc:
            self.link.failed(exc)   # the lease expires by itself

    def _keep_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """Extend our leases while we hold any; stops when we hold none (no timer while idle)."""
        while self._held:
            await asyncio.sleep(self.lease / 3)
            if not self._held:
                break
            try:
                expiry = time.time() + self.lease
                await self.link.redis.zadd(self._slots, {h: expiry for h in self._held}, xx=True)
            except (RedisError, OSError) as exc:
                self.link.failed(exc)

    def _listen(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(
                subscribe(self.link, self._channel, self._freed.set))
            self._freed.set()

    async def close(self) -> None:
        for task in (self._renewer, self._listener):
            if task is not None:
                task.cancel()
        if self._held:
            try:
                await self.link.redis.zrem(self._slots, *self._held)
            except (RedisError, OSError):
                pass


class RedisBudget:
    """The rate-limit headroom of every sidecar on this Redis as one budget (headroom.LocalBudget's interface).

    A reservation is a member of a sorted set that expires after `lease` seconds, so a sidecar that dies
    holding some cannot shrink the fleet's budget for longer. A report is published: calls held anywhere
    look again at once. Redis failing: this sidecar's own budget takes over until it is back."""

    shared = True

    def __init__(self, link: RedisLink, lease: float = 30.0):
        from .headroom import LocalBudget
        self.link = link
        self.lease = lease
        self.local = LocalBudget()          # the readings this sidecar saw (shown), and the fallback
        self.budgets = self.local.budgets
        self.on_report = lambda: None      # the pacer's wake-up
        self._take = link.redis.register_script(TAKE)
        self._report = link.redis.register_script(REPORT)
        self._channel = link.key("headroom-reported")
        self._listener: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def _keys(self, ticket) -> list[str]:
        base = self.link.key("headroom", ticket.key)
        return [base, *(f"{base}:{name}" for name in ticket.needs)]

    async def take(self, ticket, now: float, force: bool = False) -> float | None:
        if not self.link.up:
            return await self.local.take(ticket, now, force)
        names, needs = list(ticket.needs), [str(v) for v in ticket.needs.values()]
        try:
            answer = await self._take(keys=self._keys(ticket),
                                      args=[now, now + self.lease, ticket.id, "1" if force else "0", *names, *needs])
        except (RedisError, OSError) as exc:
            self.link.failed(exc)
            return await self.local.take(ticket, now, force)
        self.link.worked()
        until = float(answer)
        if until:
            self._listen()
        return until or None

    async def report(self, ticket, buckets: dict) -> None:
        """Kept here at once; sent to Redis without holding the answer up."""
        self.local.remember(ticket.key, buckets)
        task = asyncio.get_running_loop().create_task(self._send_report(ticket, buckets))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_report(self, ticket, buckets: dict) -> None:
        read = [str(x) for name, (limit, remaining, reset) in buckets.items() for x in (name, limit, remaining, reset)]
        try:
            await self._report(keys=self._keys(ticket), args=[time.time(), ticket.id, len(buckets), *read,
                                                              *ticket.needs.values()])
            await self.link.redis.publish(self._channel, "1")
        except (RedisError, OSError) as exc:
            self.link.failed(exc)

    def give_back(self, ticket) -> None:
        self.local.give_back(ticket)
        task = asyncio.get_running_loop().create_task(self._send_report(ticket, {}))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _listen(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(
                subscribe(self.link, self._channel, lambda: self.on_report()))
            self.on_report()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class RedisCheckpoints:
    """Checkpointed conversations mirrored to Redis, for agents restarted on another machine."""

    def __init__(self, link: RedisLink):
        self.link = link

    async def append(self, sid: str, messages: list[dict], meta: dict) -> None:
        if not self.link.up:
            return
        try:
            async with self.link.redis.pipeline(transaction=True) as pipe:
                key = self.link.key("session", sid)
                pipe.delete(key + ":messages").rpush(key + ":messages", *[orjson.dumps(m) for m in messages])
                pipe.set(key, orjson.dumps({**meta, "updated": time.time(), "messages": len(messages)}))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.link.failed(exc)
