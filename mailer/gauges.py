"""Gauges read from the source of truth when Prometheus scrapes ``/metrics``.

The backlog (``mailer_recipients_pending``, ``mailer_recipients_sendable``), why campaigns
wait (``mailer_campaigns_waiting{reason}``), each account's quota left
(``mailer_quota_emails_available{account}``), the hour's budget used
(``mailer_rate_hour_used{account}`` and its limit) and whether the dependencies answer
(``mailer_dependency_up``) are facts of PostgreSQL and Redis, not of one process: every
process reads them on its own scrape, so there is no leader-only gauge that goes stale on a
follower and no timer that polls. ``refresh`` runs before the exposition is rendered:

* PostgreSQL and Redis are asked in parallel, each within ``timeout`` seconds;
* scrapes closer together than ``min_interval`` seconds (several Prometheus replicas, a
  person with curl) share the last reading;
* a failed read sets that dependency's ``mailer_dependency_up`` to 0 and leaves the gauges
  it feeds at their last values (a scrape never fails because a dependency does);
* ``smtp`` is not probed here: opening an SMTP session per scrape would cost the provider a
  connection each time; the transport reports its own sessions (``mailer.smtphealth``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final, Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from mailer import metrics
from mailer.clock import Clock
from mailer.db import Q

__all__ = ["ScrapeGauges"]

log = logging.getLogger("mailer.gauges")

DEFAULT_MIN_INTERVAL: Final = 5.0
DEFAULT_TIMEOUT: Final = 2.0


class _Pool(Protocol):
    async def fetchrow(self, query: str, *args: Any) -> Any: ...
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...


class ScrapeGauges:
    def __init__(
        self,
        *,
        pool: _Pool,
        redis_client: redis.Redis,
        nats_connected: Callable[[], bool],
        hour_key: Callable[[datetime], str],
        account: str,
        hourly_limit: int,
        clock: Clock,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        more_accounts: Sequence[tuple[str, Callable[[datetime], str], int]] = (),
    ) -> None:
        """``more_accounts``: (name, hour key, hourly limit) of every SMTP account
        besides ``account``, each with its own ``account`` label."""
        self._pool = pool
        self._redis = redis_client
        self._nats_connected = nats_connected
        self._hour_key = hour_key
        self._account = account
        self._clock = clock
        self._min_interval = min_interval
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._last: float | None = None
        self._accounts = [(account, hour_key, hourly_limit), *more_accounts]
        # The quota row's key -> the account's name: '' is the default's (mailer.accounts).
        self._quota_keys = {"": account, **{name: name for name, _, _ in more_accounts}}
        for name, _, limit in self._accounts:
            metrics.RATE_HOUR_LIMIT.labels(account=name).set(limit)
            metrics.RATE_HOUR_USED.labels(account=name)

    async def refresh(self) -> None:
        """Reads everything once, unless a reading younger than ``min_interval`` exists."""
        async with self._lock:  # concurrent scrapes wait for one reading
            if self._last is not None and time.monotonic() - self._last < self._min_interval:
                return
            now = self._clock.now()
            metrics.DEPENDENCY_UP.labels(dependency="nats").set(int(self._nats_connected()))
            await asyncio.gather(self._read_postgres(now), self._read_redis(now))
            self._last = time.monotonic()

    async def _read_postgres(self, now: datetime) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                backlog = await self._pool.fetchrow(Q["gauges-backlog"], now)
                waiting = await self._pool.fetch(Q["gauges-waiting"], now)
                quotas = await self._pool.fetch(Q["gauges-quota"])
        except Exception as exc:  # asyncpg's errors, OSError, a timeout: all mean "down"
            metrics.DEPENDENCY_UP.labels(dependency="postgres").set(0)
            log.debug("gauges: PostgreSQL not read", extra={"error": repr(exc)})
            return
        metrics.DEPENDENCY_UP.labels(dependency="postgres").set(1)
        metrics.RECIPIENTS_PENDING.set(backlog["pending"])
        metrics.RECIPIENTS_SENDABLE.set(backlog["sendable"])
        for row in quotas:
            # A row of an account the configuration dropped (or no longer the default's
            # own) since is not this process's to show.
            name = self._quota_keys.get(row["account"])
            if name is not None:
                metrics.QUOTA_AVAILABLE.labels(account=name).set(row["emails_available"])
        counts = dict.fromkeys(metrics.WAITING_REASONS, 0)
        counts.update({row["reason"]: row["campaigns"] for row in waiting})
        for reason, n in counts.items():
            metrics.CAMPAIGNS_WAITING.labels(reason=reason).set(n)

    async def _read_redis(self, now: datetime) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                used = [await self._redis.get(key(now)) for _, key, _ in self._accounts]
        except (RedisError, OSError, TimeoutError) as exc:
            metrics.DEPENDENCY_UP.labels(dependency="redis").set(0)
            log.debug("gauges: Redis not read", extra={"error": repr(exc)})
            return
        metrics.DEPENDENCY_UP.labels(dependency="redis").set(1)
        for (name, _, _), n in zip(self._accounts, used, strict=True):
            metrics.RATE_HOUR_USED.labels(account=name).set(int(n or 0))
