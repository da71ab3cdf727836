"""The provider's monthly allowance: where it is kept, taken, and synced from.

PostgreSQL's one ``quota`` row is the number the rate governor takes from: in
blocks under load, each a row of the ``quota_block`` ledger (``QuotaBlocks``),
one token per granted send. A ``QuotaSyncActor`` replaces
it with the provider's own count on start, every
``quota_sync_interval_seconds`` and on ``SyncNow``. Providers are pluggable:

* ``local`` — ``monthly_quota`` minus this calendar month's sends (send-log
  rows ``sent`` or ``in_doubt``, test emails included; the month of the
  configured timezone).
* ``http`` — GET ``quota_http_url`` with ``Authorization: Bearer <token>``;
  the number sits at the dotted path ``quota_http_field`` of the JSON reply
  (``data.emails_available``), so another provider's API is a setting away.

A sync must not hand back tokens already granted to a batch in flight, or a
month's last emails could go out twice over. So the new number is written
under the quota row's lock — no governor takes meanwhile — minus the
recipients claimed for sending right now (granted or about to be), and minus
the sends recorded since the count was taken: for ``local`` the month's, for
``http`` those since the provider was asked (a batch recorded while the
provider answered is in neither its count nor the claimed rows). A batch is
counted either as claimed or as sent, never as neither. The unused part of
the governors' live blocks is subtracted too: it is quota they hold. This errs on the safe
side: a claimed batch the governor has not yet served is subtracted before
its tokens are taken, and a send the provider had already counted may be
subtracted again (under-sending until the next sync). Not covered: a test
email between its grant and its send-log row, and a provider whose count lags
its own acceptance of mail.

A failed sync keeps the last numbers, records ``sync_error`` and leaves
``last_synced_at`` at the last success: together they say how old the number
is and why. A sync that takes the allowance from 0 to more calls
``on_restored`` — the campaigns deferred with ``quota_exhausted`` resume with
nobody acting (``lift_deferrals`` is the store half of that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, tzinfo
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import msgspec
from nats.aio.msg import Msg

from mailer.actors.runtime import Actor, MailboxFull
from mailer.bus import ERROR_CODE_HEADER, Bus, encode
from mailer.clock import Clock
from mailer.config import Settings
from mailer.db import Q
from mailer.messages import ErrorBody, ErrorReply
from mailer.rules import month_bounds

__all__ = [
    "HttpQuotaProvider",
    "LocalQuotaProvider",
    "PgQuota",
    "ProviderReading",
    "QuotaBlocks",
    "QuotaError",
    "QuotaProvider",
    "QuotaState",
    "QuotaSyncActor",
    "SyncNow",
    "lift_deferrals",
    "provider_from_settings",
]

log = logging.getLogger("mailer.quota")

HTTP_TIMEOUT_SECONDS = 10.0
# sync_error is for a person to read; a provider's whole error page is not.
_MAX_ERROR_CHARS = 500


class QuotaState(msgspec.Struct, frozen=True, kw_only=True):
    """The quota row as an operator sees it."""

    emails_available: int
    monthly_limit: int | None  # None: the provider does not say
    last_synced_at: datetime | None
    sync_error: str | None


class ProviderReading(msgspec.Struct, frozen=True, kw_only=True):
    emails_available: int
    monthly_limit: int | None = None  # None: the provider does not say (shown as null)
    # A reading of the local provider: an operator's quota.set overrides it.
    local: bool = False
    # [start, end): sends recorded in this period are subtracted when the
    # reading is written (``local``: the month's; ``http``: since the provider
    # was asked, end None). Counted under the quota's lock, with the claims.
    minus_sent_between: tuple[datetime, datetime | None] | None = None


class QuotaError(Exception):
    """The provider's answer cannot be used; the text goes to ``sync_error``."""


def _state(row: asyncpg.Record) -> QuotaState:
    return QuotaState(
        emails_available=row["emails_available"],
        monthly_limit=row["monthly_limit"],
        last_synced_at=row["last_synced_at"],
        sync_error=row["sync_error"],
    )


class PgQuota:
    """The quota row in PostgreSQL: what the governor takes from and a sync writes."""

    def __init__(self, pool: asyncpg.Pool, account: str = "", *, name: str | None = None) -> None:
        self._pool = pool
        # The account's row ('' the default's: mailer.accounts.Account.key), and
        # with several accounts its name: a sync subtracts its campaigns' claims only.
        self._account = account
        self._name = name

    async def ensure(self, monthly: int) -> None:
        """Creates the account's row (with ``monthly``) if it has none yet."""
        await self._pool.execute(Q["quota-ensure"], self._account, monthly)

    async def take(self, n: int) -> int:
        """Takes up to ``n`` emails atomically; returns how many (0: exhausted)."""
        if n <= 0:
            return 0
        row = await self._pool.fetchrow(Q["quota-take"], n, self._account)
        return 0 if row is None else int(row["taken"])

    async def available(self) -> int:
        """What is left of the allowance now (a read: nothing is taken)."""
        return (await self.state()).emails_available

    async def state(self) -> QuotaState:
        row = await self._pool.fetchrow(Q["quota-get"], self._account)
        assert row is not None, "the quota row is created by the schema migration"
        return _state(row)

    async def record_sync(self, reading: ProviderReading, now: datetime) -> tuple[int, QuotaState]:
        """Writes a successful reading, less what is in flight (see the module);
        returns (the value it replaced, the new state)."""
        return await self._record(reading, now, override=None)

    async def set_local(self, monthly: int, now: datetime, tz: tzinfo) -> tuple[int, QuotaState]:
        """quota.set: the local provider's monthly allowance from now on, applied at
        once (less this month's sends and the claims, as a sync would); returns
        (the value it replaced, the new state). Later syncs keep it."""
        reading = ProviderReading(
            emails_available=monthly,
            monthly_limit=monthly,
            minus_sent_between=month_bounds(now, tz),
            local=True,
        )
        return await self._record(reading, now, override=monthly)

    async def _record(
        self, reading: ProviderReading, now: datetime, *, override: int | None
    ) -> tuple[int, QuotaState]:
        start, end = reading.minus_sent_between or (None, None)
        async with self._pool.acquire() as conn, conn.transaction():
            # The lock first, the counts after: under READ COMMITTED each
            # statement sees what was committed when it began, so the counts
            # include every take that finished before the lock was granted.
            previous = await conn.fetchval(Q["quota-lock"], self._account)
            if override is not None:
                await conn.execute(Q["quota-set-override"], override, self._account)
            row = await conn.fetchrow(
                Q["quota-record-sync"],
                max(0, reading.emails_available),
                reading.monthly_limit,
                now,
                start,
                end,
                reading.local,
                self._account,
                self._name,
                not self._account,
            )
        assert row is not None, "the quota row is created by the schema migration"
        return int(previous), _state(row)

    async def record_sync_error(self, error: str) -> QuotaState:
        row = await self._pool.fetchrow(Q["quota-record-sync-error"], error, self._account)
        assert row is not None, "the quota row is created by the schema migration"
        return _state(row)


# How long a block stays live in PostgreSQL, and how long its holder grants from
# it (by its own monotonic clock, from before it asked): the gap covers a stalled
# holder, so no grant is ever made from a block PostgreSQL already counts as dead.
QUOTA_BLOCK_TTL_SECONDS = 60.0
QUOTA_BLOCK_USE_SECONDS = 10.0
# Unused blocks go back after this long without a take.
QUOTA_BLOCK_IDLE_SECONDS = 1.0
# A block covers about this much of the recent demand, at most QUOTA_BLOCK_MAX.
QUOTA_BLOCK_LOOKAHEAD_SECONDS = 0.5
QUOTA_BLOCK_MAX = 2000
# Blocks larger than a request, and the next block taken ahead, only from this many
# requests a second: a campaign asking once a batch takes exactly what it is granted.
QUOTA_BLOCK_BUSY_REQUESTS = 50


class _Block:
    __slots__ = ("granted", "id", "size", "taken_at")

    def __init__(self, block_id: int, size: int, taken_at: float) -> None:
        self.id = block_id
        self.size = size
        self.granted = 0
        self.taken_at = taken_at

    @property
    def left(self) -> int:
        return self.size - self.granted


class QuotaBlocks:
    """The governor's side of the quota: taken from PostgreSQL in blocks, granted in memory.

    One commit per token request capped the governor at a few hundred requests a
    second. A block (``quota-block-take``) is taken from the allowance and written
    to the ``quota_block`` ledger in one statement; ``take`` then grants from it
    with no I/O. Block sizes follow demand: the tokens taken in the last second
    times ``QUOTA_BLOCK_LOOKAHEAD_SECONDS``, at least what the request needs, at
    most ``QUOTA_BLOCK_MAX``, once requests come ``QUOTA_BLOCK_BUSY_REQUESTS`` a
    second or faster — so a quiet governor (a campaign asks once a batch) takes
    exactly what it grants and holds nothing, and a busy one asks PostgreSQL a
    few times a second, the next block taken in the background before the
    current one runs out.

    Exact across processes: every token granted comes from a block, every block
    was subtracted from the one quota row under its lock, so the grants of all
    governors together never exceed the allowance. A block goes back (its unused
    rest added to the allowance, ``quota-block-close``) when used up, after
    ``QUOTA_BLOCK_IDLE_SECONDS`` without a take, when older than
    ``QUOTA_BLOCK_USE_SECONDS``, and on stop. A sync subtracts the unused part of
    live blocks, like the claims. A holder killed loses its open blocks (at most
    two, each ≤ ``QUOTA_BLOCK_MAX``) until ``QUOTA_BLOCK_TTL_SECONDS`` have passed
    and a sync recounts: under-sending, never over.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        holder: str,
        account: str = "",
        block_max: int = QUOTA_BLOCK_MAX,
        on_restored: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._pool = pool
        # The account's quota row ('' the default's: mailer.accounts.Account.key).
        self._account = account
        self._pg = PgQuota(pool, account)
        self._holder = holder
        self._block_max = block_max
        self._on_restored = on_restored
        self._blocks: deque[_Block] = deque()
        self._left = 0
        self._refill: asyncio.Task[int] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        # Demand: tokens taken since _window_start, and the rate of the last full window.
        self._window_start = time.monotonic()
        self._window_taken = 0
        self._window_requests = 0
        self._rate = 0.0
        self._request_rate = 0.0
        self._last_take = 0.0
        self._timer: asyncio.TimerHandle | None = None

    async def available(self) -> int:
        if self._left > 0:
            return self._left
        return await self._pg.available()

    async def take(self, n: int) -> int:
        """Grants up to ``n`` tokens; fewer only when the allowance is used up."""
        if n <= 0:
            return 0
        now = time.monotonic()
        self._note(n, now)
        got = self._grant(n, now)
        while got < n:
            if await self._refilled(n - got) == 0:
                break
            got += self._grant(n - got, time.monotonic())
        self._prefetch()
        return got

    async def release(self) -> None:
        """Gives every open block back (on stop); best effort."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._refill is not None:
            with contextlib.suppress(Exception):
                await self._refill
        while self._blocks:
            self._retire(self._blocks.popleft())
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _note(self, n: int, now: float) -> None:
        elapsed = now - self._window_start
        if elapsed >= 1.0:
            self._rate = self._window_taken / elapsed
            self._request_rate = self._window_requests / elapsed
            self._window_start, self._window_taken, self._window_requests = now, 0, 0
        self._window_taken += n
        self._window_requests += 1
        self._last_take = now
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                QUOTA_BLOCK_IDLE_SECONDS, self._on_timer
            )

    def _target(self) -> int:
        """The size of the next block by recent demand (0: too little to hold any)."""
        requests = max(self._request_rate, float(self._window_requests))
        if requests < QUOTA_BLOCK_BUSY_REQUESTS:
            return 0
        rate = max(self._rate, float(self._window_taken))
        return min(self._block_max, int(rate * QUOTA_BLOCK_LOOKAHEAD_SECONDS))

    def _grant(self, n: int, now: float) -> int:
        got = 0
        while self._blocks and got < n:
            block = self._blocks[0]
            if now - block.taken_at >= QUOTA_BLOCK_USE_SECONDS:
                self._blocks.popleft()
                self._retire(block)
                continue
            k = min(n - got, block.left)
            block.granted += k
            self._left -= k
            got += k
            if block.left == 0:
                self._blocks.popleft()
                self._retire(block)
        return got

    async def _refilled(self, need: int) -> int:
        """Waits for a block (one in flight at a time); how many it brought."""
        if self._refill is None:
            size = max(need, self._target())
            self._refill = asyncio.get_running_loop().create_task(self._take_block(size))
        task = self._refill
        try:
            return await asyncio.shield(task)
        finally:
            if self._refill is task and task.done():
                self._refill = None

    def _prefetch(self) -> None:
        """Under load, the next block is asked for before this one runs out."""
        target = self._target()
        if self._refill is not None or target < 2 or self._left * 2 > target:
            return
        task = asyncio.get_running_loop().create_task(self._take_block(target))
        self._refill = task

        def done(t: asyncio.Task[int]) -> None:
            if self._refill is t:
                self._refill = None
            if not t.cancelled() and t.exception() is not None:
                log.warning("quota block not taken", extra={"error": repr(t.exception())})

        task.add_done_callback(done)

    async def _take_block(self, size: int) -> int:
        began = time.monotonic()
        row = await self._pool.fetchrow(
            Q["quota-block-take"], size, self._holder, QUOTA_BLOCK_TTL_SECONDS, self._account
        )
        taken = 0 if row is None else int(row["taken"])
        if row is not None and taken > 0:
            self._blocks.append(_Block(int(row["block_id"]), taken, began))
            self._left += taken
        return taken

    def _retire(self, block: _Block) -> None:
        """Closes a block in the background: its unused rest goes back."""
        self._left -= block.left
        task = asyncio.get_running_loop().create_task(self._close(block))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, block: _Block) -> None:
        try:
            row = await self._pool.fetchrow(
                Q["quota-block-close"], block.id, block.granted, self._account
            )
        except Exception as exc:  # it expires: its rest is lost until the next sync
            log.warning("quota block not closed", extra={"error": repr(exc)})
            return
        if row is None:
            if block.left:
                log.warning("quota block expired before it was returned")
            return
        if int(row["previous"]) == 0 and int(row["returned"]) > 0 and self._on_restored:
            # Another governor may have refused for the quota meanwhile: its campaign
            # waits for a restoring event, and this is one.
            try:
                await self._on_restored()
            except Exception as exc:
                log.warning("quota deferrals not lifted", extra={"error": repr(exc)})

    async def give_back(self, n: int, granted_at: datetime) -> int:
        """Gives ``n`` tokens granted at ``granted_at`` and never used back to the
        allowance (``quota-give-back``); how many went back (0: a sync ran since,
        which already counted them as unspent). Restoring a used-up quota lifts
        the campaigns waiting for it, as a block's return does."""
        if n <= 0:
            return 0
        row = await self._pool.fetchrow(Q["quota-give-back"], n, self._account, granted_at)
        if row is None:
            return 0
        if int(row["previous"]) == 0 and self._on_restored:
            try:
                await self._on_restored()
            except Exception as exc:
                log.warning("quota deferrals not lifted", extra={"error": repr(exc)})
        return int(row["returned"])

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic()
        idle = now - self._last_take >= QUOTA_BLOCK_IDLE_SECONDS
        kept: deque[_Block] = deque()
        for block in self._blocks:
            if idle or now - block.taken_at >= QUOTA_BLOCK_USE_SECONDS:
                self._retire(block)
            else:
                kept.append(block)
        self._blocks = kept
        if self._blocks:
            wait = max(0.05, self._last_take + QUOTA_BLOCK_IDLE_SECONDS - now)
            self._timer = asyncio.get_running_loop().call_later(
                math.ceil(wait * 100) / 100, self._on_timer
            )


async def lift_deferrals(pool: asyncpg.Pool, reason: str, now: datetime) -> list[int]:
    """Ends now every unfinished deferral for ``reason``; returns the campaign ids.

    The entries become runnable at once; wake the scheduler after this.
    """
    rows = await pool.fetch(Q["queue-lift-reason"], reason, now)
    return [int(r["campaign_id"]) for r in rows]


# ---------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------


class QuotaProvider(Protocol):
    name: str

    async def fetch(self, now: datetime) -> ProviderReading:
        """The provider's count now; raises on any failure (the sync records it)."""
        ...


class LocalQuotaProvider:
    """The allowance minus this calendar month's sends, from our own send log.

    The sends are counted when the reading is written, under the quota's lock.
    """

    name = "local"

    def __init__(self, *, monthly_quota: int, tz: tzinfo) -> None:
        self._monthly = monthly_quota
        self._tz = tz

    async def fetch(self, now: datetime) -> ProviderReading:
        return ProviderReading(
            emails_available=self._monthly,
            monthly_limit=self._monthly,
            minus_sent_between=month_bounds(now, self._tz),
            local=True,
        )


def dig(data: Any, path: str) -> Any:
    """The value at a dotted path (``data.quota.0.left``: keys, or list indexes)."""
    node = data
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise QuotaError(f"no field {path!r} in the quota reply")
    return node


def _count(value: Any, path: str) -> int:
    """A count from JSON: an integer, a whole float, or digits in a string."""
    if isinstance(value, bool):  # bool is an int to Python, never a count here
        raise QuotaError(f"field {path!r} is not a number: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise QuotaError(f"field {path!r} is not a number: {value!r}"[:_MAX_ERROR_CHARS])


class HttpQuotaProvider:
    """The provider's API: GET a JSON document, read one number from it."""

    name = "http"

    def __init__(
        self, url: str, *, token: str, field: str, timeout: float = HTTP_TIMEOUT_SECONDS
    ) -> None:
        if not url:
            raise ValueError("the http quota provider needs MAILER_QUOTA_HTTP_URL")
        self._url = url
        self._token = token
        self._field = field
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def fetch(self, now: datetime) -> ProviderReading:
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        # A session per sync: syncs are hourly, and nothing is left open between them.
        async with (
            aiohttp.ClientSession(timeout=self._timeout) as session,
            session.get(self._url, headers=headers) as resp,
        ):
            body = await resp.read()
            if not 200 <= resp.status < 300:
                snippet = body[:200].decode("utf-8", "replace")
                raise QuotaError(f"quota endpoint answered HTTP {resp.status}: {snippet}")
        try:
            data = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise QuotaError(f"quota endpoint answered invalid JSON: {exc}") from None
        return ProviderReading(
            emails_available=_count(dig(data, self._field), self._field),
            minus_sent_between=(now, None),
        )


def provider_from_settings(s: Settings) -> QuotaProvider:
    if s.quota_provider == "http":
        return HttpQuotaProvider(
            s.quota_http_url, token=s.quota_http_token, field=s.quota_http_field
        )
    return LocalQuotaProvider(monthly_quota=s.monthly_quota, tz=ZoneInfo(s.timezone))


# ---------------------------------------------------------------------------------------
# The sync actor
# ---------------------------------------------------------------------------------------


def sync_subject(bus: Bus, account: str = "") -> str:
    """Where an account's syncer takes "sync now" (``account``: its key, '' the default's).

    The default account keeps the single-account subject (a process of the previous
    version still asks there during a rolling update); another account's is
    ``<prefix>.internal.quota.sync.<name>``.
    """
    if not account:
        return bus.subject("internal", "quota", "sync")
    return bus.subject("internal", "quota", "sync", account)


class SyncNow(msgspec.Struct, frozen=True):
    """Sync the quota now; an ask returns the new ``QuotaState``."""


class _Tick(msgspec.Struct, frozen=True):
    """The interval's sync (and the first one), told by the actor to itself."""


class QuotaLedger(Protocol):
    async def record_sync(
        self, reading: ProviderReading, now: datetime
    ) -> tuple[int, QuotaState]: ...
    async def record_sync_error(self, error: str) -> QuotaState: ...


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, QuotaError):
        text = str(exc)
    else:  # a timeout has no message: its type is the message
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:_MAX_ERROR_CHARS]


class QuotaSyncActor(Actor[SyncNow | _Tick]):
    """Syncs on start, every ``interval_seconds`` of the Clock, and on ``SyncNow``.

    Every sync runs in ``handle``, so timer and on-demand syncs never overlap.
    A provider failure is recorded, not raised; a database failure is raised
    (to the asker, or as a crash the supervisor restarts from).
    """

    mailbox_size = 16

    def __init__(
        self,
        *,
        ledger: QuotaLedger,
        provider: QuotaProvider,
        clock: Clock,
        interval_seconds: float,
        on_restored: Callable[[], Awaitable[None]],
        bus: Bus | None = None,
        account: str = "",
    ) -> None:
        self._bus = bus
        self._account = account
        self._ledger = ledger
        self._provider = provider
        self._clock = clock
        self._interval = timedelta(seconds=interval_seconds)
        self._on_restored = on_restored
        # on_restored failed: call it again after the next good sync, even if
        # that one does not see a 0 -> n change (the first one consumed it).
        self._restore_pending = False

    @classmethod
    def from_settings(
        cls,
        *,
        pool: asyncpg.Pool,
        settings: Settings,
        clock: Clock,
        on_restored: Callable[[], Awaitable[None]],
        bus: Bus | None = None,
        account: str = "",
        name: str | None = None,
    ) -> QuotaSyncActor:
        """``settings``: the account's view (mailer.accounts); ``account``: its key;
        ``name``: its name with several accounts (None: one account)."""
        return cls(
            bus=bus,
            account=account,
            ledger=PgQuota(pool, account, name=name),
            provider=provider_from_settings(settings),
            clock=clock,
            interval_seconds=settings.quota_sync_interval_seconds,
            on_restored=on_restored,
        )

    async def on_start(self) -> None:
        # The first sync goes through the mailbox: start does not wait on the provider.
        self.ref.tell(_Tick())
        self.spawn_task(self._timer(), name="quota-timer")
        if self._bus is not None:
            # "Sync now" from the API (any process answers: queue group "quota").
            await self._bus.nc.subscribe(
                sync_subject(self._bus, self._account), queue="quota", cb=self._on_sync_request
            )
            await self._bus.nc.flush()

    async def _on_sync_request(self, msg: Msg) -> None:
        try:
            state = await self.ref.ask(SyncNow(), timeout=30.0)
            await msg.respond(encode(state))
        except Exception as exc:
            body = ErrorReply(error=ErrorBody(code="quota_sync_failed", message=repr(exc)))
            if self._bus is not None and msg.reply:
                with contextlib.suppress(Exception):
                    await self._bus.nc.publish(
                        msg.reply, encode(body), headers={ERROR_CODE_HEADER: "503"}
                    )

    async def _timer(self) -> None:
        while True:
            await self._clock.sleep(self._interval.total_seconds())
            # A full mailbox already holds syncs; dropping this one loses nothing.
            with contextlib.suppress(MailboxFull):
                self.ref.tell(_Tick())

    async def handle(self, msg: SyncNow | _Tick) -> object:
        return await self._sync()

    async def _sync(self) -> QuotaState:
        now = self._clock.now()
        try:
            reading = await self._provider.fetch(now)
        except Exception as exc:  # any provider failure is data for the operator
            error = _error_text(exc)
            log.warning(
                "quota sync failed", extra={"provider": self._provider.name, "error": error}
            )
            return await self._ledger.record_sync_error(error)
        previous, state = await self._ledger.record_sync(reading, now)
        log.info(
            "quota synced",
            extra={
                "provider": self._provider.name,
                "emails_available": state.emails_available,
                "previous": previous,
            },
        )
        if state.emails_available > 0 and (previous == 0 or self._restore_pending):
            await self._restored()
        return state

    async def _restored(self) -> None:
        try:
            await self._on_restored()
        except Exception:
            self._restore_pending = True
            log.exception("quota restored but waiting campaigns were not resumed")
        else:
            self._restore_pending = False
            log.info("quota restored; campaigns waiting for it resume")
