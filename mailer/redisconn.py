"""The process's Redis client, and how its health is seen.

redis-py's ``Redis.from_url`` builds its own connection pool, and such a pool's connections
get no retry policy at all (the constructor's default ``Retry`` applies only when it builds
the pool itself). A Redis restart then leaves every pooled connection dead, and the first
command on each fails with "Connection closed by server": the first ``campaign.start`` after
a restart was refused with 503. So the client here:

* retries a command once or twice on ``ConnectionError`` (a new connection each time), with
  a short backoff. Not on timeouts: a Lua script that timed out may have run, and running a
  reservation twice would count tokens twice. A ``ConnectionError`` on a pooled connection
  means the server had closed it before our command, so the retry does not repeat anything;
* checks an idle connection with a PING before reusing it (``health_check_interval``).

``redis_up`` is the one health check (start-up WARNING, readiness body, the dependency gauge).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

__all__ = ["REDIS_CHECK_TIMEOUT", "connect_redis", "redis_up"]

log = logging.getLogger("mailer.redis")

# A socket read or connect that takes longer is a failure: the limiter fails open and the
# API throttles fail closed rather than hold a request.
SOCKET_TIMEOUT: Final = 2.0
RETRIES: Final = 2
# A connection idle this long is PINGed (with the same retry) before a command uses it.
HEALTH_CHECK_INTERVAL: Final = 15
REDIS_CHECK_TIMEOUT: Final = 1.0


def connect_redis(url: str) -> redis.Redis:
    """A client with the retry policy above; connections open lazily."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
        retry_on_error=[RedisConnectionError],
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )


async def redis_up(client: redis.Redis, *, timeout: float = REDIS_CHECK_TIMEOUT) -> bool:
    """True when Redis answers a PING within ``timeout`` seconds; never raises."""
    try:
        async with asyncio.timeout(timeout):
            return bool(await client.ping())
    except (RedisError, OSError, TimeoutError):
        return False
