"""The rate governor: the one place that decides whether mail may go now.

Campaign actors (and test emails) in any process ask it over NATS
request/reply (subject ``<prefix>.internal.governor.tokens``, queue group
``governor``: one governor per process, any of them may answer). For a
``TokenRequest`` it grants k <= want tokens or refuses with a reason and the
time to retry — both from ``mailer.nextsend.next_send``, the one answer to
"when can mail go next?" under every limit at once. The limits, checked in
this order:

1. working hours (campaigns only, test emails ignore them). Nothing is granted
   at or after the end, and campaigns ask per batch, so a campaign stops at its
   first batch after it. A refusal here still reads the quota and the
   counters: quota 0 is named (``quota_exhausted``, no time) rather than
   "tomorrow at 09:00", and a day already used up waits for the next day;
2. the SMTP account's clock hour (``rate_per_hour``) and the owner's local day
   (``daily_limit``), reserved together by one Redis script; the retry is the
   first moment working hours, the hour and the day all allow — never the
   next hour when it falls after closing — and the campaign's own turn in the
   queue (``mailer.forecast``: campaigns ahead take a reopened hour first);
3. the monthly quota in PostgreSQL (``quota_exhausted``, ``retry_at`` null:
   nothing can be known until a sync or an operator's ``quota.set`` restores
   it, which lifts the waiting campaigns at once). Read before anything is
   reserved (a quota of 0 refuses with no write), taken after; Redis tokens
   the quota cannot cover are given back.

Any number of governors share Redis and PostgreSQL, and each step is atomic
there, so together they never exceed a limit. Redis down: the hour and the
day FAIL OPEN (see ``mailer.ratelimit``); working hours and the quota still hold.
Redis back empty: a missing counter is rebuilt from the send log (``PgSpentTokens``).
A token is spent once granted: the governor never hears whether a send failed.

The window is this governor's to decide, on its one ``Clock``: the hour and
the local day the tokens are counted in, and how long they hold. A grant
says so (``TokenReply.hour_start``, ``day``, ``decided_at``, ``valid_until``):
it is good until the end of its hour, of its local day or — for a campaign —
of working hours, whichever is first; the asker hands nothing to SMTP at or
after that (``TokenReply.usable_until``). In production the clock is the
pod's system clock: pods need NTP (see the README's failure policies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Literal, Protocol, TypeVar
from zoneinfo import ZoneInfo

import asyncpg
import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mailer import metrics
from mailer.actors.runtime import Actor
from mailer.bus import ERROR_CODE_HEADER, ERROR_HEADER, Bus, decode, encode
from mailer.clock import Clock, utc
from mailer.config import Settings
from mailer.forecast import Entry, forecast
from mailer.messages import (
    ErrorBody,
    ErrorReply,
    QuotaSyncRequest,
    TokenReply,
    TokenRequest,
    TokenReturn,
    TokenReturned,
)
from mailer.nextsend import Limits, NextSend, next_send
from mailer.quota import QuotaBlocks, sync_subject
from mailer.ratelimit import (
    FAIR_SHARE_WINDOW_SECONDS,
    PgSpentTokens,
    Reservation,
    SendLimiter,
    SpentTokens,
    hour_start,
    max_min_shares,
)
from mailer.rules import DailyLimits, WorkingHours
from mailer.store import PgStore

__all__ = [
    "GOVERNOR_QUEUE",
    "GovernorActor",
    "NatsTokenSource",
    "QuotaTaker",
    "governor_subject",
    "return_subject",
]

log = logging.getLogger("mailer.governor")

GOVERNOR_QUEUE = "governor"
# A refusal's retry time replays at most this much of the queue (mailer.forecast).
_TURN_QUEUE_LIMIT = 500
_Asked = TypeVar("_Asked", TokenRequest, TokenReturn)
# A sync asked for at a takeover (which waits for it): an HTTP provider's timeout.
QUOTA_RESYNC_TIMEOUT_SECONDS = 10.0
# Requests served at once; one more is refused at once (503), as a full mailbox was.
_MAX_IN_FLIGHT = 1000


def governor_subject(bus: Bus, account: str = "") -> str:
    """Where an account's governor listens ('': the default account's, the one subject
    of the single-account service): each account's limits are decided by its own."""
    if not account:
        return bus.subject("internal", "governor", "tokens")
    return bus.subject("internal", "governor", "tokens", account)


def return_subject(bus: Bus, account: str = "") -> str:
    """Where an account's governors take back the quota of unused grants."""
    if not account:
        return bus.subject("internal", "governor", "return")
    return bus.subject("internal", "governor", "return", account)


class Competition(Protocol):
    async def competing(self, now: datetime) -> int:
        """How many campaigns run or are ready to run now (the queue's count)."""
        ...

    async def forecast_queue(
        self, limit: int, *, account: str | None = None, default: bool = True
    ) -> list[Entry]:
        """The queue in order with what each campaign still has to send (``account``:
        only that SMTP account's campaigns; ``default``: it is the default account)."""
        ...

    async def competitors(
        self,
        now: datetime,
        limit: int,
        asker: int,
        hour: tuple[datetime, datetime],
        *,
        account: str = "",
        default: bool = True,
    ) -> list[tuple[int, int]]:
        """(campaign id, demand of ``hour``) of the first ``limit`` of them in
        queue order, and of ``asker``: attempts recorded in the hour plus the
        recipients still to send."""
        ...


class QuotaTaker(Protocol):
    async def take(self, n: int) -> int:
        """Takes up to ``n`` from the monthly allowance atomically; returns how many."""
        ...

    async def available(self) -> int:
        """What is left of the monthly allowance (a read, nothing taken)."""
        ...

    async def release(self) -> None:
        """Gives back what is held and not granted (on stop)."""
        ...

    async def give_back(self, n: int, granted_at: datetime) -> int:
        """Gives back ``n`` granted at ``granted_at`` and never used; how many went back."""
        ...


class GovernorActor(Actor[TokenRequest]):
    def __init__(
        self,
        *,
        bus: Bus,
        limiter: SendLimiter,
        quota: QuotaTaker,
        hours: WorkingHours,
        daily: DailyLimits,
        clock: Clock,
        max_active: int = 1,
        competition: Competition | None = None,
        spent: SpentTokens | None = None,
        account: str = "",
        name: str = "",
    ) -> None:
        """``account``: the key of the SMTP account whose limits this governor
        decides ('' the default's; mailer.accounts); ``name``: its name, said in
        every reply so the campaign can tell which account's limit it waits for."""
        self._account = account
        self._account_name = name
        metrics.governor_series(name)
        self._bus = bus
        self._max_active = max_active
        self._competition = competition
        self._limiter = limiter
        self._quota = quota
        self._hours = hours
        self._daily = daily
        self._clock = clock
        self._spent = spent
        self._sub: Subscription | None = None
        self._return_sub: Subscription | None = None
        self._in_flight = 0

    @classmethod
    def from_settings(
        cls,
        *,
        bus: Bus,
        limiter: SendLimiter,
        pool: asyncpg.Pool,
        settings: Settings,
        clock: Clock,
        account: str = "",
        on_quota_restored: Callable[[], Awaitable[None]] | None = None,
    ) -> GovernorActor:
        """``settings``: the account's view (mailer.accounts); ``account``: its key."""
        # The ledger names the holder of a block: which pod and incarnation.
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        return cls(
            bus=bus,
            limiter=limiter,
            quota=QuotaBlocks(pool, holder=holder, account=account, on_restored=on_quota_restored),
            hours=WorkingHours.from_settings(settings),
            daily=DailyLimits.from_settings(settings),
            clock=clock,
            max_active=settings.max_active_campaigns,
            competition=PgStore(pool),
            spent=PgSpentTokens(pool, ZoneInfo(settings.timezone), account),
            account=account,
            name=settings.smtp_account,
        )

    async def on_start(self) -> None:
        self._sub = await self._bus.nc.subscribe(
            governor_subject(self._bus, self._account),
            queue=GOVERNOR_QUEUE,
            cb=self._on_request,
        )
        self._return_sub = await self._bus.nc.subscribe(
            return_subject(self._bus, self._account), queue=GOVERNOR_QUEUE, cb=self._on_return
        )
        # Ready means the server knows the subscription: a request right after start works.
        await self._bus.nc.flush()

    async def _on_request(self, msg: Msg) -> None:
        # Runs in the NATS client's task, which delivers the next request only
        # when this returns: so each request is served in a task of its own and
        # they are decided concurrently. The limits stay exact: every step that
        # counts is atomic where it is kept (one Lua script in Redis, batched
        # over the requests waiting for it; the quota block taken under the
        # quota row's lock, granted from in memory with no await in between).
        request = await self._accept(msg, TokenRequest)
        if request is None:
            return
        if self._in_flight >= _MAX_IN_FLIGHT:
            await self._respond_error(msg, 503, "governor_unavailable", "governor busy")
            return
        self._in_flight += 1
        try:
            self.spawn_task(self._serve(msg, request), name="token-request")
        except Exception:  # stopping: the asker retries elsewhere or later
            self._in_flight -= 1
            raise

    async def _accept(self, msg: Msg, kind: type[_Asked]) -> _Asked | None:
        """The request decoded, or None after answering 400: malformed, or asked on
        another account's subject (each account's limits are its own governor's)."""
        try:
            request = decode(msg.data, kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._respond_error(msg, 400, "bad_request", str(exc))
            return None
        if request.account != self._account:
            await self._respond_error(
                msg, 400, "bad_request", f"this governor decides account {self._account!r}"
            )
            return None
        return request

    async def _on_return(self, msg: Msg) -> None:
        """A campaign gives back the quota of tokens it never handed to SMTP."""
        back = await self._accept(msg, TokenReturn)
        if back is None:
            return
        try:
            returned = await self._quota.give_back(back.count, back.decided_at)
        except Exception as exc:  # stays spent until the next sync: under-sending
            log.warning(
                "unused quota not given back",
                extra={"campaign_id": back.campaign_id, "error": repr(exc)},
            )
            await self._respond_error(msg, 503, "governor_unavailable", repr(exc))
            return
        log.info(
            "unused quota given back",
            extra={"campaign_id": back.campaign_id, "rate_limit_count": returned},
        )
        with contextlib.suppress(Exception):
            await msg.respond(encode(TokenReturned(returned=returned)))

    async def _serve(self, msg: Msg, request: TokenRequest) -> None:
        try:
            await self.fault_point(request)
        except Exception as exc:
            # An injected crash (tests): the asker hears it, then the actor crashes and is
            # restarted, as when it handled its requests from the mailbox.
            self._in_flight -= 1
            await self._respond_error(msg, 503, "governor_unavailable", repr(exc))
            raise
        try:
            reply = await self.handle(request)
        except Exception as exc:  # the asker gets an error now instead of its timeout
            log.exception("token request failed", extra={"campaign_id": request.campaign_id})
            await self._respond_error(msg, 503, "governor_unavailable", repr(exc))
            return
        finally:
            self._in_flight -= 1
        try:
            await msg.respond(encode(reply))
        except Exception:  # the connection is gone: the asker times out and asks again
            log.debug("token reply not sent", exc_info=True)

    async def _respond_error(self, msg: Msg, status: int, code: str, message: str) -> None:
        """An error reply the way ``Bus.request`` reads it (micro error headers)."""
        if not msg.reply:
            return
        body = ErrorReply(error=ErrorBody(code=code, message=message))
        # Header values must be one line; the whole text is in the body.
        one_line = " ".join(message.split())[:200]
        headers = {ERROR_HEADER: one_line, ERROR_CODE_HEADER: str(status)}
        # Msg.respond would echo the request's headers and cannot set others.
        await self._bus.nc.publish(msg.reply, encode(body), headers=headers)

    async def handle(self, msg: TokenRequest) -> object:
        now = self._clock.now()
        if msg.kind == "campaign" and not self._hours.is_open(now):
            return await self._refuse_closed(msg, now)
        if await self._quota.available() <= 0:
            # Nothing to reserve: the hour, the day and the fair share are left
            # untouched (a refusal writes nothing), and no time can be named.
            return self._refuse(msg, "quota_exhausted", None, count=0)

        daily_limit = self._daily.limit_for(msg.owner_id)
        day = self._hours.local_date(now)
        r = await self._limiter.reserve(
            msg.want,
            now,
            owner_id=msg.owner_id,
            day=day,
            daily_limit=daily_limit,
            campaign_id=msg.campaign_id,
            fair_share=await self._fair_share(now, msg),
            spent=self._spent,
        )
        if r.granted == 0:
            ns = next_send(
                now,
                self._limits(
                    msg,
                    hour_used=r.hour_used,
                    share_left=0 if r.capped else None,
                    day_used=r.day_used,
                    daily_limit=r.day_limit,
                ),
            )
            assert ns.reason in ("daily_limit", "rate_per_hour"), ns
            retry = ns.at
            if r.capped and ns.reason == "rate_per_hour":
                # Capped by its fair share only: others use the rest of the
                # hour, and what they cannot use (finished, deferred, paused)
                # comes back to it within the hour — so it asks again soon.
                assert retry is not None
                retry = min(retry, now + timedelta(seconds=FAIR_SHARE_WINDOW_SECONDS))
            elif retry is not None:
                # Its place in the queue: campaigns ahead take the reopened
                # hour (or day) first, so say when its own turn comes.
                turn = await self._turn(now, msg, r.hour_used, r.day_used)
                if turn is not None and turn > retry:
                    retry = turn
            count = r.day_used if ns.reason == "daily_limit" else r.hour_used
            return self._refuse(msg, ns.reason, retry, count=count, r=r)

        try:
            taken = await self._quota.take(r.granted)
        except BaseException:
            # Nothing was handed out: the reserved tokens go back before the error does.
            await self._limiter.give_back(r, r.granted)
            raise
        if taken < r.granted:
            r = await self._limiter.give_back(r, r.granted - taken)
        if taken == 0:
            # No time can be named: the restoring sync (or quota.set) lifts the wait.
            return self._refuse(msg, "quota_exhausted", None, count=0, r=r)

        metrics.TOKENS_GRANTED.labels(account=self._account_name).inc(taken)
        return TokenReply(
            granted=taken,
            account=self._account_name,
            used=r.hour_used,
            limit=r.hour_limit,
            daily_sent=r.day_used,
            daily_limit=r.day_limit,
            hour_start=r.next_hour - timedelta(hours=1),
            day=day,
            decided_at=now,
            valid_until=self._valid_until(msg, now, r.next_hour),
        )

    async def _turn(
        self, now: datetime, msg: TokenRequest, hour_used: int, day_used: int
    ) -> datetime | None:
        """When the queue lets this campaign send again (``mailer.forecast``).

        Best effort: None (no queue view, the campaign not in it, or a read
        failing) leaves the limits' own time, which is then merely early — the
        campaign is refused again then, with no new notice.
        """
        if self._competition is None or msg.kind != "campaign":
            return None
        try:
            # The campaigns of this account: they, not others, take its reopened hour.
            queue = await self._competition.forecast_queue(
                _TURN_QUEUE_LIMIT, account=self._account_name, default=not self._account
            )
            if len(queue) < 2 or all(e.campaign_id != msg.campaign_id for e in queue):
                return None
            day = self._hours.local_date(now)
            used: dict[str, int] = {msg.owner_id: day_used}
            for owner in {e.owner_id for e in queue} - {msg.owner_id}:
                used[owner] = await self._limiter.day_used(owner, day)
        except Exception as exc:
            log.warning("queue not read for the retry time", extra={"error": repr(exc)})
            return None
        outlooks = forecast(
            now,
            queue,
            hours=self._hours,
            hourly_limit=self._limiter.hourly_limit,
            hour_used=hour_used,
            daily_limit=self._daily.limit_for,
            day_used=used,
            max_active=self._max_active,
        )
        mine = outlooks.get(msg.campaign_id)
        return None if mine is None else mine.next_at

    def _limits(
        self,
        msg: TokenRequest,
        *,
        hour_used: int = 0,
        share_left: int | None = None,
        day_used: int = 0,
        daily_limit: int | None = None,
        quota: int | None = None,
    ) -> Limits:
        return Limits(
            hours=self._hours,
            hourly_limit=self._limiter.hourly_limit,
            hour_used=hour_used,
            share_left=share_left,
            daily_limit=self._daily.limit_for(msg.owner_id) if daily_limit is None else daily_limit,
            day_used=day_used,
            quota=quota,
            kind=msg.kind,
        )

    async def _refuse_closed(self, msg: TokenRequest, now: datetime) -> TokenReply:
        """Outside working hours: when mail can go, every limit considered.

        The quota and the counters are read, nothing reserved: a quota of 0 is
        the reason (no time can be named), and a day already used up waits for
        the next working day, not for this morning's opening. The counters are
        best effort (Redis down: taken as unused, the limiter's fail-open side).
        """
        quota = await self._quota.available()
        daily_limit = self._daily.limit_for(msg.owner_id)
        try:
            hour_used = await self._limiter.hour_used(now)
            day_used = await self._limiter.day_used(msg.owner_id, self._hours.local_date(now))
        except Exception as exc:  # the counters only sharpen the time; the hours hold anyway
            log.warning(
                "rate counters unavailable outside working hours", extra={"error": repr(exc)}
            )
            hour_used = day_used = 0
        ns: NextSend = next_send(
            now,
            self._limits(
                msg,
                hour_used=hour_used,
                day_used=day_used,
                daily_limit=daily_limit,
                quota=quota,
            ),
        )
        assert ns.reason is not None, ns
        retry = ns.at
        if retry is not None:  # its place in the queue, as after a refusal in hours
            turn = await self._turn(now, msg, hour_used, day_used)
            if turn is not None and turn > retry:
                retry = turn
        count = {"daily_limit": day_used, "rate_per_hour": hour_used}.get(ns.reason, 0)
        return self._refuse(msg, ns.reason, retry, count=count)

    def _valid_until(self, msg: TokenRequest, now: datetime, next_hour: datetime) -> datetime:
        """Where the grant's window ends: its hour, its local day, or working hours.

        Tokens are counted in the window they were granted in; used after it they
        would land in the next hour (or day, or after closing) uncounted there.
        """
        ends = [next_hour, self._hours.day_end(now)]
        closes = self._hours.closes_at(now) if msg.kind == "campaign" else None
        if closes is not None:
            ends.append(closes)
        return min(ends)

    async def _fair_share(self, now: datetime, msg: TokenRequest) -> int | None:
        """With several campaigns allowed at once, the asker's part of the hour:
        max-min fair over the demands of those sharing it, work-conserving —
        what one cannot use (small, finished, deferred, paused) goes to the
        others within the same hour.

        One campaign at a time (the default) shares with nobody (None); a test
        email competes with nobody.
        """
        if self._max_active <= 1 or self._competition is None or msg.kind != "campaign":
            return None
        start = hour_start(utc(now))
        sharing = await self._competition.competitors(
            now,
            self._max_active,
            msg.campaign_id,
            (start, start + timedelta(hours=1)),
            # Only this account's campaigns share its hour.
            account=self._account_name,
            default=not self._account,
        )
        ids = [cid for cid, _ in sharing]
        if msg.campaign_id not in ids:
            return None
        capacity = self._limiter.hourly_limit
        parts = max_min_shares(capacity, [d for _, d in sharing])
        # What no campaign's demand claims goes to the asker too. A demand counts
        # the attempts recorded and the recipients still to send, but its share is
        # measured against the tokens it was granted: a grant whose claims went
        # back to ``pending`` unsent (released at a SIGTERM, or by the next owner
        # after a kill -9) is counted twice, and would cap the campaign below its
        # last recipients for the rest of the hour — refused "soon" every 30 s
        # while the hour stands almost empty (a rolling restart did that). The
        # hour's own counter still bounds every grant, waste included.
        return parts[ids.index(msg.campaign_id)] + max(0, capacity - sum(parts))

    def _refuse(
        self,
        msg: TokenRequest,
        reason: str,
        retry_at: datetime | None,
        *,
        count: int,
        r: Reservation | None = None,
    ) -> TokenReply:
        # Counted in tokens, like the grants: the metric's unit.
        metrics.TOKENS_DENIED.labels(account=self._account_name, reason=reason).inc(msg.want)
        log.info(
            "tokens refused",
            extra={
                "campaign_id": msg.campaign_id,
                "owner_id": msg.owner_id,
                "kind": msg.kind,
                "want": msg.want,
                "defer_reason": reason,
                "deferred_until": retry_at.isoformat() if retry_at else None,
                # The count of the limit that refused (0 where none is counted).
                "rate_limit_count": count,
            },
        )
        return TokenReply(
            granted=0,
            account=self._account_name,
            reason=reason,
            retry_at=retry_at,
            used=r.hour_used if r else 0,
            limit=r.hour_limit if r else self._limiter.hourly_limit,
            daily_sent=r.day_used if r else 0,
            daily_limit=r.day_limit if r else self._daily.limit_for(msg.owner_id),
        )

    async def on_stop(self, error: BaseException | None) -> None:
        for sub in (self._sub, self._return_sub):
            if sub is None:
                continue
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is already gone
                log.debug("governor unsubscribe failed", exc_info=True)
        try:
            await asyncio.wait_for(self._quota.release(), timeout=5.0)
        except Exception:  # its blocks expire; a sync recounts them
            log.warning("quota blocks not given back", exc_info=True)


class NatsTokenSource:
    """What a campaign actor holds to ask the governor (over NATS, any process)."""

    def __init__(self, bus: Bus, *, timeout: float, account: str = "") -> None:
        self._bus = bus
        self._timeout = timeout
        self._account = account  # the governor asked: this account's ('' the default's)

    async def request_tokens(
        self,
        campaign_id: int,
        owner_id: str,
        want: int,
        *,
        kind: Literal["campaign", "test"] = "campaign",
    ) -> TokenReply:
        return await self._bus.request(
            governor_subject(self._bus, self._account),
            TokenRequest(
                campaign_id=campaign_id,
                owner_id=owner_id,
                want=want,
                kind=kind,
                account=self._account,
            ),
            TokenReply,
            timeout=self._timeout,
        )

    async def give_back(self, campaign_id: int, grant: TokenReply, count: int) -> int:
        """Gives the quota of ``count`` tokens of ``grant`` that never reached SMTP
        back (``TokenReturn``); how many went back. Best effort: on any failure
        they stay spent until the next sync (under-sending, never over)."""
        if count <= 0 or grant.decided_at is None:
            return 0
        try:
            reply = await self._bus.request(
                return_subject(self._bus, self._account),
                TokenReturn(
                    campaign_id=campaign_id,
                    count=min(count, grant.granted),
                    decided_at=grant.decided_at,
                    account=self._account,
                ),
                TokenReturned,
                timeout=self._timeout,
            )
        except Exception as exc:
            log.warning(
                "unused quota not given back; spent until the next sync",
                extra={"campaign_id": campaign_id, "error": repr(exc)},
            )
            return 0
        return reply.returned

    async def resync_quota(self) -> None:
        """Asks the account's quota syncer (any process) for a sync now; best effort:
        a failure leaves the interval's sync to do it."""
        subject = sync_subject(self._bus, self._account)
        try:
            await self._bus.nc.request(
                subject,
                encode(QuotaSyncRequest(requested_by="takeover")),
                timeout=QUOTA_RESYNC_TIMEOUT_SECONDS,
            )
        except Exception as exc:
            log.warning("quota resync not done; the next sync does it", extra={"error": repr(exc)})
