"""The hourly budget of an SMTP account and the daily budget of a manager, in Redis.

One Lua script reads both counters — the account's clock hour and the
manager's local day — and adds to both at most what is left in either, so the
two are reserved together, atomically: any number of governors in any number
of processes never push an hour or a day past its limit. A reserved token is
spent whether or not its send succeeds (MISSION: better to under-send than to
exceed the provider's limit). Only tokens that were never handed out — the
monthly quota could not cover them — are given back (``give_back``).

Redis down: the limiter FAILS OPEN — it grants what was asked, logs ERROR with
``policy="fail_open"`` and counts it in ``mailer_rate_limiter_redis_errors_total``
— because stopping every campaign for a cache outage costs more than a possible
overshoot the provider would refuse anyway. Working hours and the monthly quota
(PostgreSQL) still apply then. (The API throttles make the opposite choice; see
``throttle``.)

Redis back empty (a restart without persistence): a missing counter whose
previous window's counter is missing too is rebuilt from the send log
(``SpentTokens``) inside the reserving script, logged at WARNING and counted
in ``mailer_rate_counter_rebuilds_total{window}`` — so a lost Redis does not
hand out the hour and the day a second time.

Keys: ``<prefix>rate:<account>:<YYYYMMDDHH UTC>``,
``<prefix>daily:<owner>:<YYYYMMDD local>`` and ``<prefix>askers:<account>`` (the
campaigns sharing the hour fairly), ``<prefix>shares:rate:<account>:<hour>``
(what each got of it). Under Redis Cluster all keys of a script must share a
slot: give ``MAILER_REDIS_KEY_PREFIX`` a hash tag (``{mailer}:``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Protocol

import asyncpg
import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

from mailer import metrics
from mailer.clock import utc
from mailer.db import Q

__all__ = [
    "FAIL_OPEN",
    "PgSpentTokens",
    "Reservation",
    "SendLimiter",
    "SpentTokens",
    "hour_start",
    "max_min_shares",
]

log = logging.getLogger("mailer.ratelimit")

FAIL_OPEN = "fail_open"

# Campaigns that asked within this many seconds share what is left of the hour.
FAIR_SHARE_WINDOW_SECONDS = 30.0

# An hour's counter outlives its hour (clock skew between pods); a day's
# counter outlives the longest local day (25 h on a DST change).
_HOUR_TTL_SECONDS = 2 * 3600
_DAY_TTL_SECONDS = 2 * 86400

# KEYS[1] the account's hour counter, KEYS[2] the manager's day counter,
# KEYS[3] the campaigns that asked lately (a sorted set scored by time),
# KEYS[4] what each campaign got this hour (a hash), KEYS[5] and KEYS[6] the
# previous hour's and the previous day's counters (read only: see Seeds).
# ARGV: wanted, hour limit, hour ttl, day limit (0: none), day ttl, campaign
# id, now (epoch seconds), fair-share window (seconds), campaigns competing
# for the hour by the queue's count, the hour's and the day's seed (-1: not
# known yet).
# Returns {granted, hour used after, day used after, capped, seeded}. The day
# is counted even without a limit, so that a limit switched on mid-day sees the
# day's sends.
#
# Seeds: a missing counter is either a window nobody used yet or one whose
# Redis lost its data. While the previous window's counter (KEYS[5] the last
# hour, KEYS[6] the owner's last day) is there, Redis kept its data: the
# window is new and starts at 0. (Not the send log: a batch granted at 10:59
# is recorded after 11:00, in the next hour's rows.) Both missing: the script
# does not guess — it reserves nothing and answers {-1, hour missing, day
# missing}; the caller counts the windows' sends in the send log and asks
# again with the seeds. (With the previous window unused, no late record of
# it can be in this one's rows.) A counter that appeared meanwhile — another
# governor seeded it — is kept and the seed ignored: SET only where the key
# is still missing, in the same script as the reservation, so a seed never
# overwrites counted tokens.
# ``seeded``: 1 the hour, 2 the day, 3 both were rebuilt from a non-zero seed.
#
# Fair share, work-conserving (several campaigns at once): ARGV[12] is the
# asker's part of the whole hour, split by max-min fairness over the demands
# of the campaigns sharing it (``max_min_shares``, computed by the caller from
# the queue); its share is that less what it already had (KEYS[4]). So what a
# campaign cannot use (small, finished, deferred or paused: then it is no
# longer among them) goes to the others within the same hour. ARGV[12] = -1:
# the older rule — limit/askers each, the askers being those that asked
# within the window, or more if the queue says so.
# ``capped`` = 1 when only its share refused while the hour still has room
# (the share grows as others finish).
# The body runs as a Lua function of its own KEYS and ARGV (shadowing the
# globals), so one reservation and a batch of them share the very same code.
_RESERVE_FN = (
    "local function reserve(KEYS, ARGV)\n"
    + """
local want = tonumber(ARGV[1])
local hour_limit = tonumber(ARGV[2])
local hour_seed = tonumber(ARGV[10])
local day_seed = tonumber(ARGV[11])
local hour_missing = redis.call('EXISTS', KEYS[1]) == 0
local day_missing = redis.call('EXISTS', KEYS[2]) == 0
if hour_missing and redis.call('EXISTS', KEYS[5]) == 1 then
  hour_seed = 0
end
if day_missing and redis.call('EXISTS', KEYS[6]) == 1 then
  day_seed = 0
end
if (hour_missing and hour_seed < 0) or (day_missing and day_seed < 0) then
  return {-1, hour_missing and 1 or 0, day_missing and 1 or 0, 0, 0}
end
local seeded = 0
if hour_missing then
  redis.call('SET', KEYS[1], hour_seed, 'EX', tonumber(ARGV[3]))
  if hour_seed > 0 then seeded = seeded + 1 end
end
if day_missing then
  redis.call('SET', KEYS[2], day_seed, 'EX', tonumber(ARGV[5]))
  if day_seed > 0 then seeded = seeded + 2 end
end
local hour_used = tonumber(redis.call('GET', KEYS[1]))
local day_used = tonumber(redis.call('GET', KEYS[2]))
local now = tonumber(ARGV[7])
local window = tonumber(ARGV[8])
redis.call('ZADD', KEYS[3], now, ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
redis.call('EXPIRE', KEYS[3], math.ceil(window * 2))
local askers = math.max(1, redis.call('ZCARD', KEYS[3]), tonumber(ARGV[9]))
local mine = tonumber(redis.call('HGET', KEYS[4], ARGV[6]) or '0')
local left = hour_limit - hour_used
local share = math.ceil(hour_limit / askers) - mine
local fair = tonumber(ARGV[12] or '-1')
if fair >= 0 then
  share = fair - mine
end
local grant = math.min(want, left, share)
local day_limit = tonumber(ARGV[4])
if day_limit > 0 then
  grant = math.min(grant, day_limit - day_used)
end
if grant <= 0 then
  local capped = 0
  if left > 0 and share <= 0 and (day_limit == 0 or day_used < day_limit) then
    capped = 1
  end
  return {0, hour_used, day_used, capped, seeded}
end
hour_used = redis.call('INCRBY', KEYS[1], grant)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
day_used = redis.call('INCRBY', KEYS[2], grant)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
redis.call('HINCRBY', KEYS[4], ARGV[6], grant)
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[3]))
return {grant, hour_used, day_used, 0, seeded}
"""
    + "end\n"
)
_RESERVE = _RESERVE_FN + "return reserve(KEYS, ARGV)\n"
# Many reservations in one call (``SendLimiter`` batches the concurrent ones).
# KEYS: every key the batch touches, once; ARGV: one string a reservation,
# "<key numbers>;<args>" (comma-separated: the 6 keys' indexes into KEYS, then
# the 12 args) — a few strings to encode instead of 18 values a request,
# and every key still declared (Redis Cluster). They run one after the other,
# exactly as that many calls in a row would, in one round trip; the result is
# one string, the 5 numbers of each in turn, comma-separated.
_RESERVE_BATCH = (
    _RESERVE_FN
    + """
local out = {}
for i = 1, #ARGV do
  local spec = ARGV[i]
  local sep = string.find(spec, ';', 1, true)
  local k, a = {}, {}
  for x in string.gmatch(string.sub(spec, 1, sep - 1), '[^,]+') do
    k[#k + 1] = KEYS[tonumber(x)]
  end
  for x in string.gmatch(string.sub(spec, sep + 1), '[^,]+') do
    a[#a + 1] = x
  end
  local r = reserve(k, a)
  for j = 1, 5 do out[#out + 1] = r[j] end
end
return table.concat(out, ',')
"""
)
# At most this many reservations in one script call (its run blocks Redis).
_BATCH_MAX = 256

# KEYS: the hour and day counters, then the shares hash; ARGV: tokens to give
# back, campaign id. A missing key is left alone (DECRBY would create it
# without a TTL), and no counter goes below zero.
_GIVE_BACK = """
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local left = redis.call('DECRBY', KEYS[i], tonumber(ARGV[1]))
    if left < 0 then
      redis.call('INCRBY', KEYS[i], -left)
    end
  end
end
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then
  local left = redis.call('HINCRBY', KEYS[3], ARGV[2], -tonumber(ARGV[1]))
  if left < 0 then
    redis.call('HINCRBY', KEYS[3], ARGV[2], -left)
  end
end
return 0
"""


def max_min_shares(capacity: int, demands: Sequence[int]) -> list[int]:
    """Splits ``capacity`` by max-min fairness over ``demands`` (in queue order).

    Whoever wants no more than an equal part of what is left gets all it
    wants; the others share the rest equally, the remainder one each to the
    first in queue order. The same rule as ``_RESERVE``'s, for the forecast.
    """
    alloc = [0] * len(demands)
    order = sorted(range(len(demands)), key=lambda k: (demands[k], k))
    remaining, others = capacity, len(demands)
    for pos, k in enumerate(order):
        level = remaining // others
        if demands[k] <= level:
            alloc[k] = demands[k]
            remaining -= demands[k]
            others -= 1
            continue
        rest = sorted(order[pos:])
        extra = remaining - level * others
        for r, j in enumerate(rest):
            alloc[j] = level + (1 if r < extra else 0)
        break
    return alloc


def hour_start(now: datetime) -> datetime:
    return now.replace(minute=0, second=0, microsecond=0)


class SpentTokens(Protocol):
    """What a window already spent, from the source of truth: rebuilds a lost counter."""

    async def hour_spent(self, start: datetime, end: datetime) -> int: ...

    async def day_spent(self, owner_id: str, day: date) -> int: ...


class PgSpentTokens:
    """The send log's count of a window's attempts (each took one token).

    It cannot see tokens granted to a batch not yet recorded, nor those of
    granted recipients released unsent (an expired grant): a rebuilt counter
    may be short by those, never long.
    """

    def __init__(self, pool: asyncpg.Pool, tz: tzinfo, account: str = "") -> None:
        self._pool = pool
        self._tz = tz
        self._account = account  # the hour is the account's ('' the default's)

    async def hour_spent(self, start: datetime, end: datetime) -> int:
        return int(await self._pool.fetchval(Q["spent-tokens-hour"], start, end, self._account))

    async def day_spent(self, owner_id: str, day: date) -> int:
        start = datetime.combine(day, time(), self._tz)
        end = datetime.combine(day + timedelta(days=1), time(), self._tz)
        return int(await self._pool.fetchval(Q["spent-tokens-day"], owner_id, start, end))


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    granted: int
    hour_used: int
    hour_limit: int
    day_used: int
    day_limit: int  # 0: no daily limit
    # The start of the next clock hour: when a refused hourly window reopens.
    next_hour: datetime
    hour_key: str
    day_key: str
    shares_key: str = ""
    campaign_id: int = 0
    # Refused only by the campaign's fair share while the hour has room.
    capped: bool = False
    failed_open: bool = False

    @property
    def refused_by(self) -> str | None:
        """Why nothing was granted: ``daily_limit`` or ``rate_per_hour`` (None if granted).

        When both are used up the day is named: its wait contains the hour's,
        and a campaign woken at the next hour would only be refused again.
        """
        if self.granted > 0:
            return None
        if self.day_limit and self.day_used >= self.day_limit:
            return "daily_limit"
        return "rate_per_hour"


class SendLimiter:
    def __init__(
        self, client: redis.Redis, *, key_prefix: str, account: str, hourly_limit: int
    ) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._hour_prefix = f"{key_prefix}rate:{account}:"
        self._askers_key = f"{key_prefix}askers:{account}"
        self.hourly_limit = hourly_limit
        self._reserve = client.register_script(_RESERVE)
        self._reserve_batch = client.register_script(_RESERVE_BATCH)
        # Reservations waiting for the next batch, and the task sending them.
        self._pending: list[tuple[list[str], list[int | float], asyncio.Future[list[int]]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._give_back = client.register_script(_GIVE_BACK)

    def hour_key(self, now: datetime) -> str:
        return self._hour_prefix + utc(now).strftime("%Y%m%d%H")

    def day_key(self, owner_id: str, day: date) -> str:
        return f"{self._prefix}daily:{owner_id}:{day.strftime('%Y%m%d')}"

    async def reserve(
        self,
        want: int,
        now: datetime,
        *,
        owner_id: str,
        day: date,
        daily_limit: int,
        campaign_id: int = 0,
        competing: int = 1,
        fair_share: int | None = None,
        spent: SpentTokens | None = None,
    ) -> Reservation:
        """Reserves up to ``want`` tokens of this hour and of ``owner_id``'s ``day``,
        at most ``campaign_id``'s fair share of the hour's rest (shared with at
        least ``competing`` campaigns). ``fair_share``: the asker's max-min part
        of the whole hour (``max_min_shares``) instead — work-conserving.

        ``spent`` rebuilds a missing counter from the send log (see ``_RESERVE``);
        without it a missing counter starts at 0.
        """
        next_hour = hour_start(utc(now)) + timedelta(hours=1)
        hour_key, day_key = self.hour_key(now), self.day_key(owner_id, day)
        shares_key = f"{self._prefix}shares:{hour_key.removeprefix(self._prefix)}"
        hour_seed = day_seed = -1 if spent is not None else 0

        async def run() -> list[int]:
            return await self._batched(
                [
                    hour_key,
                    day_key,
                    self._askers_key,
                    shares_key,
                    self.hour_key(now - timedelta(hours=1)),
                    self.day_key(owner_id, day - timedelta(days=1)),
                ],
                [
                    want,
                    self.hourly_limit,
                    _HOUR_TTL_SECONDS,
                    daily_limit,
                    _DAY_TTL_SECONDS,
                    campaign_id,
                    utc(now).timestamp(),
                    FAIR_SHARE_WINDOW_SECONDS,
                    max(1, competing),
                    hour_seed,
                    day_seed,
                    -1 if fair_share is None else fair_share,
                ],
            )

        try:
            granted, hour_used, day_used, capped, seeded = await run()
            if granted < 0:
                assert spent is not None
                # A counter is missing: count both windows in the log (a seed is
                # used only where its key is still missing when the script runs).
                hour_seed = await spent.hour_spent(hour_start(utc(now)), next_hour)
                day_seed = await spent.day_spent(owner_id, day)
                granted, hour_used, day_used, capped, seeded = await run()
        except (RedisError, OSError) as exc:
            metrics.RATE_LIMITER_REDIS_ERRORS.labels(policy=FAIL_OPEN).inc()
            log.error(
                "rate limiter cannot reach Redis; sending anyway",
                # Whose sends went uncounted (ids, no address): what an operator (and
                # the chaos suite) needs to tell a fail-open overshoot from a defect.
                extra={
                    "policy": FAIL_OPEN,
                    "error": repr(exc),
                    "rate_limit_count": want,
                    "owner_id": owner_id,
                    "campaign_id": campaign_id,
                },
            )
            return Reservation(
                granted=want,
                hour_used=0,
                hour_limit=self.hourly_limit,
                day_used=0,
                day_limit=daily_limit,
                next_hour=next_hour,
                hour_key=hour_key,
                day_key=day_key,
                failed_open=True,
            )
        if seeded & 1:
            self._rebuilt("hour", hour_key, hour_seed)
        if seeded & 2:
            self._rebuilt("day", day_key, day_seed)
        return Reservation(
            granted=granted,
            hour_used=hour_used,
            hour_limit=self.hourly_limit,
            day_used=day_used,
            day_limit=daily_limit,
            next_hour=next_hour,
            hour_key=hour_key,
            day_key=day_key,
            shares_key=shares_key,
            campaign_id=campaign_id,
            capped=bool(capped),
        )

    async def _batched(self, keys: list[str], args: list[int | float]) -> list[int]:
        """One reservation, sent with whatever others are waiting (one script call).

        While a call is with Redis, the reservations that arrive queue up and
        go together in the next one: one round trip for many requests, each
        still atomic and in arrival order (the script runs them one by one).
        """
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._pending.append((keys, args, future))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:_BATCH_MAX], self._pending[_BATCH_MAX:]
                numbers: dict[str, str] = {}
                specs: list[str] = []
                for keys, args, _ in batch:
                    at = [numbers.setdefault(k, str(len(numbers) + 1)) for k in keys]
                    specs.append(",".join(at) + ";" + ",".join(map(str, args)))
                try:
                    raw = await self._reserve_batch(keys=list(numbers), args=specs)
                    flat = (raw.decode() if isinstance(raw, bytes) else str(raw)).split(",")
                except BaseException as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for n, (_, _, future) in enumerate(batch):
                    if not future.done():
                        future.set_result([int(v) for v in flat[n * 5 : n * 5 + 5]])
        finally:
            self._flusher = None

    @staticmethod
    def _rebuilt(window: str, key: str, seed: int) -> None:
        metrics.RATE_COUNTER_REBUILDS.labels(window=window).inc()
        log.warning(
            "rate counter was missing and rebuilt from the send log (Redis lost its data?)",
            # The key names the owner for a day: an id, not an address.
            extra={"window": window, "key": key, "rate_limit_count": seed},
        )

    async def give_back(self, r: Reservation, n: int) -> Reservation:
        """Returns ``n`` reserved tokens that were never handed out; the updated view.

        Best effort: if Redis fails here the tokens stay spent, which under-sends
        (the safe side) until the hour or the day ends.
        """
        n = min(n, r.granted)
        if n <= 0:
            return r
        updated = msgspec.structs.replace(
            r,
            granted=r.granted - n,
            hour_used=max(0, r.hour_used - n),
            day_used=max(0, r.day_used - n),
        )
        if r.failed_open:  # nothing was counted, nothing to give back
            return updated
        try:
            await self._give_back(
                keys=[r.hour_key, r.day_key, r.shares_key],
                args=[n, r.campaign_id],
            )
        except (RedisError, OSError) as exc:
            metrics.RATE_LIMITER_REDIS_ERRORS.labels(policy=FAIL_OPEN).inc()
            log.error(
                "rate limiter could not give back unused tokens",
                extra={"policy": FAIL_OPEN, "error": repr(exc), "rate_limit_count": n},
            )
        return updated

    async def hour_used(self, now: datetime) -> int:
        value = await self._redis.get(self.hour_key(now))
        return int(value or 0)

    async def day_used(self, owner_id: str, day: date) -> int:
        value = await self._redis.get(self.day_key(owner_id, day))
        return int(value or 0)
