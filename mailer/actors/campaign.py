"""One actor per running campaign: claim, get tokens, send in waves, record, repeat.

The database is the checkpoint. The actor keeps only what one batch needs;
a restarted actor starts from the rows. Each turn of the loop is one
``Continue`` message, so a Stop queued behind it is handled between batches.

A granted batch goes out in groups of half ``window`` (the SMTP connections):
each group is rendered, marked handed in the database, given to the sender
at once (its messages take the connections as the ones before free them) and
recorded once answered. The loop is pipelined: whenever half of the bound
below is free, the groups answered are recorded and the next ones rendered
and handed in one statement while the rest are with SMTP, so the connections
do not wait for the database nor for the slowest message of a wave. At most
``depth`` (MAILER_PIPELINE_DEPTH) messages are rendered at a time (the
attachments, encoded once per campaign, are shared by all of them), and at
most ``depth`` recipients can be handed and unrecorded when the process dies
(tests/test_pipeline.py). The next batch's claim and tokens are asked for
while this batch's second half is with SMTP.

Stop ("mark, drain, then clean up and record"): once a stop was asked for --
a shutdown tells every campaign actor at once -- the actor claims nothing,
asks for no tokens and hands no further group to SMTP (one already handed but
not yet given to the sender goes back to ``pending``); the groups in flight end
(the service closes the SMTP transport at the same time, which lets a send in
flight finish for a while, then cuts it) and is recorded. Then:
- claimed recipients not handed to SMTP go back to ``pending``, and so do
  handed ones whose send was cut before its end of data (``aborted``);
- outcomes known but not yet written are written in teardown;
- recipients handed to SMTP whose outcome is unknown (a crash, a kill) stay
  ``sending``; the next owner turns them into ``in_doubt`` -- never re-sent,
  never lost -- and gives the claimed but unhanded ones back to ``pending``.

SMTP outcomes: permanent (5xx, invalid address) → that recipient ``failed``,
the campaign goes on; transient (4xx, timeout, refused) → the recipient goes
back to ``pending`` and the campaign is deferred ``transient_error`` (at the
recipient's ``max_transient_attempts``-th transient answer the store fails it
with that answer instead, so one address cannot keep a campaign open). The
campaign counts consecutive failed *attempts*: a batch with a transient error
and no success counts one (ten greylisted addresses in one batch are one
failed attempt, not ten), any success resets the count, and reaching the
circuit-breaker threshold pauses the campaign until a manager resumes it.
While the SMTP account's own breaker is open the campaign does not even ask
for tokens: it waits (``transient_error``) until the breaker lets a probe out.

A campaign whose message cannot be built (the template refuses its subject,
bodies or attachments) is paused with reason ``render_error`` at start and
lets go of its lease: it never holds a slot the next campaign could use.

Scale-out (``shard``/``shards``, see docs/scaling.md): a large campaign may run
as several actors in several processes, each over its own recipients (id %
shards = shard) under its own lease. The home (shard 0, the queue entry's
lease) alone gives the final status, once no shard has anything left; a helper
shard lets go when its own set is done. Any shard refused by the governor
lets go and leaves the campaign's one wait on the queue entry.

Letting go of the lease (defer, pause, finish, release) first stops the
heartbeat, so a renewal that finds the lease given up cannot crash the actor
halfway through announcing it. The owner's notification of a deferral is
stored in the deferral's own transaction (the event outbox) and relayed from
there, so it is never lost between the two.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

import msgspec

from mailer import metrics, sendlog
from mailer.actors.runtime import Actor
from mailer.clock import Clock
from mailer.dkim import DkimSigner
from mailer.messages import CampaignEvent, Notice, TokenReply
from mailer.nextsend import Limits, next_send
from mailer.payload import Payload
from mailer.render import MessageTemplate, make_message_id
from mailer.rules import WorkingHours
from mailer.store import (
    Attachment,
    CampaignRow,
    Claimed,
    FinalNotices,
    Finish,
    Lease,
    Outcome,
    Takeover,
)
from mailer.transport import SendResult

__all__ = [
    "CampaignActor",
    "CampaignSettings",
    "CampaignStore",
    "Continue",
    "EventSink",
    "FaultHook",
    "LeaseLost",
    "Mail",
    "Mailer",
    "Outbox",
    "Route",
    "RouteFor",
    "StageHook",
    "TokenSource",
]

log = logging.getLogger("mailer.campaign")


class Continue(msgspec.Struct):
    """Run one more batch."""


class Mail(msgspec.Struct, frozen=True):
    """One rendered message for the sender."""

    rcpt: str
    data: bytes | Payload
    # The envelope sender of this message (VERP); "" for the batch's one.
    mail_from: str = ""


class CampaignStore(Protocol):
    async def acquire(
        self,
        campaign_id: int,
        owner: str,
        *,
        until: datetime,
        now: datetime,
        fence: int,
        shards: int = 1,
    ) -> Lease | None: ...
    async def acquire_shard(
        self,
        campaign_id: int,
        shard: int,
        owner: str,
        *,
        until: datetime,
        now: datetime,
        fence: int,
    ) -> Lease | None: ...
    async def renew(self, lease: Lease, until: datetime) -> bool: ...
    async def release(self, lease: Lease) -> None: ...
    async def take_over(self, lease: Lease, now: datetime) -> Takeover | None: ...
    async def mark_sending(self, lease: Lease, now: datetime) -> bool: ...
    async def get_campaign(self, campaign_id: int) -> CampaignRow | None: ...
    async def campaign_status(self, campaign_id: int) -> str | None: ...
    async def attachments(self, campaign_id: int) -> list[Attachment]: ...
    async def claim(self, lease: Lease, n: int, now: datetime) -> tuple[list[Claimed], int]: ...
    async def release_claims(self, lease: Lease, ids: Sequence[int], now: datetime) -> None: ...
    async def hand(
        self, lease: Lease, ids: Sequence[int], now: datetime, *, account: str = ""
    ) -> list[int]:
        """Marks claimed recipients handed to SMTP; returns those still this lease's."""
        ...

    async def record_and_hand(
        self,
        lease: Lease,
        outcomes: Sequence[Outcome],
        hand: Sequence[int],
        now: datetime,
        *,
        account: str = "",
    ) -> tuple[dict[int, str], list[int]]:
        """``record`` (no attempt count) then ``hand``, atomically, in one round trip."""
        ...

    async def record(
        self,
        lease: Lease,
        outcomes: Sequence[Outcome],
        now: datetime,
        *,
        transient_errors: int | None = None,
        success: bool = False,
        account: str = "",
    ) -> dict[int, str]: ...
    async def defer(
        self,
        lease: Lease,
        reason: str,
        until: datetime | None,
        now: datetime,
        *,
        notice: Notice | None = None,
        account: str | None = None,
        quota_key: str = "",
    ) -> tuple[bool, bool]: ...
    async def pause(
        self, lease: Lease, reason: str, now: datetime, *, notice: Notice | None = None
    ) -> tuple[bool, bool]: ...
    async def finish(
        self, lease: Lease, now: datetime, *, notices: FinalNotices | None = None
    ) -> Finish: ...


class TokenSource(Protocol):
    async def request_tokens(self, campaign_id: int, owner_id: str, want: int) -> TokenReply: ...
    async def give_back(self, campaign_id: int, grant: TokenReply, count: int) -> int:
        """Gives the quota of ``count`` tokens of ``grant`` never handed to SMTP back."""
        ...

    async def resync_quota(self) -> None:
        """Asks the account's quota syncer for a sync now (best effort)."""
        ...


class Mailer(Protocol):
    """Sends rendered messages; results come back in the same order."""

    async def send_all(
        self, mails: Sequence[Mail], *, not_after: datetime | None = None
    ) -> list[SendResult]:
        """``not_after``: a message not handed to SMTP before it comes back
        ``expired``, unsent (its send token's window is over)."""
        ...

    async def blocked_until(self) -> datetime | None:
        """Until when the SMTP account's breaker holds every send back (None: not)."""
        ...


class EventSink(Protocol):
    async def emit(self, event: CampaignEvent) -> None:
        """A lifecycle event for every interested service (best effort)."""
        ...

    def notice(self, event: CampaignEvent) -> Notice | None:
        """The owner's notification for ``event``, for the outbox (None if none is due)."""
        ...

    def event_notice(self, event: CampaignEvent) -> Notice:
        """``event`` as an outbox row (a final status: it must not be lost)."""
        ...


class Outbox(Protocol):
    async def flush(self) -> int:
        """Publishes the stored notices (at least once); returns how many went out."""
        ...


class CampaignSettings(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    batch_size: int
    lease_seconds: float
    from_email: str
    from_name: str
    message_id_domain: str
    transient_retry: timedelta = timedelta(minutes=5)
    breaker_threshold: int = 10
    # Where a retry after an SMTP error would land outside them, it waits for
    # the next opening (``nextsend``): no deferral ends when nothing can go.
    hours: WorkingHours | None = None
    # One INFO line per accepted message (MAILER_LOG_EACH_SEND); failures always log.
    log_each_send: bool = True
    # Messages rendered and handed to SMTP at once (a wave): the SMTP connections.
    window: int = 8
    # Most recipients handed and unrecorded at once (MAILER_PIPELINE_DEPTH): by
    # Little's law the send rate is at most this over the time from a hand to its
    # record (two statements and the SMTP transaction), so it must cover the
    # connections several times over, and it is all a kill -9 leaves in doubt.
    depth: int = 16
    # Signs every message when set (mailer.dkim); loaded once per process.
    dkim: DkimSigner | None = None


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """One SMTP account as a campaign sends through it: its governor, its sender
    (pool and breaker) and how its messages are signed and addressed."""

    # The account's name, said in reason texts ('' with one account: not named).
    account: str
    # Its name always (logs, metrics).
    name: str
    # Its key in PostgreSQL (quota row, send log): '' for the default account.
    key: str
    tokens: TokenSource
    mailer: Mailer
    from_email: str
    from_name: str
    message_id_domain: str
    dkim: DkimSigner | None = None
    window: int = 8


# The route of a campaign's account by name (None: the default); raises
# LookupError for an account that is not configured.
RouteFor = Callable[[str | None], Route]


# A test hook called after a batch was sent and before it is recorded: the
# exact spot where a crash is most dangerous. None in production.
FaultHook = Callable[[int, int], Awaitable[None]]
# A test hook called at each stage of a wave (campaign id, batch number, stage):
# "handed" (marked, before its send starts), "sending" (its send in flight,
# before the previous wave's record and the next wave's hand), "prepared" (the
# next wave handed, this one still in flight), "sent" (the batch's last wave
# sent, before its record; or, when the next batch joins it without a drain,
# its last wave with SMTP as the next one's claims are taken on). None in
# production.
StageHook = Callable[[int, int, str], Awaitable[None]]


# The next batch's claim and tokens are asked for once this many waves or half
# the batch (whichever is more) are left to hand: they overlap this batch's SMTP
# instead of leaving the connections idle between batches (a claim of a few
# hundred rows takes longer than a few waves' SMTP), and a grant is seldom taken
# long before use.
_PREFETCH_WAVES = 4
# A prefetched batch: (asked at, claims, unsubscribed settled, the tokens' reply or
# None if not asked: a stop came first, or nothing was claimed).
_Next = tuple[datetime, list[Claimed], int, TokenReply | None]

# Pause before looking again when recipients are pending but none could be
# claimed (rows locked by an API call in progress): rare and brief.
_RECLAIM_PAUSE_SECONDS = 0.5
# A sharded campaign's home whose own set is done looks this often for the other
# shards' end: the campaign's final status waits for the home's next look.
_SHARDS_PAUSE_SECONDS = 0.1


class LeaseLost(Exception):
    """Another process took the campaign: this actor must stop sending."""


class CampaignActor(Actor[Continue]):
    def __init__(
        self,
        campaign_id: int,
        *,
        fence: int,
        store: CampaignStore,
        tokens: TokenSource,
        mailer: Mailer,
        events: EventSink,
        outbox: Outbox,
        clock: Clock,
        settings: CampaignSettings,
        unsubscribe_url: Callable[[int, str], str],
        fault: FaultHook | None = None,
        bounce_address: Callable[[int], str] | None = None,
        stage_fault: StageHook | None = None,
        route_for: RouteFor | None = None,
        shard: int = 0,
        shards: int = 1,
    ) -> None:
        """``route_for``: the campaign's SMTP account (and backup) by name; None:
        one account, ``tokens``/``mailer``/``settings``'s.

        ``shard``: 0 runs the campaign's home (the queue entry's lease; it alone
        gives the final status), asking for ``shards`` shards in all; k >= 1
        runs helper shard k, which sends the recipients of its own set (id %
        shards = k) and lets go when none is left."""
        self.campaign_id = campaign_id
        self._shard = shard
        self._shards = shards
        self._route_for = route_for
        self._stage_fault = stage_fault
        self._fence = fence
        self._store = store
        self._tokens = tokens
        self._mailer = mailer
        self._events = events
        self._outbox = outbox
        self._clock = clock
        self._s = settings
        self._unsubscribe_url = unsubscribe_url
        self._fault = fault
        # recipient id -> its envelope sender (mailer.bounces.verp); None: from_email.
        self._bounce_address = bounce_address
        self._lease: Lease | None = None
        self._campaign: CampaignRow | None = None
        self._template: MessageTemplate | None = None
        # The campaign's own account, its backup (used while the own account's
        # breaker is open), the one of the batch in progress, and each one's message.
        self._primary: Route | None = None
        self._backup: Route | None = None
        self._route: Route | None = None
        self._templates: dict[str, MessageTemplate] = {}
        self._attachments: list[Attachment] = []
        self._batches = 0
        self._transient_errors = 0
        # Batch state, for teardown: claimed-not-handed, handed, known outcomes,
        # handed but cut by a shutdown before their data went out.
        self._claimed: list[Claimed] = []
        self._handed: list[Claimed] = []
        # The next wave, rendered and marked handed while the previous one is with SMTP.
        self._prepared: list[tuple[Claimed, Mail, str]] = []
        self._unrecorded: list[Outcome] = []
        self._batch_started = 0.0  # perf_counter() when the batch went to SMTP, for its log line
        self._aborted: list[Claimed] = []
        self._batch_outcomes: list[Outcome] = []
        self._expired: list[Claimed] = []
        self._batch_written: dict[int, str] = {}
        self._ended = False  # finished or deferred: the lease is already given up
        self._status = "ready"  # the campaign's status as this actor made it
        self._heartbeat_task: asyncio.Task[None] | None = None
        # The next batch's claim and tokens, asked while this batch's last waves are
        # with SMTP (``_prefetch``); its claims are released by on_stop if unused.
        self._next: asyncio.Task[_Next] | None = None
        self._next_claimed: list[Claimed] = []
        self._next_route: Route | None = None  # whose tokens the prefetch asked for
        # The batch's grant, whose account granted it, and how many of its tokens
        # were neither given to SMTP nor given back yet (``_give_back_unused``).
        self._grant: TokenReply | None = None
        self._grant_route: Route | None = None
        self._grant_left = 0
        # The grants of batches joined by the next one whose sends may still be in
        # flight: (grant, its route, the claims sent under it), see ``_adopt_next``.
        self._priors: list[tuple[TokenReply | None, Route, set[int]]] = []
        self._may_prefetch = False

    # --- setup ----------------------------------------------------------------

    async def on_start(self) -> None:
        now = self._clock.now()
        until = now + timedelta(seconds=self._s.lease_seconds)
        if self._shard:
            lease = await self._store.acquire_shard(
                self.campaign_id,
                self._shard,
                self._s.instance_id,
                until=until,
                now=now,
                fence=self._fence,
            )
        else:
            lease = await self._store.acquire(
                self.campaign_id,
                self._s.instance_id,
                until=until,
                now=now,
                fence=self._fence,
                shards=self._shards,
            )
        if lease is None:
            # Another process holds it, it waits, or the dispatch came from a
            # deposed leader: nothing to do here.
            log.info("campaign not acquired", extra={"campaign_id": self.campaign_id})
            self._ended = True
            self.request_stop()
            return
        self._transient_errors = lease.transient_errors
        took = await self._store.take_over(lease, now)
        if took is None:
            # The lease was taken over before we began: nothing of ours to undo.
            log.info("campaign lease lost at start", extra={"campaign_id": self.campaign_id})
            self._ended = True
            self.request_stop()
            return
        self._lease = lease
        if took.doubts:
            metrics.EMAILS_FAILED.labels(kind="campaign", reason="in_doubt").inc(took.doubts)
            log.warning(
                "recipients left in doubt by a dead owner",
                extra={"campaign_id": self.campaign_id, "in_doubt": took.doubts},
            )
        campaign = await self._store.get_campaign(self.campaign_id)
        assert campaign is not None
        self._campaign = campaign
        self._attachments = await self._store.attachments(self.campaign_id)
        try:
            self._primary = self._route_of(campaign.smtp_account)
            if campaign.backup_account is not None:
                self._backup = self._route_of(campaign.backup_account)
        except LookupError as exc:
            # Named at create or update, no longer configured: nothing is sent
            # through another account instead; the owner fixes the campaign.
            await self._pause(lease, "render_error", {}, error=str(exc))
            return
        try:
            self._template = self._template_of(self._primary)
        except Exception as exc:
            # Pure computation on the campaign's own content: whatever it raises,
            # this campaign cannot be sent as it is, and retrying will not help.
            # It is paused for its owner to fix, and the queue goes on without it.
            await self._pause(lease, "render_error", {}, error=repr(exc))
            return
        if took.released:
            # A dead owner's claims went back to pending: the quota of any tokens it
            # held for them is spent (it never gave them back). A sync recounts the
            # quota from the sends now instead of at its next interval, so the
            # campaigns do not wait "for the quota" meanwhile while it is not used up.
            # Before this actor claims: a sync counts claims as granted already.
            for route in {id(r): r for r in (self._primary, self._backup) if r}.values():
                await route.tokens.resync_quota()
        self._start_heartbeat(lease)
        # ``ready`` until its first message has gone (then ``sending``, and the
        # "started" event): a campaign that waits before sending says so.
        self._status = "sending" if campaign.status == "sending" else "ready"
        self._again()

    def _route_of(self, account: str | None) -> Route:
        if self._route_for is not None:
            return self._route_for(account)
        return Route(
            account="",
            name="default",
            key="",
            tokens=self._tokens,
            mailer=self._mailer,
            from_email=self._s.from_email,
            from_name=self._s.from_name,
            message_id_domain=self._s.message_id_domain,
            dkim=self._s.dkim,
            window=self._s.window,
        )

    def _template_of(self, route: Route) -> MessageTemplate:
        """The campaign's message as ``route``'s account sends it (From, DKIM), built once."""
        template = self._templates.get(route.key)
        if template is None:
            campaign = self._campaign
            assert campaign is not None
            template = MessageTemplate(
                from_email=route.from_email,
                from_name=route.from_name,
                subject=campaign.subject,
                text=campaign.body_text,
                html=campaign.body_html,
                message_id_domain=route.message_id_domain,
                attachments=[(a.filename, a.content_type, a.content) for a in self._attachments],
                dkim=route.dkim,
            )
            self._templates[route.key] = template
        return template

    async def _choose_route(self) -> tuple[Route, datetime | None]:
        """The account this batch goes through, and until when the own account's
        breaker holds it back (None: it does not).

        The campaign's own account whenever its breaker lets mail out — a
        half-open breaker's probe included, so a failover ends as soon as the
        server answers again. Its backup only while that breaker is open, and
        only if the backup's own breaker lets mail out. The breaker is the one
        reason to switch: a refusal for the hour, the day or the quota never
        is (the campaign waits for its own account's limit).
        """
        primary = self._primary
        assert primary is not None
        blocked = await primary.mailer.blocked_until()
        if blocked is None or self._backup is None:
            return primary, blocked
        if await self._backup.mailer.blocked_until() is not None:
            return primary, blocked
        return self._backup, blocked

    def _start_heartbeat(self, lease: Lease, *, renew_first: bool = False) -> None:
        self._heartbeat_task = self.spawn_task(
            self._heartbeat(lease, renew_first=renew_first), name="heartbeat"
        )

    async def _stop_heartbeat(self) -> None:
        """Stops renewing the lease: what follows gives it up (defer, pause, finish, release)."""
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None:
            task.cancel()
            # asyncio.wait, not await: it neither raises the task's error (a
            # LeaseLost already crashed us) nor swallows our own cancellation.
            await asyncio.wait([task])

    async def _heartbeat(self, lease: Lease, *, renew_first: bool) -> None:
        """Renews the lease; losing it crashes the actor so it stops sending.

        ``renew_first``: a heartbeat restarted after a pause in renewals renews
        at once, or repeated restarts would never renew at all.
        """
        period = self._s.lease_seconds / 3
        if not renew_first:
            await self._clock.sleep(period)
        while True:
            until = self._clock.now() + timedelta(seconds=self._s.lease_seconds)
            if not await self._store.renew(lease, until):
                raise LeaseLost(f"lease on campaign {lease.campaign_id} lost")
            await self._clock.sleep(period)

    # --- running ----------------------------------------------------------------

    async def handle(self, msg: Continue) -> object:
        if not self._ended:
            await self._batch()
        return None

    def _again(self) -> None:
        # After a stop request the mailbox is closed: the loop simply ends there.
        if self.ref.alive:
            self.ref.tell(Continue())

    @property
    def _stopping(self) -> bool:
        """A stop was asked for (shutdown, or this actor letting go): start nothing new."""
        return not self.ref.alive

    async def _batch(self) -> None:
        lease, campaign, template = self._lease, self._campaign, self._template
        assert lease is not None and campaign is not None and template is not None
        if self._stopping:
            # The Continue was queued before the stop: no claim, no tokens now.
            return
        route, blocked = await self._choose_route()
        if route is not self._route:
            self._log_route(route)
        self._route = route
        nxt = await self._take_next(route, blocked)
        if blocked is not None and route is self._primary:
            # The account's breaker is open (a prefetch was released above): reserving
            # tokens now would spend the hour and the quota on sends that cannot go
            # out. Wait for its probe.
            await self._defer(lease, "transient_error", blocked, {}, route=route)
            return
        try:
            template = self._template_of(route)
        except Exception as exc:  # the backup's From or DKIM cannot build it
            if nxt is not None:
                await self._store.release_claims(lease, [r.id for r in nxt[1]], self._clock.now())
                await self._give_back(route, nxt[3], len(nxt[1]))
            await self._pause(lease, "render_error", {}, error=repr(exc))
            return
        reply: TokenReply | None = None
        if nxt is None:
            now = self._clock.now()
            self._claimed, unsubscribed = await self._store.claim(lease, self._s.batch_size, now)
        else:
            now, self._claimed, unsubscribed, reply = nxt
            if reply is not None and not reply.granted:
                # A refusal is asked again now: it spent no token, and the window
                # may have turned since (10:59:59's refusal says nothing of 11:00).
                now, reply = self._clock.now(), None
        await self._give_back_unused()  # a grant before this one: nothing is left of it
        if reply is not None:
            # The prefetched grant is this batch's from here (on_stop gives back
            # what it does not use).
            self._grant, self._grant_route = reply, route
            self._grant_left = min(reply.granted, len(self._claimed))
        if not self._claimed:
            if unsubscribed:  # a batch of only unsubscribed addresses: go on
                self._again()
            else:
                await self._nothing_claimed(lease)
            return
        if self._stopping:
            return  # on_stop gives the claims back (and the quota of any grant)

        if reply is None:
            reply = await route.tokens.request_tokens(
                self.campaign_id, campaign.owner_id, len(self._claimed)
            )
            self._grant, self._grant_route = reply, route
            self._grant_left = min(reply.granted, len(self._claimed))
        granted, refused = self._claimed[: reply.granted], self._claimed[reply.granted :]
        await self._store.release_claims(lease, [r.id for r in refused], now)
        self._claimed = granted
        if not granted:
            reason = reply.reason or "rate_per_hour"
            retry_at = reply.retry_at
            if blocked is not None and (retry_at is None or blocked < retry_at):
                # The backup's own limit holds it; its own account may be back
                # first: it looks again then (a probe), under its own limits.
                primary = self._primary
                assert primary is not None
                await self._defer(lease, "transient_error", blocked, {}, route=primary)
                return
            await self._defer(lease, reason, retry_at, _reply_details(reply), route=route)
            return
        # All that was asked for was granted: the next batch may be asked for while
        # this one's last waves are with SMTP (fewer would be refused the next time).
        self._may_prefetch = not refused

        if self._status == "ready" and await self._store.mark_sending(lease, now):
            # Its first messages go now: from here on it is ``sending``.
            self._status = "sending"
            await self._emit("started")
        outcomes, written = await self._send(lease, template, now, reply.usable_until(now))
        if self._stopping:
            return  # stopped between waves: on_stop releases the rest and the lease
        if self._claimed:
            await self._release_expired(lease)
        await self._give_back_unused()

        if self._transient_errors >= self._s.breaker_threshold:
            await self._pause_by_breaker(lease)
        elif any(
            o.status == "transient" and written.get(o.recipient_id) == "pending" for o in outcomes
        ):
            if await self._may_fail_over(route):
                # Its account's breaker opened on this batch and the backup is
                # open for mail: the next batch goes there now, not in minutes.
                self._again()
                return
            retry_at = self._clock.now() + self._s.transient_retry
            await self._defer(lease, "transient_error", retry_at, {}, route=route)
        else:
            # Fewer tokens than wanted: the next ask is refused with the time
            # the window reopens, which defers the campaign there.
            self._again()

    async def _may_fail_over(self, route: Route) -> bool:
        """After a transient error on the own account: whether its breaker is now
        open and the backup's lets mail out (the next batch then goes there)."""
        if route is not self._primary or self._backup is None:
            return False
        nxt, blocked = await self._choose_route()
        return blocked is not None and nxt is self._backup

    def _log_route(self, route: Route) -> None:
        if self._route is None and route is self._primary:
            return  # the first batch, on its own account: nothing to say
        primary = self._primary
        assert primary is not None
        log.warning(
            "campaign fails over to its backup SMTP account"
            if route is not primary
            else "campaign back on its own SMTP account",
            extra={
                "campaign_id": self.campaign_id,
                "account": route.name,
                "own_account": primary.name,
            },
        )
        metrics.ACCOUNT_FAILOVERS.labels(account=primary.name, to=route.name).inc()

    async def _send(
        self, lease: Lease, template: MessageTemplate, now: datetime, not_after: datetime | None
    ) -> tuple[list[Outcome], dict[int, str]]:
        """Sends the granted claims, pipelined around SMTP, in groups of half the window.

        A group is rendered and marked handed in the database before its SMTP
        transactions start, and given to the sender at once: its messages take
        the connections as the ones before free them. It is recorded once its
        messages are answered. At most ``depth`` recipients are ever handed
        and unrecorded (``_outstanding_groups`` groups): all a kill -9 can leave
        in doubt. Whenever a group is answered, the groups answered so far are
        recorded and as many groups handed as the bound then allows, in one
        statement (records first), so the connections do not wait for the
        database nor for the slowest message of a wave, and records go in claim
        order. At most ``depth`` messages are rendered at a time (the
        attachments are shared by all). A stop hands no further group; one
        handed but not yet given to the sender goes back to pending
        (``on_stop``). ``not_after`` is the grant's end: no message goes to SMTP
        at or after it (the sender checks each one); the claims left then stay
        in ``_claimed`` for ``_release_expired``. Returns the batch's outcomes
        and the status each recorded row got.
        """
        self._batch_outcomes = []
        self._batch_written = {}
        self._batches += 1
        lost = False
        expired = False
        most = self._outstanding_groups
        # The groups with SMTP (or answered, not yet collected), oldest first.
        flying: deque[tuple[list[tuple[Claimed, Mail, str]], asyncio.Future[list[SendResult]]]]
        flying = deque()
        ready: deque[list[tuple[Claimed, Mail, str]]] = deque()
        # The first hand is one window: the connections start on it while the rest
        # of the bound is rendered and handed (the loop below, at once).
        prepared = await self._prepare(
            lease, template, now, groups=min(most, self._current.window // self._group)
        )
        try:
            while True:
                if prepared is not None:
                    groups, taken = prepared
                    lost = lost or taken
                    ready.extend(groups)
                    prepared = None
                while ready and not self._stopping:
                    sendable = ready.popleft()
                    if not flying:
                        self._batch_started = time.perf_counter()
                    await self._hook("handed")
                    self._prepared = self._prepared[len(sendable) :]
                    self._handed += [r for r, _, _ in sendable]
                    self._grant_left -= len(sendable)
                    flying.append(
                        (
                            sendable,
                            asyncio.ensure_future(
                                self._current.mailer.send_all(
                                    [m for _, m, _ in sendable], not_after=not_after
                                )
                            ),
                        )
                    )
                if len(self._claimed) <= max(
                    _PREFETCH_WAVES * self._current.window, self._s.batch_size // 2
                ) and not (lost or expired):
                    self._prefetch(lease)
                if (
                    not self._claimed
                    and not ready
                    and self._next is not None
                    and self._next.done()
                    and not (lost or expired or self._stopping)
                ):
                    adopted = await self._adopt_next()
                    if adopted is not None:
                        now, not_after = adopted
                        continue
                room = most - len(flying)
                over = not_after is not None and self._clock.now() >= not_after
                if (
                    # Half the bound free at least (or nothing with SMTP): the other
                    # half keeps the connections busy meanwhile, and each statement
                    # records and hands a window's worth, not a group at a time.
                    (2 * room >= most or not flying)
                    and room > 0
                    and self._claimed
                    and not self._stopping
                    and not over
                    and not lost
                    and not expired
                ):
                    # The groups answered are recorded and the next ones handed (one
                    # statement when there are both): the bound holds at the hand.
                    await self._hook("sending")
                    prepared = await self._prepare(lease, template, now, record=True, groups=room)
                    if prepared is not None and prepared[0]:
                        await self._hook("prepared")
                    continue
                if not flying:
                    break
                if room > 0 and (self._unrecorded or self._aborted or self._expired):
                    await self._flush(lease, last=False)
                sendable, sending = flying[0]
                results = await sending
                flying.popleft()
                self._collect(sendable, results)
                # Those answered meanwhile go into the same record.
                while flying and flying[0][1].done():
                    sendable, sending = flying.popleft()
                    self._collect(sendable, sending.result())
                # The grant ended: what is not yet handed goes back with the rest.
                expired = expired or bool(self._expired)
        except BaseException:
            # The groups with SMTP are not abandoned: their outcomes are kept for
            # on_stop's record (a cancellation cuts them through the transport).
            for sendable, sending in flying:
                await asyncio.wait([sending])
                if not sending.cancelled() and sending.exception() is None:
                    self._collect(sendable, sending.result())
            raise
        if self._prepared:
            # Handed but never given to SMTP (a stop, or the grant ended meanwhile):
            # not sent, so pending again.
            ids = [r.id for r, _, _ in self._prepared]
            await self._store.release_claims(lease, ids, self._clock.now())
            self._prepared = []
        if self._fault is not None:
            # After the batch's last wave was sent, before it is recorded.
            await self._fault(self.campaign_id, self._batches)
        await self._hook("sent")
        await self._flush(lease, last=True)
        if lost:
            raise LeaseLost(f"recipients of campaign {lease.campaign_id} taken over")
        return self._batch_outcomes, self._batch_written

    def _prefetch(self, lease: Lease) -> None:
        """Asks for the next batch's claim and tokens in the background, once per batch.

        Not after a stop, nor when this batch was granted less than it asked (the
        next ask would be refused) or met a transient error (it defers): then the
        tokens would be spent for nothing. The claims are held by this lease like
        any other (on_stop releases them if they are never used).
        """
        if (
            self._next is not None
            or not self._may_prefetch
            or self._stopping
            or self._met_transient
        ):
            return
        self._may_prefetch = False
        # Asked of the batch's own route: its account's hour and quota.
        self._next_route = self._current
        self._next = asyncio.ensure_future(self._fetch_next(lease, self._current))

    @property
    def _met_transient(self) -> bool:
        """This batch had a transient answer (it will defer: nothing more is asked)."""
        return any(o.status == "transient" for o in self._unrecorded) or any(
            o.status == "transient" for o in self._batch_outcomes
        )

    async def _adopt_next(self) -> tuple[datetime, datetime | None] | None:
        """The next batch joins the one being sent, without the pipeline draining.

        Once every claim of this batch is handed, the prefetched batch's claims are
        handed on as this one's answers come in: the connections do not wait
        through this batch's last record, the next batch's start and its first
        hand. Only in the plain case -- the whole batch granted on the same
        account, its breaker closed, the campaign still ready or sending, no
        transient answer nor failed attempt counted, no stop; otherwise (and with
        a test's batch-boundary hook, which needs a boundary) the batch ends as
        before and ``_batch`` takes the prefetch. Each batch joined so far gets
        its progress event here (the outcomes recorded since the last one).
        Returns the joined batch's time and its grant's end, or None.
        """
        task = self._next
        if (
            task is None
            or self._fault is not None
            or self._transient_errors
            or task.cancelled()
            or task.exception() is not None
            or self._next_route is not self._current
            or self._met_transient
        ):
            return None
        now, claimed, _, reply = task.result()
        if not claimed or reply is None or reply.granted < len(claimed):
            return None
        route, blocked = await self._choose_route()
        if route is not self._current or blocked is not None:
            return None
        if await self._store.campaign_status(self.campaign_id) not in ("ready", "sending"):
            return None  # _batch's _take_next releases the claims and gives back
        if self._stopping or self._next is not task:
            return None
        # This batch's end as the stage hook knows it: its last wave with SMTP.
        await self._hook("sent")
        self._next, self._next_route, self._next_claimed = None, None, []
        await self._give_back_unused()  # every claim of the batch was handed: none
        if self._grant_route is not None:
            sent_under = {r.id for r in self._handed + self._aborted + self._expired}
            if sent_under:
                self._priors.append((self._grant, self._grant_route, sent_under))
        self._grant, self._grant_route = reply, route
        self._grant_left = len(claimed)
        self._claimed = claimed
        self._may_prefetch = True
        if self._batch_outcomes:
            await self._emit("progress", counts=_tally(self._batch_outcomes, self._batch_written))
        self._batch_outcomes, self._batch_written = [], {}
        self._batches += 1
        return now, reply.usable_until(now)

    async def _fetch_next(self, lease: Lease, route: Route) -> _Next:
        assert self._campaign is not None
        now = self._clock.now()
        claimed, unsubscribed = await self._store.claim(lease, self._s.batch_size, now)
        self._next_claimed = claimed  # on_stop's to release until _batch takes them
        if not claimed or self._stopping:
            return now, claimed, unsubscribed, None
        reply = await route.tokens.request_tokens(
            self.campaign_id, self._campaign.owner_id, len(claimed)
        )
        return now, claimed, unsubscribed, reply

    async def _take_next(self, route: Route, blocked: datetime | None) -> _Next | None:
        """The prefetched claim and tokens (None: none asked for, or the campaign was
        paused or cancelled meanwhile, or the batch goes through another account than
        the one asked (a failover or its end: those tokens are that account's; left
        spent, under-sending), or its account's breaker opened: then its claims are
        released and the batch starts afresh)."""
        task, self._next = self._next, None
        asked_of, self._next_route = self._next_route, None
        if task is None:
            return None
        nxt = await task
        if asked_of is not route or (blocked is not None and route is self._primary):
            assert self._lease is not None
            await self._store.release_claims(self._lease, [r.id for r in nxt[1]], self._clock.now())
            self._next_claimed = []
            if asked_of is not None:
                await self._give_back(asked_of, nxt[3], len(nxt[1]))
            return None
        # A manager's pause or cancel since then stops the campaign before this batch,
        # as its claim would have (the normal path then finds nothing and lets go).
        if nxt[1] and await self._store.campaign_status(self.campaign_id) not in (
            "ready",
            "sending",
        ):
            assert self._lease is not None
            await self._store.release_claims(self._lease, [r.id for r in nxt[1]], self._clock.now())
            self._next_claimed = []
            await self._give_back(route, nxt[3], len(nxt[1]))
            return None
        # From here they are _claimed's (the caller assigns them at once).
        self._next_claimed = []
        return nxt

    @property
    def _group(self) -> int:
        """Messages handed in one group: half the window (at least one)."""
        return max(1, self._current.window // 2)

    @property
    def _outstanding_groups(self) -> int:
        """Groups that may be handed and unrecorded at once: ``depth`` recipients."""
        return max(1, self._s.depth // self._group)

    async def _prepare(
        self,
        lease: Lease,
        template: MessageTemplate,
        now: datetime,
        *,
        groups: int,
        record: bool = False,
    ) -> tuple[list[list[tuple[Claimed, Mail, str]]], bool] | None:
        """Renders up to ``groups`` groups of claims and marks them handed; returns the
        rows still ours (to send), in groups, and whether a takeover settled some
        first. None: no claims left.

        ``record``: the outcomes known so far (of the groups answered) are recorded in
        the same statement as the hand, before it."""
        if not self._claimed or self._stopping:
            return None
        # The claims stay in _claimed (released by on_stop if we die) until handed.
        wave = self._claimed[: groups * self._group]
        # A recipient whose message cannot be built (an address or name the
        # renderer refuses) fails permanently without reaching SMTP.
        built: list[tuple[Claimed, Mail, str]] = []
        for r in wave:
            mid = make_message_id(self.campaign_id, r.id, self._current.message_id_domain)
            try:
                built.append((r, self._render(template, r, mid, now), mid))
            except ValueError as exc:
                self._unrecorded.append(_unsendable(r, str(exc)))
        ids = [r.id for r, _, _ in built]
        if record and self._unrecorded:
            written, handed = await self._store.record_and_hand(
                lease, self._unrecorded, ids, self._clock.now(), account=self._current.key
            )
            marked = set(handed)
            self._claimed = self._claimed[len(wave) :]
            await self._flush(lease, last=False, written=written)
        else:
            marked = set(
                await self._store.hand(lease, ids, self._clock.now(), account=self._current.key)
            )
            self._claimed = self._claimed[len(wave) :]
            if record and (self._aborted or self._expired):
                await self._flush(lease, last=False)
        # Rows a takeover settled meanwhile are no longer ours to send.
        sendable = [b for b in built if b[0].id in marked]
        self._prepared = sendable
        size = self._group
        return (
            [sendable[i : i + size] for i in range(0, len(sendable), size)],
            len(sendable) < len(built),
        )

    def _collect(
        self, sendable: Sequence[tuple[Claimed, Mail, str]], results: Sequence[SendResult]
    ) -> None:
        for (r, _, mid), res in zip(sendable, results, strict=True):
            if res.aborted:
                self._aborted.append(r)
            elif res.expired:
                self._expired.append(r)
            else:
                self._unrecorded.append(_outcome(r, mid, res))
        done = {r.id for r, _, _ in sendable}
        self._handed = [r for r in self._handed if r.id not in done]

    async def _give_back(self, route: Route, grant: TokenReply | None, count: int) -> None:
        """The quota of ``count`` tokens of ``grant`` that never reached SMTP goes back
        (best effort: the token source logs a failure; a sync recounts)."""
        if grant is None or grant.granted <= 0 or count <= 0:
            return
        await route.tokens.give_back(self.campaign_id, grant, min(count, grant.granted))

    async def _give_back_unused(self) -> None:
        """The batch's tokens never given to SMTP (released claims, a wave handed in
        the database but not to the sender, a stop, a crash) give their quota back."""
        left, self._grant_left = self._grant_left, 0
        if left > 0 and self._grant_route is not None:
            await self._give_back(self._grant_route, self._grant, left)

    async def _hook(self, stage: str) -> None:
        if self._stage_fault is not None:
            await self._stage_fault(self.campaign_id, self._batches, stage)

    async def _release_expired(self, lease: Lease) -> None:
        """Recipients whose grant ended before SMTP took them go back to pending.

        Their tokens stay spent (better to under-send): the next batch asks
        again, in the window that is current then.
        """
        ids = [r.id for r in self._claimed]
        await self._store.release_claims(lease, ids, self._clock.now())
        self._claimed = []
        log.info(
            "send tokens expired before SMTP took the messages; recipients released",
            extra={"campaign_id": self.campaign_id, "rate_limit_count": len(ids)},
        )

    def _render(self, template: MessageTemplate, r: Claimed, mid: str, now: datetime) -> Mail:
        data = template.render_payload(
            to_email=r.email,
            to_name=r.name,
            variables=r.variables,
            message_id=mid,
            date=now,
            unsubscribe_url=self._unsubscribe_url(self.campaign_id, r.email),
        )
        mail_from = self._bounce_address(r.id) if self._bounce_address is not None else ""
        return Mail(r.email, data, mail_from)

    async def _flush(
        self, lease: Lease, *, last: bool, written: dict[int, str] | None = None
    ) -> dict[int, str]:
        """Records the known outcomes and gives back the sends that never went out
        (cut before their end of data by a stop, or past their grant's end).

        ``last``: the batch's last record, which writes its attempt count. One
        batch is one attempt: any success resets the count, a failed attempt
        (a transient error, no success) adds one whatever its size. Returns the
        status each recipient row written got. ``written``: the outcomes were
        recorded already (with the next wave's hand): only what follows a record.
        """
        outcomes, aborted, expired = self._unrecorded, self._aborted, self._expired
        self._batch_outcomes += outcomes
        batch = self._batch_outcomes
        success = any(o.status == "sent" for o in batch)
        count: int | None = None
        if last:
            if success:
                self._transient_errors = 0
            elif any(o.status == "transient" and not o.short_circuited for o in batch):
                self._transient_errors += 1
            count = self._transient_errors
        if written is None:
            written = await self._store.record(
                lease,
                outcomes,
                self._clock.now(),
                transient_errors=count,
                success=success,
                account=self._current.key,
            )
        self._unrecorded = []
        self._batch_written.update(written)
        took_ms = (time.perf_counter() - self._batch_started) * 1000
        if outcomes:
            sendlog.log_batch(
                self.campaign_id,
                outcomes,
                written,
                took_ms=took_ms,
                each_send=self._s.log_each_send,
            )
        given_back = [r.id for r in aborted + expired]
        if given_back:
            # Never accepted by SMTP: pending again, no send-log row. Their hour's
            # and day's tokens stay spent (better to under-send); their quota
            # goes back (TokenReturn says why).
            await self._store.release_claims(lease, given_back, self._clock.now())
            self._aborted, self._expired = [], []
            # Each to the grant it was sent under: a joined batch's sends may still be
            # in flight under the grant before (its give-back is capped by its size).
            rest = given_back
            for grant, route, ids in self._priors:
                mine = [i for i in rest if i in ids]
                if mine:
                    rest = [i for i in rest if i not in ids]
                    await self._give_back(route, grant, len(mine))
            if rest and self._grant_route is not None:
                await self._give_back(self._grant_route, self._grant, len(rest))
        if self._priors:
            open_ = {r.id for r in self._handed}
            self._priors = [p for p in self._priors if p[2] & open_]
        # Counted per reason, one increment each: not a labelled lookup per message.
        sent = 0
        failed: dict[str, int] = {}
        for o in outcomes:
            if o.status == "sent":
                sent += 1
            elif o.status == "transient" and written.get(o.recipient_id) == "failed":
                # Its last transient answer used up its attempts: it failed for good.
                failed["permanent"] = failed.get("permanent", 0) + 1
            else:
                reason = "permanent" if o.status == "failed" else o.status
                failed[reason] = failed.get(reason, 0) + 1
        if sent:
            metrics.EMAILS_SENT.labels(kind="campaign").inc(sent)
        for reason, n in failed.items():
            metrics.EMAILS_FAILED.labels(kind="campaign", reason=reason).inc(n)
        if last and batch:  # one progress event per batch, not per wave
            await self._emit("progress", counts=_tally(batch, self._batch_written))
        return written

    async def _nothing_claimed(self, lease: Lease) -> None:
        status = await self._store.campaign_status(self.campaign_id)
        if status not in ("ready", "sending"):
            # Paused or cancelled by a manager: the API recorded it; let go.
            log.info(
                "campaign stopped by its status",
                extra={"campaign_id": self.campaign_id, "status": status},
            )
            await self._stop_heartbeat()
            await self._store.release(lease)
            self._ended = True
            self.request_stop()
            return
        await self._stop_heartbeat()
        if lease.shard:
            # A helper shard's set is done: the home gives the final status once
            # every shard's is (a shard never finishes the campaign).
            log.info(
                "campaign shard done",
                extra={"campaign_id": self.campaign_id, "shard": lease.shard},
            )
            await self._store.release(lease)
            self._ended = True
            self.request_stop()
            return
        now = self._clock.now()

        def final(cid: int, owner: str, status: str, counts: dict[str, int]) -> list[Notice]:
            event = CampaignEvent(
                event=status, campaign_id=cid, owner_id=owner, status=status, at=now, counts=counts
            )
            return [self._events.event_notice(event)]

        result = await self._store.finish(lease, now, notices=final)
        if result.lease_lost:
            raise LeaseLost(f"lease on campaign {lease.campaign_id} lost before it finished")
        if result.stopped is not None:
            # A manager paused or cancelled it after our last look: theirs stands,
            # and finish gave the lease up.
            log.info(
                "campaign stopped by its status",
                extra={"campaign_id": self.campaign_id, "status": result.stopped},
            )
            self._ended = True
            self.request_stop()
            return
        if result.waits:
            # Another shard was refused for a while and wrote the campaign's wait:
            # finish gave the lease up; the leader dispatches again when it ends.
            log.info("campaign home waits with its shards", extra={"campaign_id": self.campaign_id})
            self._ended = True
            self.request_stop()
            return
        if result.status is None:
            # Recipients still pending: added meanwhile (the next claim takes
            # them), locked by an API call when the claim looked (it commits
            # within moments), or another shard's. Keep the lease and go on
            # after a pause that keeps these cases from spinning.
            self._start_heartbeat(lease, renew_first=True)
            pause = _SHARDS_PAUSE_SECONDS if lease.shards > 1 else _RECLAIM_PAUSE_SECONDS
            await self._clock.sleep(pause)
            self._again()
            return
        status, counts = result.status, result.counts
        self._ended = True
        log.info(
            "campaign finished",
            extra={
                "campaign_id": self.campaign_id,
                "status": status,
                "finished_with_errors": status != "sent",
                "counts": counts,
            },
        )
        if self._campaign is not None:
            metrics.PROCESSING_SECONDS.observe(
                max(0.0, (self._clock.now() - self._campaign.created_at).total_seconds())
            )
        # The final event was stored with the status (the outbox): publish it now;
        # if that fails, the leader's relay publishes it later.
        await self._outbox.flush()
        self.request_stop()

    def _breaker_wait(self, until: datetime) -> datetime:
        """A wait for SMTP (the breaker's probe, the transient retry), with working hours."""
        hours = self._s.hours
        if hours is None:
            return until
        now = self._clock.now()
        # Only the hours and the breaker: the hour and the day are the governor's
        # to tell when the campaign asks again.
        ns = next_send(now, Limits(hours=hours, hourly_limit=1, breaker_until=until))
        return ns.at or until

    @property
    def _current(self) -> Route:
        """The route of the batch in progress (its account sends and records it)."""
        route = self._route or self._primary
        assert route is not None
        return route

    async def _defer(
        self,
        lease: Lease,
        reason: str,
        until: datetime | None,
        details: dict[str, str],
        *,
        route: Route | None = None,
    ) -> None:
        """``route``: the account whose limit or breaker the campaign waits for."""
        route = route or self._current
        if route.account:  # several accounts: the texts name it
            details = {**details, "account": route.account}
        if reason == "transient_error" and until is not None:
            until = self._breaker_wait(until)
        elif until is None and reason != "quota_exhausted":
            # Only the quota's wait has no time (a top-up ends it): any other
            # refusal without one looks again soon.
            until = self._clock.now() + timedelta(minutes=1)
        await self._stop_heartbeat()
        event = self._event("deferred", defer_reason=reason, deferred_until=until, details=details)
        deferred, noticed = await self._store.defer(
            lease,
            reason,
            until,
            self._clock.now(),
            notice=self._events.notice(event),
            account=route.account or None,
            quota_key=route.key,
        )
        self._ended = True
        self.request_stop()
        if not deferred:
            return
        metrics.DEFERS.labels(reason=reason).inc()
        log.info(
            "campaign deferred",
            extra={
                "campaign_id": self.campaign_id,
                "defer_reason": reason,
                "deferred_until": until.isoformat() if until else None,
            },
        )
        await self._events.emit(event)
        if noticed:
            await self._outbox.flush()

    async def _pause_by_breaker(self, lease: Lease) -> None:
        details = {"errors": str(self._transient_errors)}
        if self._primary is not None and self._primary.account:
            details["account"] = self._primary.account
        await self._pause(lease, "circuit_breaker", details)

    async def _pause(
        self, lease: Lease, reason: str, details: dict[str, str], *, error: str | None = None
    ) -> None:
        """Pauses the campaign for its owner (``circuit_breaker``, ``render_error``)."""
        await self._stop_heartbeat()
        event = self._event("paused", status="paused", defer_reason=reason, details=details)
        paused, noticed = await self._store.pause(
            lease, reason, self._clock.now(), notice=self._events.notice(event)
        )
        self._ended = True
        self.request_stop()
        if not paused:
            return
        metrics.DEFERS.labels(reason=reason).inc()
        log.warning(
            "campaign paused",
            extra={
                "campaign_id": self.campaign_id,
                "defer_reason": reason,
                "consecutive_transient_errors": self._transient_errors,
                "error": error,
            },
        )
        await self._events.emit(event)
        if noticed:
            await self._outbox.flush()

    async def _emit(self, event: str, *, counts: dict[str, int] | None = None) -> None:
        status = event if event in ("sent", "completed_with_errors") else self._status
        await self._events.emit(self._event(event, status=status, counts=counts))

    def _event(
        self,
        event: str,
        *,
        status: str | None = None,
        counts: dict[str, int] | None = None,
        defer_reason: str | None = None,
        deferred_until: datetime | None = None,
        details: dict[str, str] | None = None,
    ) -> CampaignEvent:
        assert self._campaign is not None
        return CampaignEvent(
            event=event,
            campaign_id=self.campaign_id,
            owner_id=self._campaign.owner_id,
            status=status or self._status,
            at=self._clock.now(),
            counts=counts,
            defer_reason=defer_reason,
            deferred_until=deferred_until,
            details=details or None,
        )

    # --- teardown ---------------------------------------------------------------

    async def on_stop(self, error: BaseException | None) -> None:
        lease = self._lease
        if lease is None:
            return
        now = self._clock.now()
        try:
            if self._unrecorded or self._aborted or self._expired:
                await self._flush(lease, last=True)
            # A wave handed but never given to SMTP (a stop or a crash while the
            # previous one was sending) was not sent: back to pending with the claims.
            unsent = [r for r, _, _ in self._prepared] + self._claimed
            task, self._next = self._next, None
            if task is not None:
                await asyncio.wait([task])
                if not task.cancelled() and task.exception() is not None:
                    log.warning(
                        "asking for the next batch in advance failed",
                        exc_info=task.exception(),
                        extra={"campaign_id": self.campaign_id},
                    )
            # The next batch's claims, asked for in advance and never used.
            unused_next = self._next_claimed
            unsent += unused_next
            self._next_claimed = []
            if unsent:
                await self._store.release_claims(lease, [r.id for r in unsent], now)
                self._claimed, self._prepared = [], []
            # Their quota goes back: this batch's tokens not given to SMTP, and the
            # prefetched grant's (its claims were never taken into a batch).
            await self._give_back_unused()
            if unused_next and task is not None and not task.cancelled() and not task.exception():
                asked_of, self._next_route = self._next_route, None
                if asked_of is not None:
                    await self._give_back(asked_of, task.result()[3], len(unused_next))
            if self._handed:
                log.error(
                    "campaign actor stopped with sends in flight; they will be in doubt",
                    extra={"campaign_id": self.campaign_id, "in_doubt": len(self._handed)},
                )
            if not self._ended:
                await self._store.release(lease)
        except Exception:
            # The database is unreachable: the lease expires by itself and the
            # next owner settles the rows (claimed ones become in_doubt).
            log.exception(
                "campaign teardown could not record", extra={"campaign_id": self.campaign_id}
            )


def _reply_details(reply: TokenReply) -> dict[str, str]:
    """The values a refusal's text needs («{sent}/{limit}», «{limit} писем/час»)."""
    if reply.reason == "daily_limit":
        return {"sent": str(reply.daily_sent), "limit": str(reply.daily_limit)}
    if reply.reason == "rate_per_hour":
        return {"limit": str(reply.limit), "used": str(reply.used)}
    return {}


def _tally(outcomes: Sequence[Outcome], written: dict[int, str]) -> dict[str, int]:
    tally: dict[str, int] = {}
    for o in outcomes:
        # A transient answer that used up the recipient's attempts failed it.
        status = "failed" if written.get(o.recipient_id) == "failed" else o.status
        tally[status] = tally.get(status, 0) + 1
    return tally


def _unsendable(r: Claimed, error: str) -> Outcome:
    return Outcome(
        recipient_id=r.id,
        email=r.email,
        status="failed",
        message_id=None,
        answer=None,
        error=f"message not built: {error}",
        took_ms=0.0,
    )


def _outcome(r: Claimed, message_id: str, res: SendResult) -> Outcome:
    if res.outcome == "sent":
        status = "sent"
    elif res.in_doubt:
        status = "in_doubt"
    elif res.outcome == "permanent":
        status = "failed"
    else:
        status = "transient"
    return Outcome(
        recipient_id=r.id,
        email=r.email,
        status=status,
        message_id=message_id,
        answer=res.provider_answer,
        error=res.error,
        took_ms=res.took_ms,
        short_circuited=res.short_circuited,
    )
