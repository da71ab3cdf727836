"""API throttles: how often one manager may start campaigns or send test emails.

A sliding window per (action, user): a Redis sorted set of the moments of the
last hour's accepted requests. One Lua script drops the old moments, counts
and adds the new one, so concurrent requests from any number of pods never
let more than ``limit`` through in any hour -- a fixed clock-hour window
would allow twice the limit across an hour boundary. A refused request is
not recorded (it does not push the window further out), and the reply says
when the oldest moment leaves the window.

Redis down: the throttles FAIL CLOSED -- the request is refused with
``throttle_backend_unavailable`` ("Сервис временно недоступен. Попробуйте
позже.") and an ERROR log with ``policy="fail_closed"``. A start or a test
email can wait a few minutes; letting an unthrottled burst through cannot be
undone. (The send-rate limiter makes the opposite choice and fails open, see
``mailer.ratelimit``: there, stopping every campaign for a cache outage costs
more.)
"""

from __future__ import annotations

import logging
import math
import secrets
from datetime import datetime, timedelta

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

from mailer import metrics
from mailer.errors import Throttled, Unavailable

__all__ = ["FAIL_CLOSED", "Decision", "Throttle"]

log = logging.getLogger("mailer.throttle")

FAIL_CLOSED = "fail_closed"

# KEYS[1] the user's window; ARGV: now (ms), window (ms), limit, a unique member.
# Returns {allowed (0/1), requests in the window, ms when the oldest leaves it}.
_HIT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, n + 1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, n, tonumber(oldest[2]) + window}
"""


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    allowed: bool
    used: int
    limit: int
    # When a refused request may succeed (None when allowed).
    retry_at: datetime | None
    # The slot an allowed request took, for ``give_back`` (None when refused).
    slot: str | None = None


class Throttle:
    """At most ``limit`` requests of one ``action`` per user in any ``window``."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        key_prefix: str,
        action: str,
        limit: int,
        window: timedelta = timedelta(hours=1),
    ) -> None:
        self._redis = client
        self._prefix = f"{key_prefix}throttle:{action}:"
        self.action = action
        self.limit = limit
        self._window_ms = int(window.total_seconds() * 1000)
        self._script = client.register_script(_HIT)

    def key(self, user: str) -> str:
        return self._prefix + user

    async def hit(self, user: str, now: datetime) -> Decision:
        """Counts one request if the window has room. Raises Unavailable when Redis is down."""
        now_ms = int(now.timestamp() * 1000)
        member = f"{now_ms}-{secrets.token_hex(6)}"
        try:
            allowed, used, reopens_ms = await self._script(
                keys=[self.key(user)], args=[now_ms, self._window_ms, self.limit, member]
            )
        except (RedisError, OSError) as exc:
            metrics.API_THROTTLE_REDIS_ERRORS.labels(policy=FAIL_CLOSED, action=self.action).inc()
            log.error(
                "API throttle cannot reach Redis; refusing the request",
                extra={"policy": FAIL_CLOSED, "action": self.action, "error": repr(exc)},
            )
            raise Unavailable("throttle_backend_unavailable") from None
        if allowed:
            return Decision(
                allowed=True, used=int(used), limit=self.limit, retry_at=None, slot=member
            )
        retry_at = datetime.fromtimestamp(int(reopens_ms) / 1000, tz=now.tzinfo)
        return Decision(allowed=False, used=int(used), limit=self.limit, retry_at=retry_at)

    async def give_back(self, user: str, slot: str) -> None:
        """Frees the slot of a request that was counted but then refused further on
        (a governor's refusal of a test email, a start that lost a race): only what
        was done counts. Best effort: Redis down, the slot simply ages out."""
        try:
            await self._redis.zrem(self.key(user), slot)
        except (RedisError, OSError) as exc:
            log.warning(
                "throttle slot not given back",
                extra={"action": self.action, "error": repr(exc)},
            )

    async def check(self, user: str, now: datetime) -> str:
        """Counts one request or raises Throttled (with when to retry) / Unavailable.

        Returns the slot taken, for ``give_back``.
        """
        d = await self.hit(user, now)
        if d.allowed:
            assert d.slot is not None
            return d.slot
        assert d.retry_at is not None
        minutes = max(1, math.ceil((d.retry_at - now).total_seconds() / 60))
        raise Throttled(
            text_key=f"throttled_{self.action}",
            action=self.action,
            limit=self.limit,
            minutes=minutes,
            retry_at=d.retry_at.isoformat(),
        )
