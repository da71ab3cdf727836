"""The asyncpg adapter behind the stores the actors and the API declare.

Every method is one short transaction built from named queries (``mailer.db.Q``).
Writes a campaign actor makes carry its lease (owner + epoch): a deposed
owner's late write matches no row and changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from mailer.db import Q
from mailer.forecast import Entry
from mailer.messages import CampaignView, Notice, QueueView
from mailer.outbox import store_notice

__all__ = [
    "Attachment",
    "CampaignRow",
    "Claimed",
    "FinalNotices",
    "Finish",
    "Lease",
    "Outcome",
    "PgStore",
    "Takeover",
    "campaign_view",
]

FINAL_STATUSES = ("sent", "completed_with_errors", "cancelled")


class CampaignRow(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    owner_id: str
    name: str
    subject: str
    body_text: str | None
    body_html: str | None
    priority: int
    status: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    # The SMTP account (None: the default) and its backup (None: none).
    smtp_account: str | None = None
    backup_account: str | None = None


class Attachment(msgspec.Struct, frozen=True):
    filename: str
    content_type: str
    content: bytes


class Lease(msgspec.Struct, frozen=True):
    campaign_id: int
    owner: str
    epoch: int
    transient_errors: int
    # Which shard of the campaign this lease holds (0: the home, the queue
    # entry's own lease; k >= 1: campaign_shard's row k) and how many there
    # are: the lease's recipients are those with id % shards = shard.
    shard: int = 0
    shards: int = 1

    @property
    def claim_token(self) -> str:
        # Distinct per holder and per epoch: a restarted actor in the same
        # process does not mistake its predecessor's claims for its own. A
        # helper shard's epochs are its own row's, so the shard is part of it.
        if self.shard:
            return f"{self.owner}#{self.epoch}/{self.shard}"
        return f"{self.owner}#{self.epoch}"


class Claimed(msgspec.Struct, frozen=True):
    id: int
    email: str
    name: str | None
    variables: dict[str, str]


class Finish(msgspec.Struct, frozen=True, kw_only=True):
    """What ``finish`` found: the final status given, or why there is none yet."""

    status: str | None  # sent | completed_with_errors; None: not finished
    counts: dict[str, int]
    lease_lost: bool = False
    # The campaign was no longer 'sending' (a manager paused or cancelled it):
    # not finished, and the lease is given up; the status found.
    stopped: str | None = None
    # A sharded campaign's other shards still have recipients, and a deferral
    # one of them wrote is in force: not finished, and the lease is given up.
    waits: bool = False


# The events a final status calls for (the campaign's ``sent`` or
# ``completed_with_errors``), built by the caller from the campaign, status and
# counts found: they go into the event outbox in the transaction that writes
# the status.
FinalNotices = Callable[[int, str, str, dict[str, int]], Sequence[Notice]]

# A test hook called at a named point of a store operation with the campaign
# id: the spot where a race with the API is decided. Empty in production.
StoreHooks = Mapping[str, Callable[[int], Awaitable[None]]]


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one send attempt ended in, as the recipient row and the send log see it."""

    recipient_id: int
    email: str
    # sent | failed (permanent) | transient (back to pending) | in_doubt
    status: str
    message_id: str | None
    answer: str | None
    error: str | None
    took_ms: float
    # Transient without an attempt (the account's breaker was open): it does
    # not count towards the campaign's consecutive errors.
    short_circuited: bool = False


def _campaign(row: asyncpg.Record) -> CampaignRow:
    return CampaignRow(**dict(row))


def campaign_view(
    row: asyncpg.Record, counts: dict[str, int], queue: asyncpg.Record | None
) -> CampaignView:
    """The API's view of a campaign row, its counts and its queue entry (if any)."""
    q = None
    if queue is not None:
        q = QueueView(
            priority=queue["priority"],
            queued_at=queue["queued_at"],
            started_at=queue["started_at"],
            completed_at=queue["completed_at"],
            defer_reason=queue["defer_reason"],
            deferred_until=queue["deferred_until"],
            consecutive_transient_errors=queue["consecutive_transient_errors"],
            defer_account=queue.get("defer_account"),
        )
    return CampaignView(
        id=int(row["id"]),
        owner_id=row["owner_id"],
        name=row["name"],
        subject=row["subject"],
        status=row["status"],
        priority=row["priority"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        counts=counts,
        queue=q,
        account=row.get("smtp_account"),
        backup_account=row.get("backup_account"),
    )


async def forecast_queue(
    pool: Any, limit: int, *, account: str | None = None, default: bool = True
) -> list[Entry]:
    """The queue in order, as the forecast replays it (its first ``limit`` entries);
    ``account``: only the campaigns of that SMTP account (``default``: the default)."""
    rows = await pool.fetch(Q["api-forecast-queue"], limit, account, default)
    return [
        Entry(
            campaign_id=int(r["campaign_id"]),
            owner_id=str(r["owner_id"]),
            remaining=int(r["remaining"]),
            smtp_wait_until=r["deferred_until"] if r["defer_reason"] == "transient_error" else None,
            started=r["started_at"] is not None,
        )
        for r in rows
    ]


def notice_due(
    reason: str,
    until: datetime | None,
    previous_reason: str | None,
    previous_until: datetime | None,
) -> bool:
    """Whether a deferral tells the owner anything new: one notice per episode.

    An episode is one continuous wait (it ends when mail goes again, which
    clears ``previous_reason``), whatever the reasons inside it. Within one, a
    notice is due only when the reason becomes the quota (the manager must
    see that: only a top-up ends it), or when another reason takes over with
    a time later than the one promised. The same reason going on is the same
    news (MISSION: no duplicates for one ongoing reason), and a wait that ends
    as promised, or sooner, tells nothing new.
    """
    if previous_reason is None:
        return True
    if reason == "quota_exhausted":
        return previous_reason != "quota_exhausted"
    if previous_reason in (reason, "quota_exhausted") or until is None:
        # From "when the quota is topped up" to a known time: not later than promised.
        return False
    return previous_until is None or until > previous_until


class Takeover(msgspec.Struct, frozen=True, kw_only=True):
    """What a new owner settled of a dead one's rows (``PgStore.take_over``)."""

    doubts: int  # handed to SMTP, outcome unknown: now in_doubt
    released: int  # claimed, never handed: pending again


class PgStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_transient_attempts: int = 5,
        hooks: StoreHooks | None = None,
    ) -> None:
        self.pool = pool
        self._max_transient_attempts = max_transient_attempts
        self._hooks: StoreHooks = hooks if hooks is not None else {}

    async def _hook(self, name: str, campaign_id: int) -> None:
        hook = self._hooks.get(name)
        if hook is not None:
            await hook(campaign_id)

    # --- campaigns ------------------------------------------------------------

    async def create_campaign(
        self,
        *,
        owner_id: str,
        name: str,
        subject: str,
        body_text: str | None,
        body_html: str | None,
        priority: int,
        now: datetime,
        account: str | None = None,
        backup_account: str | None = None,
    ) -> CampaignRow:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                Q["campaign-insert"],
                owner_id,
                name,
                subject,
                body_text,
                body_html,
                priority,
                now,
                account,
                backup_account,
            )
            assert row is not None
            await conn.execute(
                Q["audit-insert"], now, owner_id, "campaign.create", row["id"], {"name": name}
            )
        return _campaign(row)

    async def get_campaign(self, campaign_id: int) -> CampaignRow | None:
        row = await self.pool.fetchrow(Q["campaign-get"], campaign_id)
        return None if row is None else _campaign(row)

    async def attachments(self, campaign_id: int) -> list[Attachment]:
        rows = await self.pool.fetch(Q["attachments-of-campaign"], campaign_id)
        return [Attachment(r["filename"], r["content_type"], bytes(r["content"])) for r in rows]

    async def counts(self, campaign_id: int, conn: Any = None) -> dict[str, int]:
        rows = await (conn or self.pool).fetch(Q["recipients-counts"], campaign_id)
        return {r["status"]: int(r["n"]) for r in rows}

    async def view(self, campaign_id: int) -> CampaignView | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(Q["campaign-get"], campaign_id)
            if row is None:
                return None
            counts = await self.counts(campaign_id, conn)
            q = await conn.fetchrow(Q["queue-get"], campaign_id)
        return campaign_view(row, counts, q)

    async def start(
        self,
        campaign_id: int,
        *,
        actor_id: str,
        now: datetime,
        allowed_from: Sequence[str],
        send_at: datetime | None = None,
    ) -> CampaignRow | None:
        """Moves the campaign to ``ready`` and (re)queues it; None if not allowed now.

        ``send_at``: the entry waits until then (reason ``scheduled``).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                Q["campaign-set-status-from"], campaign_id, "ready", list(allowed_from), now
            )
            if row is None:
                return None
            c = await conn.fetchrow(Q["campaign-get"], campaign_id)
            assert c is not None
            await conn.execute(Q["queue-enqueue"], campaign_id, c["priority"], now)
            details: dict[str, str] = {}
            if send_at is not None:
                await conn.execute(Q["queue-schedule"], campaign_id, send_at)
                details["send_at"] = send_at.isoformat()
            await conn.execute(
                Q["audit-insert"], now, actor_id, "campaign.start", campaign_id, details
            )
            await conn.execute(
                Q["audit-insert"],
                now,
                actor_id,
                "campaign.status",
                campaign_id,
                {"from": row["previous"], "to": "ready"},
            )
        return _campaign(c)

    # --- the queue and leases ---------------------------------------------------

    async def runnable(self, now: datetime, limit: int) -> list[int]:
        rows = await self.pool.fetch(Q["queue-runnable"], now, limit)
        return [int(r["campaign_id"]) for r in rows]

    async def next_wakeup(self, now: datetime) -> datetime | None:
        at: datetime | None = await self.pool.fetchval(Q["queue-next-wakeup"], now)
        return at

    async def acquire(
        self,
        campaign_id: int,
        owner: str,
        *,
        until: datetime,
        now: datetime,
        fence: int,
        shards: int = 1,
    ) -> Lease | None:
        """Takes the campaign's (home) lease for ``owner``, on the authority of
        leader epoch ``fence``. ``shards``: how many shards the campaign is to
        be worked in; taken only while no helper shard's lease is live (else
        the count in force stays: the lease says which)."""
        async with self.pool.acquire() as conn, conn.transaction():
            # The entry's lock first: a helper shard's acquire (which locks it
            # too) is then either committed and seen, or waits for this one.
            await conn.fetchrow(Q["queue-lock-entry"], campaign_id)
            row = await conn.fetchrow(
                Q["queue-acquire"], campaign_id, owner, until, now, fence, max(1, shards)
            )
            if row is None:
                return None
            await conn.execute(Q["shard-fence-idle"], campaign_id, now)
        return Lease(
            campaign_id,
            owner,
            int(row["lease_epoch"]),
            row["consecutive_transient_errors"],
            shards=int(row["shards"]),
        )

    async def acquire_shard(
        self,
        campaign_id: int,
        shard: int,
        owner: str,
        *,
        until: datetime,
        now: datetime,
        fence: int,
    ) -> Lease | None:
        """Takes helper shard ``shard`` (>= 1) of a campaign whose home lease is
        live, on the authority of leader epoch ``fence``; None when the shard is
        held, the campaign waits, is paused or finished, or the fence moved on."""
        row = await self.pool.fetchrow(
            Q["shard-acquire"], campaign_id, shard, owner, until, now, fence
        )
        if row is None:
            return None
        return Lease(
            campaign_id,
            owner,
            int(row["lease_epoch"]),
            int(row["consecutive_transient_errors"]),
            shard=shard,
            shards=int(row["shards"]),
        )

    async def renew(self, lease: Lease, until: datetime) -> bool:
        if lease.shard:
            row = await self.pool.fetchrow(
                Q["shard-renew"], lease.campaign_id, lease.shard, lease.owner, lease.epoch, until
            )
        else:
            row = await self.pool.fetchrow(
                Q["queue-renew"], lease.campaign_id, lease.owner, until, lease.epoch
            )
        return row is not None

    async def release(self, lease: Lease, conn: Any = None) -> None:
        c = conn or self.pool
        if lease.shard:
            await c.execute(
                Q["shard-release"], lease.campaign_id, lease.shard, lease.owner, lease.epoch
            )
        else:
            await c.execute(Q["queue-release"], lease.campaign_id, lease.owner, lease.epoch)

    async def _lock_ours(self, conn: Any, lease: Lease) -> bool:
        """Locks the queue entry (and a helper's shard row) while ``lease`` is
        the live holder's: the first step of every check-then-act under it."""
        if not lease.shard:
            row = await conn.fetchrow(
                Q["queue-lock-ours"], lease.campaign_id, lease.owner, lease.epoch
            )
            return row is not None
        await conn.fetchrow(Q["queue-lock-entry"], lease.campaign_id)
        row = await conn.fetchrow(
            Q["shard-lock-ours"], lease.campaign_id, lease.shard, lease.owner, lease.epoch
        )
        return row is not None

    async def runnable_shards(self, now: datetime, limit: int) -> list[tuple[int, int]]:
        """(campaign id, shard) of the helper shards the leader may dispatch now."""
        rows = await self.pool.fetch(Q["shard-runnable"], now, limit)
        return [(int(r["campaign_id"]), int(r["shard"])) for r in rows]

    async def lease_holders(self, now: datetime) -> dict[tuple[int, int], str]:
        """{(campaign id, shard): holder} of every live lease, home and helpers."""
        rows = await self.pool.fetch(Q["shard-owners"], now)
        return {(int(r["campaign_id"]), int(r["shard"])): str(r["lease_owner"]) for r in rows}

    async def pending(self, campaign_id: int) -> int:
        """Recipients of the campaign still pending (its counters' row)."""
        n = await self.pool.fetchval(Q["campaign-pending"], campaign_id)
        return int(n or 0)

    async def begin_sending(self, lease: Lease, now: datetime) -> int | None:
        """Settles what a dead owner left in doubt (the campaign stays ``ready``
        until its first message has gone: ``mark_sending``); how many became
        ``in_doubt`` (see ``take_over``)."""
        took = await self.take_over(lease, now)
        return None if took is None else took.doubts

    async def take_over(self, lease: Lease, now: datetime) -> Takeover | None:
        """``begin_sending``, saying also how many claims of a dead owner went back
        to pending (the quota of any tokens it held for them is spent until a
        sync recounts it: the campaign actor asks for one).

        Only while the lease is ours (the queue entry is locked first): a
        takeover that lost its lease before this ran changes nothing and gets
        None.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self._lock_ours(conn, lease):
                return None
            # Only this lease's shard: another shard's claims are its holder's.
            row = await conn.fetchrow(
                Q["recipients-orphans-to-doubt"],
                lease.campaign_id,
                lease.claim_token,
                now,
                lease.shards,
                lease.shard,
            )
        assert row is not None
        return Takeover(doubts=int(row["doubts"]), released=int(row["returned"]))

    async def mark_sending(self, lease: Lease, now: datetime) -> bool:
        """The campaign's first messages go to SMTP now (tokens granted):
        ``ready`` -> ``sending``, and its queue entry's ``started_at``. True
        when this call moved it (once).

        Under the lease, in one transaction with the status's own check (from
        ``ready`` only): a manager's pause or cancel meanwhile stands.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self._lock_ours(conn, lease):
                return False
            moved = await conn.fetchrow(
                Q["campaign-set-status"], lease.campaign_id, "sending", ["ready"], now
            )
            if moved is None:
                return False
            await conn.execute(Q["queue-started"], lease.campaign_id, now)
            await _system_audit(
                conn, now, "campaign.status", lease.campaign_id, {"from": "ready", "to": "sending"}
            )
        return True

    async def claim(self, lease: Lease, n: int, now: datetime) -> tuple[list[Claimed], int]:
        """Claims up to n recipients; returns those to send and how many were unsubscribed."""
        rows = await self.pool.fetch(
            Q["recipients-claim"],
            lease.campaign_id,
            n,
            lease.claim_token,
            now,
            lease.owner,
            lease.epoch,
            lease.shard,
        )
        claimed = [
            Claimed(r["id"], r["email"], r["name"], r["variables"] or {})
            for r in rows
            if r["status"] == "sending"
        ]
        return claimed, len(rows) - len(claimed)

    async def release_claims(self, lease: Lease, ids: Sequence[int], now: datetime) -> None:
        if ids:
            await self.pool.execute(Q["recipients-release"], list(ids), lease.claim_token, now)

    async def hand(
        self, lease: Lease, ids: Sequence[int], now: datetime, *, account: str = ""
    ) -> list[int]:
        """Marks claimed recipients handed to SMTP; returns those this lease still holds.
        ``account``: the key of the SMTP account the wave goes through (a takeover's
        in-doubt send-log rows name it)."""
        if not ids:
            return []
        rows = await self.pool.fetch(
            Q["recipients-hand"],
            list(ids),
            lease.claim_token,
            now,
            lease.owner,
            lease.epoch,
            account,
            lease.shard,
        )
        return [int(r["id"]) for r in rows]

    async def record(
        self,
        lease: Lease,
        outcomes: Sequence[Outcome],
        now: datetime,
        *,
        transient_errors: int | None = None,
        success: bool = False,
        account: str = "",
    ) -> dict[int, str]:
        """Writes recipient outcomes, their send-log rows and the campaign's
        consecutive-transient-error count in one transaction.

        Returns the status each recipient row written got. A ``transient``
        outcome puts the recipient back to ``pending`` (it will be retried),
        or fails it once it had ``max_transient_attempts`` transient answers;
        its attempt stays in the send log. Idempotent: only rows still claimed
        by this lease (or a takeover's doubt, replaced by a final outcome) are
        written, and only those get send-log rows, so a record retried after a
        commit of unknown outcome writes nothing twice.
        """
        if not outcomes:
            return {}
        # The record-and-hand statement with nothing to hand.
        args = (
            *self._record_args(lease, outcomes, now),
            [],
            lease.owner,
            lease.epoch,
            account,
            lease.shard,
        )
        sql = Q["recipients-record-and-hand"]
        async with self.pool.acquire() as conn:
            if transient_errors is None:
                # One statement: atomic by itself, one round trip per wave.
                rows = await conn.fetch(sql, *args)
            else:
                async with conn.transaction():
                    if not lease.shard:
                        await conn.execute(
                            Q["queue-transient-count"],
                            lease.campaign_id,
                            lease.owner,
                            lease.epoch,
                            transient_errors,
                            success,
                        )
                    elif await self._lock_ours(conn, lease):
                        await conn.execute(
                            Q["queue-transient-count-shared"],
                            lease.campaign_id,
                            transient_errors,
                            success,
                        )
                    rows = await conn.fetch(sql, *args)
        return {int(r["id"]): str(r["status"]) for r in rows if not r["handed"]}

    async def record_and_hand(
        self,
        lease: Lease,
        outcomes: Sequence[Outcome],
        hand: Sequence[int],
        now: datetime,
        *,
        account: str = "",
    ) -> tuple[dict[int, str], list[int]]:
        """``record`` of one wave (no attempt count) and ``hand`` of the next, in one
        statement: the next wave is marked handed only with the previous one recorded.
        Returns the status each recorded row got and the ids marked handed.
        ``account``: the key of the SMTP account that sent them (the send log's), which
        the next wave of the same batch goes through too (its hand's account)."""
        args = self._record_args(lease, outcomes, now)
        rows = await self.pool.fetch(
            Q["recipients-record-and-hand"],
            *args,
            list(hand),
            lease.owner,
            lease.epoch,
            account,
            lease.shard,
        )
        written = {int(r["id"]): str(r["status"]) for r in rows if not r["handed"]}
        return written, [int(r["id"]) for r in rows if r["handed"]]

    def _record_args(
        self, lease: Lease, outcomes: Sequence[Outcome], now: datetime
    ) -> tuple[object, ...]:
        """Parameters $1..$13 of recipients-record-and-hand (the record part)."""
        rec = list(outcomes)
        return (
            [o.recipient_id for o in rec],
            [o.status for o in rec],
            [o.message_id for o in rec],
            # A transient outcome's error is only kept if it fails the
            # recipient: then the server's last answer says best why.
            [o.error if o.status != "transient" else (o.answer or o.error) for o in rec],
            [not o.short_circuited for o in rec],
            lease.claim_token,
            now,
            self._max_transient_attempts,
            [o.email for o in rec],
            [o.answer for o in rec],
            [o.error for o in rec],
            [o.took_ms for o in rec],
            lease.campaign_id,
        )

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
    ) -> tuple[bool, bool]:
        """The one way a campaign waits: reason and time on the queue entry, audited.

        ``account``: the name of the SMTP account whose limit or breaker it waits
        for (the manager's view says it); ``quota_key``: that account's quota row
        ('' the default's), read for a ``quota_exhausted`` wait.

        ``until`` None only for ``quota_exhausted``: no time can be named, the
        campaign waits for the sync (or ``quota.set``) that restores the quota.

        ``notice`` is the owner's notification for this deferral: it goes into
        the event outbox in the same transaction, unless the owner was already
        told of this same ongoing reason. Returns (deferred, notice stored).
        A ``quota_exhausted`` deferral written when a sync has already restored
        the quota ends at once (``now``).
        """
        if reason != "quota_exhausted" and until is None:
            raise ValueError(f"a {reason} deferral needs a time")
        if lease.shard or lease.shards > 1:
            return await self._shared_defer(
                lease, reason, until, now, notice=notice, account=account, quota_key=quota_key
            )
        if reason != "quota_exhausted":
            return await self._wait(
                lease,
                Q["queue-defer"],
                reason=reason,
                now=now,
                args=(reason, until, account),
                notice=notice,
            )
        async with self.pool.acquire() as conn, conn.transaction():
            # The governor saw no quota; a sync may have restored it since, and
            # its lift of the quota deferrals ran before this one existed.
            # Checked under the quota's lock (see quota-share): then the wait
            # ends now instead of at the safety net. The notice stays: it also
            # marks the reason notified, which a later real wait relies on.
            if await conn.fetchval(Q["quota-share"], quota_key) > 0:
                until = now
            return await self._wait(
                lease,
                Q["queue-defer"],
                reason=reason,
                now=now,
                args=(reason, until, account),
                notice=notice,
                conn=conn,
            )

    async def _shared_defer(
        self,
        lease: Lease,
        reason: str,
        until: datetime | None,
        now: datetime,
        *,
        notice: Notice | None,
        account: str | None,
        quota_key: str,
    ) -> tuple[bool, bool]:
        """``defer`` of a sharded campaign: every shard that is refused lets go of
        its own lease, and the entry keeps one answer -- the wait that ends last.

        A deferral already in force that ends no sooner (another shard was refused
        first: the governor answers all of them alike) stays as it is; this one
        only gives up its lease and returns (False, False), so no second event or
        notice goes out. One that ends later replaces it, with its notice when due
        (``notice_due``: the episode's one notice per reason).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self._lock_ours(conn, lease):
                return False, False
            q = await conn.fetchrow(Q["queue-lock-entry"], lease.campaign_id)
            assert q is not None
            if reason == "quota_exhausted" and await conn.fetchval(Q["quota-share"], quota_key) > 0:
                until = now  # restored since the governor looked (see ``defer``)
            await self.release(lease, conn)
            if _ends_no_sooner(q["defer_reason"], q["deferred_until"], until, now):
                return False, False
            await conn.execute(Q["queue-defer-shared"], lease.campaign_id, reason, until, account)
            await _system_audit(
                conn,
                now,
                "campaign.defer",
                lease.campaign_id,
                {
                    "reason": reason,
                    "until": until.isoformat() if until is not None else None,
                    "shard": str(lease.shard),
                },
            )
            if notice is None or not notice_due(
                reason, until, q["notified_reason"], q["notified_until"]
            ):
                return True, False
            await conn.execute(Q["queue-notified"], lease.campaign_id, reason, until)
            await store_notice(conn, notice, now)
            return True, True

    async def pause_by_breaker(
        self, lease: Lease, now: datetime, *, notice: Notice | None = None
    ) -> tuple[bool, bool]:
        """Pauses the campaign (status ``paused``, reason ``circuit_breaker``)."""
        return await self.pause(lease, "circuit_breaker", now, notice=notice)

    async def pause(
        self, lease: Lease, reason: str, now: datetime, *, notice: Notice | None = None
    ) -> tuple[bool, bool]:
        """Pauses the campaign (status ``paused``) with ``reason`` and lets go of it.

        ``circuit_breaker`` or ``render_error``: only a manager's resume runs
        it again. The fenced queue update goes first: a deposed owner, whose
        lease is gone, pauses nothing. Returns (paused, notice stored). A
        helper shard pauses the whole campaign (every other shard sees it at
        its next claim and lets go).
        """
        if lease.shard:
            return await self._shard_pause(lease, reason, now, notice=notice)
        async with self.pool.acquire() as conn, conn.transaction():
            paused, noticed = await self._wait(
                lease,
                Q["queue-pause"],
                reason=reason,
                now=now,
                args=(reason,),
                notice=notice,
                conn=conn,
            )
            if not paused:
                return False, False
            moved = await conn.fetchrow(
                Q["campaign-set-status-from"],
                lease.campaign_id,
                "paused",
                ["sending", "ready"],
                now,
            )
            if moved is None:  # a manager paused or cancelled it meanwhile: theirs stands
                return True, noticed
            await _system_audit(
                conn,
                now,
                "campaign.status",
                lease.campaign_id,
                {"from": moved["previous"], "to": "paused", "reason": reason},
            )
            return True, noticed

    async def _shard_pause(
        self, lease: Lease, reason: str, now: datetime, *, notice: Notice | None
    ) -> tuple[bool, bool]:
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self._lock_ours(conn, lease):
                return False, False
            q = await conn.fetchrow(Q["queue-lock-entry"], lease.campaign_id)
            assert q is not None
            await self.release(lease, conn)
            moved = await conn.fetchrow(
                Q["campaign-set-status-from"],
                lease.campaign_id,
                "paused",
                ["sending", "ready"],
                now,
            )
            if moved is None:  # a manager (or another shard) paused or cancelled it: no news
                return False, False
            await conn.execute(Q["queue-pause-shared"], lease.campaign_id, reason)
            await _system_audit(
                conn,
                now,
                "campaign.status",
                lease.campaign_id,
                {"from": moved["previous"], "to": "paused", "reason": reason},
            )
            if notice is None or q["notified_reason"] == reason:
                return True, False
            await store_notice(conn, notice, now)
            return True, True

    async def _wait(
        self,
        lease: Lease,
        sql: str,
        *,
        reason: str,
        now: datetime,
        args: tuple[Any, ...],
        notice: Notice | None,
        conn: Any = None,
    ) -> tuple[bool, bool]:
        if conn is None:
            async with self.pool.acquire() as c, c.transaction():
                return await self._wait(
                    lease, sql, reason=reason, now=now, args=args, notice=notice, conn=c
                )
        row = await conn.fetchrow(sql, lease.campaign_id, lease.owner, lease.epoch, *args)
        if row is None:
            return False, False
        until = args[1].isoformat() if len(args) > 1 and args[1] is not None else None
        await _system_audit(
            conn, now, "campaign.defer", lease.campaign_id, {"reason": reason, "until": until}
        )
        if notice is None:
            return True, False
        if sql == Q["queue-defer"]:  # a deferral: one notice per episode
            promised = args[1] if len(args) > 1 else None
            if not notice_due(reason, promised, row["previous_reason"], row["previous_until"]):
                return True, False
            await conn.execute(Q["queue-notified"], lease.campaign_id, reason, promised)
        elif row["previous_reason"] == reason:
            return True, False
        await store_notice(conn, notice, now)
        return True, True

    async def campaign_status(self, campaign_id: int) -> str | None:
        status: str | None = await self.pool.fetchval(Q["campaign-status"], campaign_id)
        return status

    # --- the leader's view ------------------------------------------------------

    async def take_fence(self, holder: str, now: datetime) -> int:
        """The next leader epoch, now ``holder``'s: every older one is fenced out."""
        return int(await self.pool.fetchval(Q["fence-take"], holder, now))

    async def fence(self) -> tuple[int, str]:
        """The current leader epoch and who took it."""
        row = await self.pool.fetchrow(Q["fence-get"])
        assert row is not None, "leader_fence has its one row from migration 0002"
        return int(row["epoch"]), str(row["holder"])

    async def active(self, now: datetime) -> dict[int, str]:
        rows = await self.pool.fetch(Q["queue-active"], now)
        return {int(r["campaign_id"]): str(r["lease_owner"]) for r in rows}

    async def forecast_queue(
        self, limit: int, *, account: str | None = None, default: bool = True
    ) -> list[Entry]:
        return await forecast_queue(self.pool, limit, account=account, default=default)

    async def reevaluate(self, now: datetime) -> list[int]:
        """Ends every limit's deferral now, to be decided again against the limits
        in force (see queue-reevaluate); wake the scheduler after this."""
        rows = await self.pool.fetch(Q["queue-reevaluate"], now)
        return [int(r["campaign_id"]) for r in rows]

    async def competing(self, now: datetime) -> int:
        return int(await self.pool.fetchval(Q["queue-competing"], now))

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
        """(campaign id, demand of the hour) of the campaigns sharing it, in queue order:
        those of SMTP account ``account`` (``default``: the default account)."""
        rows = await self.pool.fetch(
            Q["queue-competitors"], now, limit, asker, *hour, account, default
        )
        return [(int(r["campaign_id"]), int(r["demand"])) for r in rows]

    async def queue_depth(self, now: datetime) -> int:
        return int(await self.pool.fetchval(Q["queue-depth"], now))

    async def processing_since(self, now: datetime) -> list[tuple[int, datetime, str | None]]:
        rows = await self.pool.fetch(Q["queue-processing-since"], now)
        return [(int(r["campaign_id"]), r["leased_at"], r["defer_reason"]) for r in rows]

    async def settle_stale_claims(self, now: datetime, fence: int) -> dict[int, dict[str, int]]:
        """Rows left ``sending`` under a claim that is not the live lease's are
        settled (a live owner would otherwise wait for them forever): handed to
        SMTP → ``in_doubt``, never handed → ``pending``.

        On the leader's authority (``fence``); returns
        {campaign_id: {"in_doubt": n, "pending": m}} of what was settled.
        """
        settled: dict[int, dict[str, int]] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            for r in await conn.fetch(Q["recipients-stale-claims-to-doubt"], now, fence):
                verdicts = settled.setdefault(int(r["campaign_id"]), {})
                verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
        return settled

    async def finish_orphans(
        self, now: datetime, fence: int, *, notices: FinalNotices | None = None
    ) -> list[tuple[int, str, str, dict[str, int]]]:
        """Gives a final status to campaigns with nothing left and no live owner.

        Checked and written under the campaign's locks (queue entry, then the
        campaign row, as the API takes them): a campaign a manager paused or
        cancelled meanwhile keeps that status and its queue entry. The final
        events (``notices``) go into the event outbox in the same transaction.
        Returns (campaign_id, owner_id, status, counts) of each one finished.
        """
        done: list[tuple[int, str, str, dict[str, int]]] = []
        for row in await self.pool.fetch(Q["queue-unfinished-without-work"], now):
            cid = int(row["campaign_id"])
            await self._hook("finish_orphans.listed", cid)
            async with self.pool.acquire() as conn, conn.transaction():
                if await conn.fetchrow(Q["queue-lock-orphan"], cid, now, fence) is None:
                    continue
                c = await conn.fetchrow(Q["campaign-lock"], cid)
                if c is None or c["status"] not in ("sending", "ready"):
                    continue
                counts = await self.counts(cid, conn)
                if counts.get("pending", 0) or counts.get("sending", 0):
                    continue  # recipients added meanwhile: an owner will send them
                status = _final_status(counts)
                await conn.execute(Q["queue-complete-fenced"], cid, now, fence)
                await conn.execute(Q["campaign-set-status"], cid, status, ["sending", "ready"], now)
                await _system_audit(
                    conn,
                    now,
                    "campaign.status",
                    cid,
                    {"from": c["status"], "to": status, "counts": counts, "by": "reconcile"},
                )
                owner = str(c["owner_id"])
                await self._store_notices(
                    conn, notices, cid, owner, status=status, counts=counts, now=now
                )
            done.append((cid, owner, status, counts))
        return done

    async def finish(
        self, lease: Lease, now: datetime, *, notices: FinalNotices | None = None
    ) -> Finish:
        """Gives the campaign its honest final status when nothing is left to send.

        Checked and written under the campaign's locks (the queue entry, then
        the campaign row: the same locks, in the same order, as the API's
        pause and cancel), and only from ``sending``. Not finished when
        recipients are still pending or claimed (someone added recipients, or
        rows were locked when the claim looked), nor when the lease is no
        longer ours (``lease_lost``). A campaign a manager paused or cancelled
        is not finished either (``stopped``): its status and queue entry stay
        as the manager left them, and the lease is given up. The final events
        (``notices``) go into the event outbox in the same transaction.
        """
        cid = lease.campaign_id
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchrow(Q["queue-lock-ours"], cid, lease.owner, lease.epoch) is None:
                return Finish(status=None, counts={}, lease_lost=True)
            c = await conn.fetchrow(Q["campaign-lock"], cid)
            counts = await self.counts(cid, conn)
            await self._hook("finish.checked", cid)
            if c is None or c["status"] not in ("ready", "sending"):
                await conn.execute(Q["queue-release"], cid, lease.owner, lease.epoch)
                return Finish(
                    status=None, counts=counts, stopped="deleted" if c is None else str(c["status"])
                )
            if counts.get("pending", 0) or counts.get("sending", 0):
                if lease.shards > 1 and await conn.fetchval(Q["queue-waits"], cid, now):
                    # A helper shard was refused for a while (a limit, the SMTP
                    # account): the home does not hold its lease through the wait.
                    await conn.execute(Q["queue-release"], cid, lease.owner, lease.epoch)
                    return Finish(status=None, counts=counts, waits=True)
                return Finish(status=None, counts=counts)
            status = _final_status(counts)
            await conn.execute(Q["queue-complete"], cid, lease.owner, lease.epoch, now)
            # From ready too: a campaign whose every recipient failed or was
            # unsubscribed never had a message go.
            await conn.execute(Q["campaign-set-status"], cid, status, ["ready", "sending"], now)
            await _system_audit(
                conn,
                now,
                "campaign.status",
                cid,
                {"from": str(c["status"]), "to": status, "counts": counts},
            )
            owner = str(c["owner_id"])
            await self._store_notices(
                conn, notices, cid, owner, status=status, counts=counts, now=now
            )
        return Finish(status=status, counts=counts)

    @staticmethod
    async def _store_notices(
        conn: Any,
        notices: FinalNotices | None,
        campaign_id: int,
        owner_id: str,
        *,
        status: str,
        counts: dict[str, int],
        now: datetime,
    ) -> None:
        if notices is None:
            return
        for n in notices(campaign_id, owner_id, status, counts):
            await store_notice(conn, n, now)


async def _system_audit(
    conn: Any, now: datetime, action: str, campaign_id: int, details: dict[str, Any]
) -> None:
    """An audit row of mailer itself (not of a manager), in the caller's transaction."""
    await conn.execute(Q["audit-insert"], now, "system", action, campaign_id, details)


def _ends_no_sooner(
    reason: str | None, until: datetime | None, new_until: datetime | None, now: datetime
) -> bool:
    """Whether a deferral on the entry (``reason``, ``until``) is in force and
    ends no sooner than a new one ending ``new_until`` (None: at a quota top-up,
    which no time names)."""
    if reason is None:
        return False
    if until is None:
        # Only the quota's wait has no time (a top-up ends it, no clock does);
        # a pause is no deferral to keep.
        return reason == "quota_exhausted"
    if until <= now:
        return False
    return new_until is not None and until >= new_until


def _final_status(counts: dict[str, int]) -> str:
    bad = counts.get("failed", 0) + counts.get("in_doubt", 0)
    return "completed_with_errors" if bad else "sent"
