"""The forecast as the API shows it: when campaigns start and finish.

``campaign.get`` and ``manager.status`` ask ``queue_outlook`` once per call:
the whole queue replayed by ``mailer.forecast`` from the current counters —
the hour's and each owner's day (Redis, best effort: unread counts as
unused), the quota (PostgreSQL) — under the settings' limits.

``estimate_of`` words one campaign's estimate: ``estimated_start_at`` (a
campaign that has not sent yet), ``estimated_completion_at``, and
``estimate_reason`` when the completion cannot be known: ``quota_exhausted``
(nothing goes until a top-up), ``paused``, ``draft``, or ``unknown`` (beyond
the replayed part of the queue).
"""

from __future__ import annotations

import logging
from datetime import datetime

import msgspec

from mailer.accounts import Account, accounts_of
from mailer.api.context import ApiContext
from mailer.forecast import Outlook, forecast
from mailer.messages import CampaignView, Wake

__all__ = [
    "FORECAST_QUEUE_LIMIT",
    "Estimate",
    "estimate_of",
    "queue_outlook",
    "reevaluate_deferrals",
    "with_estimate",
]

log = logging.getLogger("mailer.api")

# The forecast replays at most this many queue entries (the queue-depth alert
# fires at 50); a campaign behind them gets no estimate ("unknown").
FORECAST_QUEUE_LIMIT = 500

Estimate = tuple[datetime | None, datetime | None, str | None]


async def queue_outlook(ctx: ApiContext) -> dict[int, Outlook]:
    """Every campaign's outlook; with several SMTP accounts, each account's queue
    replayed under its own hour and quota (the owners' days are theirs in each)."""
    accounts = accounts_of(ctx.settings)
    if not accounts.several:
        return await _outlook(ctx, None)
    outlooks: dict[int, Outlook] = {}
    for account in accounts.accounts:
        outlooks.update(await _outlook(ctx, account))
    return outlooks


async def _outlook(ctx: ApiContext, account: Account | None) -> dict[int, Outlook]:
    now = ctx.clock.now()
    s = ctx.settings if account is None else account.settings
    if account is None:
        queue = await ctx.db.forecast_queue(FORECAST_QUEUE_LIMIT)
    else:
        queue = await ctx.db.forecast_queue(
            FORECAST_QUEUE_LIMIT, account=account.name, default=account.default
        )
    if not queue:
        return {}
    quota = await ctx.db.quota("" if account is None else account.key)
    counter = ctx.daily_counter if account is None else ctx.hour_counters.get(account.name)
    hour_used, day_used = 0, {}
    if counter is not None:
        try:
            hour_used = await counter.hour_used(now)
            today = ctx.hours.local_date(now)
            for owner in {e.owner_id for e in queue}:
                day_used[owner] = await counter.day_used(owner, today)
        except Exception as exc:  # best effort: a forecast must not fail because Redis does
            log.warning("rate counters unavailable for the forecast", extra={"error": repr(exc)})
    return forecast(
        now,
        queue,
        hours=ctx.hours,
        hourly_limit=s.rate_per_hour,
        hour_used=hour_used,
        daily_limit=ctx.daily_limits.limit_for,
        day_used=day_used,
        quota=None if quota is None else quota.emails_available,
        max_active=s.max_active_campaigns,
    )


def estimate_of(campaign_id: int, status: str, outlooks: dict[int, Outlook]) -> Estimate:
    """(estimated start, estimated completion, why the completion is not known)."""
    if status in ("draft", "paused"):
        return None, None, status
    if status not in ("ready", "sending"):
        return None, None, None  # finished: nothing to estimate
    o = outlooks.get(campaign_id)
    if o is None:
        return None, None, "unknown"
    return o.starts_at, o.completes_at, None if o.completes_at else (o.reason or "unknown")


async def with_estimate(ctx: ApiContext, view: CampaignView) -> CampaignView:
    """The view with its forecast filled in (the queue replayed only when it is in it)."""
    outlooks = await queue_outlook(ctx) if view.status in ("ready", "sending") else {}
    start, done, why = estimate_of(view.id, view.status, outlooks)
    return msgspec.structs.replace(
        view, estimated_start_at=start, estimated_completion_at=done, estimate_reason=why
    )


async def reevaluate_deferrals(ctx: ApiContext) -> list[int]:
    """Ends every limit's deferral now so the governor decides it again (the
    limits or the queue changed: quota.set, limits.reload, a pause or cancel
    that frees a turn); wakes the schedulers. Returns the campaign ids."""
    ids = await ctx.store.reevaluate(ctx.clock.now())
    if ids:
        # The leader dispatches them at once instead of at their old times.
        await ctx.bus.publish(ctx.bus.subject("internal", "scheduler", "wake"), Wake())
    return ids
