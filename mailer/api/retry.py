"""Second chances: ``campaign.retry_failed`` and ``recipients.resolve``.

- ``campaign.retry_failed`` (the campaign's owner or an admin): failed
  recipients back to ``pending`` as a new attempt -- by default those that
  failed after their transient attempts ran out, with ``permanent`` also the
  5xx ones; never a suppressed address. They go through every limit again
  (the claim, the governor's tokens). A finished campaign is reopened
  (``ready``, back in the queue) and finishes again, honestly, when they are
  done; a running or paused one picks them up as it goes.
- ``recipients.resolve`` (admin only): an operator settles ``in_doubt``
  recipients after looking in the provider's logs: ``sent``, ``failed`` or
  ``retry``. ``retry`` sends the message again and may duplicate it (the
  server may have it): the reply says so. A finished campaign's status follows
  (``sent`` once nothing failed or is in doubt); ``retry`` reopens it.

Both are audited with the recipients they changed (nothing changed: no audit
row, no reopening) and run under the campaign's locks, the ones the engine's
finish takes, so a campaign never finishes with recipients made pending
meanwhile.
"""

from __future__ import annotations

from mailer.api.context import ApiContext, Caller, require_admin, require_owner
from mailer.apistore import Locked
from mailer.errors import Conflict, NotFound
from mailer.messages import (
    CampaignView,
    ResolveInDoubt,
    ResolveReply,
    RetryFailed,
    RetryReply,
    Wake,
)
from mailer.texts import text

__all__ = ["resolve", "retry_failed"]

# Where failed recipients may be made pending again: a cancelled campaign
# stays cancelled, a draft has none.
_RETRYABLE = ("ready", "sending", "paused", "sent", "completed_with_errors")
_FINAL = ("sent", "completed_with_errors")


async def retry_failed(ctx: ApiContext, caller: Caller, req: RetryFailed) -> RetryReply:
    now = ctx.clock.now()

    async def change(tx: Locked) -> tuple[str, int, bool]:
        c = tx.campaign
        if c is None:
            raise NotFound(campaign_id=req.campaign_id)
        require_owner(caller, c.owner_id)
        if c.status not in _RETRYABLE:
            raise Conflict(status=c.status)
        ids = await tx.retry_failed(permanent=req.permanent, now=now)
        reopened = bool(ids) and c.status in _FINAL and await tx.reopen(now)
        if ids:
            details = {"recipient_ids": ids, "permanent": req.permanent}
            await tx.audit(caller.user, "campaign.retry_failed", details, now)
        if reopened:
            await tx.audit(caller.user, "campaign.status", {"from": c.status, "to": "ready"}, now)
        return c.owner_id, len(ids), reopened

    owner, count, reopened = await ctx.db.locked(req.campaign_id, change)
    if reopened:
        await _queued(ctx, req.campaign_id, owner)
    return RetryReply(campaign=await _view(ctx, req.campaign_id), requeued=count)


async def resolve(ctx: ApiContext, caller: Caller, req: ResolveInDoubt) -> ResolveReply:
    require_admin(caller)
    now = ctx.clock.now()
    error = f"resolved as failed by {caller.user}" + (f": {req.note}" if req.note else "")

    async def change(tx: Locked) -> tuple[str, list[int], str | None]:
        c = tx.campaign
        if c is None:
            raise NotFound(campaign_id=req.campaign_id)
        ids = await tx.resolve_in_doubt(req.recipient_ids, req.to, error=error, now=now)
        if not ids:
            return c.owner_id, ids, None
        await tx.audit(
            caller.user,
            "recipients.resolve",
            {"to": req.to, "recipient_ids": ids, "note": req.note},
            now,
        )
        new_status: str | None = None
        if c.status in _FINAL:
            if req.to == "retry":
                new_status = "ready" if await tx.reopen(now) else None
            else:
                new_status = await tx.refinish(now)
            if new_status is not None and new_status != c.status:
                details = {"from": c.status, "to": new_status}
                await tx.audit(caller.user, "campaign.status", details, now)
            else:
                new_status = None
        return c.owner_id, ids, new_status

    owner, ids, new_status = await ctx.db.locked(req.campaign_id, change)
    if new_status == "ready":
        await _queued(ctx, req.campaign_id, owner)
    elif new_status is not None:
        await ctx.emit(
            new_status, campaign_id=req.campaign_id, owner_id=owner, status=new_status, at=now
        )
    warning = text("resolve_retry_warning", caller.lang) if req.to == "retry" else None
    return ResolveReply(campaign=await _view(ctx, req.campaign_id), resolved=ids, warning=warning)


async def _queued(ctx: ApiContext, campaign_id: int, owner: str) -> None:
    # The leader picks the reopened campaign up now, not at its next pass.
    await ctx.bus.publish(
        ctx.bus.subject("internal", "scheduler", "wake"), Wake(campaign_id=campaign_id)
    )
    now = ctx.clock.now()
    await ctx.emit("queued", campaign_id=campaign_id, owner_id=owner, status="ready", at=now)


async def _view(ctx: ApiContext, campaign_id: int) -> CampaignView:
    view = await ctx.store.view(campaign_id)
    if view is None:
        raise NotFound(campaign_id=campaign_id)
    return view
