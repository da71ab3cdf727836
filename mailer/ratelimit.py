"""The hourly send budget of an SMTP account, reserved atomically in Redis.

One Lua script reads the hour's counter and adds at most what is left, so any
number of governors in any number of processes never push an hour past its
limit. A reserved token is spent whether or not its send succeeds (MISSION:
better to under-send than to exceed the provider's limit).

Redis down: the limiter FAILS OPEN — it grants what was asked, logs ERROR with
``policy="fail_open"`` and counts it — because stopping every campaign for a
cache outage costs more than a possible overshoot the provider would refuse
anyway. (The API throttles make the opposite choice; see ``throttle``.)
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

from mailer import metrics

__all__ = ["FAIL_OPEN", "HourlyLimiter", "Reservation", "hour_start"]

log = logging.getLogger("mailer.ratelimit")

FAIL_OPEN = "fail_open"

# KEYS[1] counter of the hour; ARGV: limit, wanted, ttl seconds.
# Returns {granted, used after the grant}.
_RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local limit = tonumber(ARGV[1])
local grant = math.min(tonumber(ARGV[2]), limit - used)
if grant <= 0 then
  return {0, used}
end
used = redis.call('INCRBY', KEYS[1], grant)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {grant, used}
"""


def hour_start(now: datetime) -> datetime:
    return now.replace(minute=0, second=0, microsecond=0)


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    granted: int
    used: int
    limit: int
    # When the next window opens (only meaningful when granted < wanted).
    retry_at: datetime
    failed_open: bool = False


class HourlyLimiter:
    def __init__(self, client: redis.Redis, *, key_prefix: str, account: str, limit: int) -> None:
        self._redis = client
        self._prefix = f"{key_prefix}rate:{account}:"
        self.limit = limit
        self._script = client.register_script(_RESERVE)

    def key(self, now: datetime) -> str:
        return self._prefix + now.strftime("%Y%m%d%H")

    async def reserve(self, want: int, now: datetime) -> Reservation:
        start = hour_start(now)
        next_hour = start + timedelta(hours=1)
        try:
            granted, used = await self._script(keys=[self.key(now)], args=[self.limit, want, 7200])
        except (RedisError, OSError) as exc:
            metrics.RATE_LIMITER_REDIS_ERRORS.labels(policy=FAIL_OPEN).inc()
            log.error(
                "rate limiter cannot reach Redis; sending anyway",
                extra={"policy": FAIL_OPEN, "error": repr(exc), "rate_limit_count": want},
            )
            return Reservation(
                granted=want, used=0, limit=self.limit, retry_at=next_hour, failed_open=True
            )
        return Reservation(
            granted=int(granted), used=int(used), limit=self.limit, retry_at=next_hour
        )

    async def used(self, now: datetime) -> int:
        value = await self._redis.get(self.key(now))
        return int(value or 0)
